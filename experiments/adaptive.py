r"""Adaptive adversaries against RTTD: evasion and sensitivity studies.

Evasion (`--study evasion`): for each adaptive attack of `jaxrep.population.adaptive`
over its knob, one protocol run per seed on digits (16 providers, MLP, 400
steps, k = 20, m = 5; 4 adaptive attackers with their own BadNets backdoors,
or round(share x 16) colluders sharing one). Reported per knob value:

* ASR of each attacker's own full-run model (the protocol's attack check:
  the backdoor it would deliver), and of the client's final model with RTTD
  (max over the attackers' triggers) and without defense;
* TPR / FPR of KS at its defaults (alpha 0.01, margin 10; the client's
  detector, its measured FPR is reported, not tuned), of the `cluster`
  detector, and of `cluster` with an anchor (a replica the client trusts,
  e.g. computes itself), the last two replayed on the same l2 matrices;
* evaded: share of attackers whose own ASR >= 50 % and that KS did not flag.

Sensitivity (`--study sensitivity`): TPR / FPR (KS, cluster) against 8 own
BadNets backdoors as the benign divergence grows (grad_noise, bf16_fraction),
and the cost / detection frontier over k, m and n (overhead m k (n - 1)
extra steps) against sporadic attackers (25 % of n, poisoning 25 % of their
sub-runs), the attacker for which m matters.

    python experiments/adaptive.py --study evasion --seeds 0,1 \
        --out runs/adaptive --json runs/adaptive/evasion.json
    python experiments/adaptive.py --study sensitivity --seeds 0 \
        --out runs/adaptive --json runs/adaptive/sensitivity.json
    python experiments/adaptive.py --study evasion --quick   # smoke run
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import numpy as np
from absl import flags

import _common
from jaxrep import data, detect, protocol, report
from jaxrep.config import SimConfig
from jaxrep.protocol import calibration

KNOBS = {
    "low_rate": [1 / 32, 2 / 32, 4 / 32, 8 / 32],
    "sporadic": [0.05, 0.1, 0.25, 0.5],
    "sporadic_last": [0.05, 0.1, 0.25, 0.5],
    "constrained": [1, 3, 10, 1e2, 1e4, 1e5, 1e6],
    "mimicry": [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0],
    "collusion": [0.1, 0.25, 0.4, 0.5],
}
KNOB_NAME = {"low_rate": "poison rate", "sporadic": "share of sub-runs",
             "sporadic_last": "share of sub-runs (last ones)",
             "constrained": "c (eps = c x benign distance)",
             "mimicry": "keep (share of backdoor deviation)",
             "collusion": "colluding share of n"}
LOG_KNOBS = ("constrained", "mimicry")

flags.DEFINE_enum("study", "evasion", ("evasion", "sensitivity"), "the study")
_common.define_list("attacks", ",".join(KNOBS), "adaptive attacks of the "
                    "evasion study", choices=KNOBS)
_common.define_list("seeds", "0", "seeds of the runs", kind=int)
flags.DEFINE_integer("attackers", 4, "adaptive attackers per run (collusion: "
                     "its share)")
flags.DEFINE_string("dataset", "digits", "dataset of the runs")
flags.DEFINE_bool("quick", False, "fewer steps and knob values, for a smoke "
                  "run")
flags.DEFINE_string("out", None, "directory for PNG plots")
flags.DEFINE_string("json", None, "write rows and tables to this JSON")
flags.DEFINE_string("replot", None, "only redraw the plots of this JSON into "
                    "--out")


def replay_flags(result, detector: str, *, anchor: int | None = None,
                 margin: float = 10.0) -> np.ndarray:
  """Flags of `detector` replayed on the run's recorded l2 matrices."""
  n = result.config.providers
  mats = result.recorded["l2"]
  if anchor is None:
    flags, _, _ = protocol.replay(mats, n, detector, ks_margin=margin,
                                  alpha=result.config.alpha)
    return flags
  active = np.ones(n, bool)
  ev = detect.Evidence()
  for d in mats:
    if active.sum() < 2:
      break
    ev.add(d, active.copy())
    v = detect.detectors.cluster_detector(ev, n, margin, anchor=anchor)
    active &= ~(v.flags & ev.members[-1])
  return ~active


def run_point(cfg, ds, attack: str, knob: float, cal) -> dict:
  """One protocol run of `attack` at `knob`; the row of the tables."""
  name = "sporadic" if attack == "sporadic_last" else attack
  placement = "last" if attack == "sporadic_last" else "random"
  adv = calibration.population(cfg, ds, name, knob, malicious=cfg.malicious,
                                calibration=cal, placement=placement)
  cfg = cfg.replace(malicious=adv.malicious)
  t0 = time.time()
  res = protocol.run(cfg, progress=False, dataset=ds,
                     behaviour=adv.behaviour, hooks=adv.hooks,
                     behaviour_for_subrun=adv.behaviour_for_subrun,
                     record_metrics=("l2",))
  mal = res.malicious
  asr = res.attack_success_rate[mal]
  s = res.summary()
  det = {"ks": res.flags,
         "cluster": replay_flags(res, "cluster", margin=cfg.ks_margin),
         "cluster_anchor": replay_flags(res, "cluster",
                                        anchor=cfg.providers - 1,
                                        margin=cfg.ks_margin)}
  row = dict(attack=attack, knob=float(knob), seed=cfg.seed,
             malicious=int(mal.sum()), benign=int((~mal).sum()),
             own_asr=[float(a) for a in asr],
             own_clean_acc=[float(a) for a in res.clean_accuracy[mal]],
             benign_clean_acc=float(np.mean(res.clean_accuracy[~mal])),
             client_asr=s["final_attack_success_rate"],
             client_clean_acc=s["final_clean_accuracy"],
             no_defense_asr=s["no_defense_attack_success_rate"],
             auroc_ks=s["auroc"], seconds=time.time() - t0)
  for k, flagged in det.items():
    row[f"identified_{k}"] = int(flagged[mal].sum())
    row[f"false_flags_{k}"] = int(flagged[~mal].sum())
  row["evaded_ks"] = int(((asr >= 0.5) & ~res.flags[mal]).sum())
  row["evaded_cluster"] = int(((asr >= 0.5) & ~det["cluster"][mal]).sum())
  return row


def aggregate(rows: list[dict]) -> list[dict]:
  """Pools the seeds of every (attack, knob)."""
  out = []
  for key in dict.fromkeys((r["attack"], r["knob"]) for r in rows):
    sel = [r for r in rows if (r["attack"], r["knob"]) == key]
    mal = sum(r["malicious"] for r in sel)
    ben = sum(r["benign"] for r in sel)
    asr = np.concatenate([r["own_asr"] for r in sel])
    agg = dict(attack=key[0], knob=key[1], seeds=len(sel), malicious=mal,
               own_asr_mean=float(asr.mean()),
               own_asr_works=float((asr >= 0.5).mean()),
               client_asr=float(np.mean([r["client_asr"] for r in sel])),
               client_asr_max=float(np.max([r["client_asr"] for r in sel])),
               no_defense_asr=float(np.mean([r["no_defense_asr"]
                                             for r in sel])),
               evaded_ks=sum(r["evaded_ks"] for r in sel) / mal,
               evaded_cluster=sum(r["evaded_cluster"] for r in sel) / mal)
    for k in ("ks", "cluster", "cluster_anchor"):
      agg[f"tpr_{k}"] = sum(r[f"identified_{k}"] for r in sel) / mal
      agg[f"fpr_{k}"] = sum(r[f"false_flags_{k}"] for r in sel) / ben
    out.append(agg)
  return out


def evasion_markdown(table: list[dict]) -> str:
  lines = ["| attack | knob | own ASR mean (>= 50 %) | client ASR RTTD mean/max "
           "| no defense | KS TPR / FPR | cluster TPR / FPR | cluster+anchor "
           "TPR / FPR | evaded KS | evaded cluster |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  pct = lambda v: f"{100 * v:.0f}"
  for t in table:
    lines.append(
        f"| {t['attack']} | {t['knob']:.4g} | {pct(t['own_asr_mean'])} % "
        f"({pct(t['own_asr_works'])} %) | {pct(t['client_asr'])} / "
        f"{pct(t['client_asr_max'])} % | {pct(t['no_defense_asr'])} % | "
        f"{pct(t['tpr_ks'])} / {pct(t['fpr_ks'])} | {pct(t['tpr_cluster'])} / "
        f"{pct(t['fpr_cluster'])} | {pct(t['tpr_cluster_anchor'])} / "
        f"{pct(t['fpr_cluster_anchor'])} | {pct(t['evaded_ks'])} % | "
        f"{pct(t['evaded_cluster'])} % |")
  lines += ["", "own ASR: the attackers' own full-run models (share with ASR >= "
            "50 %); client ASR: the client's final model, max over the "
            "attackers' triggers; TPR / FPR in %; evaded: share of attackers "
            "with own ASR >= 50 % that the detector did not flag. KS at "
            "alpha 0.01, margin 10 (the client's detector); cluster and "
            "cluster+anchor replayed on the same l2 matrices."]
  return "\n".join(lines)


def plot_attack(table, attack, path):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sel = [t for t in table if t["attack"] == attack]
  x = [t["knob"] for t in sel]
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  for key, label, style in [
      ("own_asr_mean", "own-model ASR", "o-"),
      ("client_asr", "client ASR (RTTD)", "s--"),
      ("tpr_ks", "TPR KS", "^-"), ("tpr_cluster", "TPR cluster", "v:"),
      ("fpr_ks", "FPR KS", "x-"), ("evaded_ks", "evaded KS", "d-.")]:
    ax.plot(x, [t[key] for t in sel], style, label=label)
  if attack in LOG_KNOBS:
    ax.set_xscale("log")
  ax.axhline(0.5, color="grey", lw=0.5)
  ax.set_ylim(-0.03, 1.03)
  ax.set_xlabel(KNOB_NAME[attack])
  ax.set_title(f"{attack}: ASR vs detection (digits)", fontsize=10)
  ax.legend(fontsize=7, ncol=3, loc="upper center",
            bbox_to_anchor=(0.5, -0.2))
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def evasion(args, ds) -> dict:
  rows = []
  for seed in args.seeds:
    cfg = SimConfig.from_flat(seed=seed, malicious=args.attackers,
                             probe_size=64, **args.setting)
    cal = calibration.calibrate(cfg, ds)
    print(f"[seed {seed}] calibration: benign distance {cal.distance:.3g}, "
          f"update norm {cal.update_norm:.3g}, ratio {cal.ratio:.3g}",
          file=sys.stderr, flush=True)
    for attack in args.attacks:
      knobs = KNOBS[attack][::2] if args.quick else KNOBS[attack]
      for knob in knobs:
        row = run_point(cfg, ds, attack, knob, cal)
        row["calibration"] = dataclasses.asdict(cal)
        rows.append(row)
        print(f"[seed {seed}] {attack} {knob:.4g}: own ASR "
              f"{np.mean(row['own_asr']):.2f}, KS {row['identified_ks']}/"
              f"{row['malicious']} (+{row['false_flags_ks']} benign), cluster "
              f"{row['identified_cluster']}, client ASR "
              f"{row['client_asr']:.2f} ({row['seconds']:.0f} s)",
              file=sys.stderr, flush=True)
  table = aggregate(rows)
  if args.out:
    for attack in args.attacks:
      plot_attack(table, attack, os.path.join(args.out,
                                              f"evasion_{attack}.png"))
  return dict(rows=rows, table=table, markdown=evasion_markdown(table))


def sens_point(cfg, ds, attack=None, knob=None) -> dict:
  """Detection of one run (no attack check): KS and cluster, TPR / FPR."""
  kw = {}
  if attack is not None:
    adv = calibration.population(cfg, ds, attack, knob,
                                 malicious=cfg.malicious)
    cfg = cfg.replace(malicious=adv.malicious)
    kw = dict(behaviour=adv.behaviour, hooks=adv.hooks,
              behaviour_for_subrun=adv.behaviour_for_subrun)
  res = protocol.run(cfg, progress=False, dataset=ds, record_metrics=("l2",),
                     **kw)
  mal = res.malicious
  cl = replay_flags(res, "cluster", margin=cfg.ks_margin)
  d = res.recorded["l2"][0]
  ben = np.flatnonzero(~mal)
  bb = d[np.ix_(ben, ben)][np.triu_indices(ben.size, 1)]
  return dict(tpr_ks=detect.tpr(res.flags, mal),
              fpr_ks=detect.fpr(res.flags, mal),
              tpr_cluster=detect.tpr(cl, mal),
              fpr_cluster=detect.fpr(cl, mal),
              benign_distance=float(np.median(bb)),
              benign_malicious_distance=float(np.median(
                  d[np.ix_(ben, np.flatnonzero(mal))])),
              overhead_steps=cfg.overhead_steps, k=cfg.subrun_steps,
              m=cfg.replicated, n=cfg.providers, seed=cfg.seed)


def sensitivity(args, ds) -> dict:
  rows = []
  noise = [0.0, 1e-3, 1e-2, 0.1, 0.3] if not args.quick else [0.0, 0.1]
  bf16 = [0.0, 0.25, 0.5, 1.0] if not args.quick else [0.0, 0.25]
  for seed in args.seeds:
    base = SimConfig.from_flat(seed=seed, attack_check=False, probe_size=64,
                              **args.setting)
    for g in noise:
      r = sens_point(base.replace(grad_noise=g), ds)
      rows.append(dict(study="grad_noise", value=g, **r))
      print(f"[seed {seed}] grad_noise {g}: {r}", file=sys.stderr, flush=True)
    for f in bf16:
      r = sens_point(base.replace(bf16_fraction=f), ds)
      rows.append(dict(study="bf16_fraction", value=f, **r))
      print(f"[seed {seed}] bf16 {f}: {r}", file=sys.stderr, flush=True)
    grid = [(k, m, n) for k in (10, 20, 40) for m in (1, 3, 5)
            for n in (8, 16)]
    if args.quick:
      grid = grid[::6]
    for k, m, n in grid:
      cfg = base.replace(subrun_steps=k, replicated=m,
                                providers=n, malicious=n // 4)
      r = sens_point(cfg, ds, "sporadic", 0.25)
      rows.append(dict(study="frontier", value=None, **r))
      print(f"[seed {seed}] k={k} m={m} n={n}: {r}", file=sys.stderr,
            flush=True)
  md = sensitivity_markdown(rows)
  if args.out:
    plot_sensitivity(rows, args.out)
  return dict(rows=rows, markdown=md)


def _pool(rows, key):
  out = {}
  for r in rows:
    out.setdefault(key(r), []).append(r)
  return out


def sensitivity_markdown(rows) -> str:
  pct = lambda v: f"{100 * v:.0f}"
  lines = []
  for study in ("grad_noise", "bf16_fraction"):
    lines += [f"| {study} | benign-benign l2 | benign-malicious l2 | KS TPR / "
              "FPR | cluster TPR / FPR |", "|---|---|---|---|---|"]
    for v, sel in _pool([r for r in rows if r["study"] == study],
                        lambda r: r["value"]).items():
      mean = lambda k: float(np.mean([r[k] for r in sel]))
      lines.append(f"| {v:g} | {mean('benign_distance'):.2g} | "
                   f"{mean('benign_malicious_distance'):.2g} | "
                   f"{pct(mean('tpr_ks'))} / {pct(mean('fpr_ks'))} | "
                   f"{pct(mean('tpr_cluster'))} / {pct(mean('fpr_cluster'))} |")
    lines.append("")
  lines += ["| k | m | n | overhead steps m k (n-1) | KS TPR / FPR | cluster "
            "TPR / FPR |", "|---|---|---|---|---|---|"]
  for (k, m, n), sel in _pool([r for r in rows if r["study"] == "frontier"],
                              lambda r: (r["k"], r["m"], r["n"])).items():
    mean = lambda key: float(np.mean([r[key] for r in sel]))
    lines.append(f"| {k} | {m} | {n} | {sel[0]['overhead_steps']} | "
                 f"{pct(mean('tpr_ks'))} / {pct(mean('fpr_ks'))} | "
                 f"{pct(mean('tpr_cluster'))} / {pct(mean('fpr_cluster'))} |")
  lines += ["", "grad_noise / bf16: 16 providers, 8 with their own BadNets "
            "backdoor (poison rate 0.1). Frontier: n // 4 sporadic attackers "
            "poisoning 25 % of their sub-runs (own BadNets backdoors); 400 "
            "steps. Distances: median over the first replicated sub-run."]
  return "\n".join(lines)


def plot_sensitivity(rows, out):
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  for study in ("grad_noise", "bf16_fraction"):
    pooled = _pool([r for r in rows if r["study"] == study],
                   lambda r: r["value"])
    x = list(pooled)
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for key, style in [("tpr_ks", "o-"), ("fpr_ks", "x-"),
                       ("tpr_cluster", "v:"), ("fpr_cluster", "+:")]:
      ax.plot(x, [np.mean([r[key] for r in pooled[v]]) for v in x], style,
              label=key.replace("_", " "))
    ax.set_xlabel(study)
    ax.set_ylim(-0.03, 1.03)
    ax.legend(fontsize=7)
    ax.set_title(f"detection vs benign divergence ({study})", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"sensitivity_{study}.png"), dpi=120)
    plt.close(fig)
  front = [r for r in rows if r["study"] == "frontier"]
  fig, ax = plt.subplots(figsize=(5, 3.4))
  for n in sorted({r["n"] for r in front}):
    sel = [r for r in front if r["n"] == n]
    ax.scatter([r["overhead_steps"] for r in sel], [r["tpr_ks"] for r in sel],
               label=f"KS, n={n}", marker="o")
    ax.scatter([r["overhead_steps"] for r in sel],
               [r["tpr_cluster"] for r in sel], label=f"cluster, n={n}",
               marker="x")
  ax.set_xscale("log")
  ax.set_xlabel("overhead steps m k (n - 1)")
  ax.set_ylabel("TPR")
  ax.set_title("cost vs detection (sporadic 25 %)", fontsize=10)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out, "frontier.png"), dpi=120)
  plt.close(fig)


def main():
  args = _common.script_args()
  if args.replot:
    with open(args.replot) as f:
      saved = json.load(f)
    os.makedirs(args.out, exist_ok=True)
    if saved["study"] == "evasion":
      for attack in dict.fromkeys(t["attack"] for t in saved["table"]):
        plot_attack(saved["table"], attack,
                    os.path.join(args.out, f"evasion_{attack}.png"))
    else:
      plot_sensitivity(saved["rows"], args.out)
    return
  args.setting = dict(dataset=args.dataset)
  if args.quick:   # 80 steps: a multiple of every k of the frontier grid
    args.setting.update(steps=80, replicated=2)
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  ds = data.load_dataset(args.dataset)
  t0 = time.time()
  result = evasion(args, ds) if args.study == "evasion" else sensitivity(
      args, ds)
  print(result["markdown"])
  if args.json:
    report.write_json_atomic(args.json, dict(
        result, study=args.study, versions=report.versions(),
        load_average=os.getloadavg(), wall_seconds=time.time() - t0,
        command=" ".join(sys.argv)))


if __name__ == "__main__":
  _common.run(main)
