r"""RTTD's headline setting: 50 % of the providers, each with its own backdoor.

For each dataset and seed, one protocol run (primary pair: l2 + ks) records
the distance matrices of every metric at every replicated sub-run; each
metric x detector pair is then evaluated on those same sub-runs by replaying
the client's sequential detect-and-exclude rule (`protocol.replay`). The
client's trajectory follows the primary pair; the other pairs would pick a
different (benign, nearly identical) medoid, which changes the trajectory by
about the benign divergence.

    python experiments/headline.py --json runs/headline.json --md runs/headline.md
    python experiments/headline.py --datasets=digits --seeds=0 --quick
    python experiments/headline.py --datasets=fortunes,fortunes_phrase   # text

Settings are named; each names its dataset, model and attack (text:
Debian's fortunes quotations, 4 topics, with rare-token or phrase triggers).

Paper (Jia et al., SaTML 2025): 99.6 % of the malicious providers identified.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import flags

import _common
from jaxrep import data, detect, protocol, report
from jaxrep.config import SimConfig

SETTINGS = {
    "digits": dict(dataset="digits", model="mlp", attack="badnets", steps=400,
                   subrun_steps=20, replicated=5, trigger_size=2,
                   poison_rate=0.1),
    "fashion_mnist_idx": dict(dataset="fashion_mnist_idx", model="mlp",
                              attack="badnets", steps=600, subrun_steps=20,
                              replicated=5, trigger_size=3, poison_rate=0.1),
    "fortunes": dict(dataset="fortunes", model="text_cnn", attack="token",
                     steps=600, subrun_steps=20, replicated=5,
                     poison_rate=0.1),
    "fortunes_phrase": dict(dataset="fortunes", model="text_cnn",
                            attack="phrase", steps=600, subrun_steps=20,
                            replicated=5, poison_rate=0.1),
}


FLAGS = flags.FLAGS
_common.define_list("datasets", "digits,fashion_mnist_idx", "settings to run",
                    choices=SETTINGS)
_common.define_list("seeds", "0,1,2", "seeds of the runs", kind=int)
flags.DEFINE_integer("providers", 16, "providers n; half of them malicious")
flags.DEFINE_string("attack", None, "override every setting's attack")
flags.DEFINE_float("alpha", 0.01, "significance level of the detectors")
flags.DEFINE_float("ks_margin", 10.0, "KS margin of the detectors")
_common.define_list("metrics", ",".join(protocol.METRICS),
                    "metrics recorded and replayed", choices=protocol.METRICS)
flags.DEFINE_bool("quick", False, "fewer steps, for a smoke run")
flags.DEFINE_string("json", None, "write runs, pairs and table to this JSON")
flags.DEFINE_string("md", None, "write the markdown tables to this file")


def evaluate_pairs(result, n: int, alpha: float, ks_margin: float):
  """TPR / FPR / AUROC of every metric x detector pair on one run."""
  rows = []
  mal = result.malicious
  for metric, mats in result.recorded.items():
    for det in detect.DETECTORS:
      # The run's own metric replays with the run's per-look resolution
      # floors (what the live replica detector used); the other recorded
      # metrics have none recorded and replay with floor 0.
      own = metric == result.config.detector.metric
      flagged, _, scores = protocol.replay(
          mats, n, det, alpha=alpha, ks_margin=ks_margin,
          updates=result.recorded_updates,
          floors=result.floors if own else None)
      rows.append(dict(metric=metric, detector=det,
                       identified=int(flagged[mal].sum()),
                       malicious=int(mal.sum()),
                       false_flags=int(flagged[~mal].sum()),
                       benign=int((~mal).sum()),
                       auroc=detect.auroc(scores, mal)))
  return rows


def main():
  args = _common.script_args()
  runs, pair_rows = [], []
  t_start = time.time()
  for name in args.datasets:
    ds = data.load_dataset(SETTINGS[name]["dataset"])
    for seed in args.seeds:
      setting = dict(SETTINGS[name])
      if args.attack:
        setting["attack"] = args.attack
      if args.quick:
        setting.update(steps=100, replicated=2)
      cfg = SimConfig.from_flat(
          providers=args.providers, malicious=args.providers // 2,
          seed=seed, alpha=args.alpha,
          ks_margin=args.ks_margin, probe_size=128, **setting)
      t0 = time.time()
      res = protocol.run(cfg, progress=False, dataset=ds,
                         record_metrics=tuple(args.metrics))
      s = res.summary()
      mal = res.malicious
      runs.append(dict(
          dataset=name, seed=seed, config=res.config.flat(),
          malicious_asr=[float(a) for a in res.attack_success_rate[mal]],
          benign_asr=[float(a) for a in res.attack_success_rate[~mal]],
          benign_clean_accuracy=s["benign_mean_clean_accuracy"],
          malicious_clean_accuracy=s["malicious_mean_clean_accuracy"],
          client_clean_accuracy=s["final_clean_accuracy"],
          client_asr=s["final_attack_success_rate"],
          no_defense_asr=s["no_defense_attack_success_rate"],
          no_defense_clean_accuracy=s["no_defense_clean_accuracy"],
          overhead_steps=s["overhead_steps"], seconds=time.time() - t0))
      for row in evaluate_pairs(res, args.providers, args.alpha,
                                args.ks_margin):
        pair_rows.append(dict(dataset=name, seed=seed, **row))
      print(f"[{name} seed {seed}] {time.time() - t0:.0f} s; malicious ASR "
            f"min {min(runs[-1]['malicious_asr']):.3f}; l2+ks TPR "
            f"{s['tpr']:.3f} FPR {s['fpr']:.3f}", file=sys.stderr, flush=True)

  table = aggregate(pair_rows)
  md = markdown(table, runs, args)
  print(md)
  out = dict(runs=runs, pairs=pair_rows, table=table,
             versions=report.versions(), load_average=os.getloadavg(),
             wall_seconds=time.time() - t_start, command=" ".join(sys.argv))
  if args.json:
    report.write_json_atomic(args.json, out)
  if args.md:
    os.makedirs(os.path.dirname(os.path.abspath(args.md)), exist_ok=True)
    with open(args.md, "w") as f:
      f.write(md + "\n")


def aggregate(rows):
  """Pools counts over seeds per dataset x metric x detector."""
  keys = sorted({(r["dataset"], r["metric"], r["detector"]) for r in rows},
                key=lambda k: (k[0], protocol.METRICS.index(k[1]),
                               detect.DETECTORS.index(k[2])))
  table = []
  for key in keys:
    sel = [r for r in rows if (r["dataset"], r["metric"], r["detector"]) == key]
    ident = sum(r["identified"] for r in sel)
    mal = sum(r["malicious"] for r in sel)
    ff = sum(r["false_flags"] for r in sel)
    ben = sum(r["benign"] for r in sel)
    table.append(dict(dataset=key[0], metric=key[1], detector=key[2],
                      identified=ident, malicious=mal, tpr=ident / mal,
                      false_flags=ff, benign=ben, fpr=ff / ben,
                      auroc=float(np.nanmean([r["auroc"] for r in sel])),
                      seeds=len(sel)))
  return table


def markdown(table, runs, args) -> str:
  lines = []
  for name in dict.fromkeys(r["dataset"] for r in runs):
    rs = [r for r in runs if r["dataset"] == name]
    asr = np.concatenate([r["malicious_asr"] for r in rs])
    lines += [
        f"**{name}** ({len(rs)} seeds, {args.providers} providers, "
        f"{args.providers // 2} malicious with their own "
        f"{rs[0]['config']['attack']} backdoors, "
        f"{rs[0]['config']['model']}): malicious ASR min {asr.min():.3f} / median "
        f"{np.median(asr):.3f} ({(asr >= 0.9).mean() * 100:.0f} % >= 0.9); "
        f"benign ASR max {max(max(r['benign_asr']) for r in rs):.3f}; clean "
        f"acc benign {np.mean([r['benign_clean_accuracy'] for r in rs]):.3f} / "
        f"malicious {np.mean([r['malicious_clean_accuracy'] for r in rs]):.3f}; "
        f"client ASR with RTTD max {max(r['client_asr'] for r in rs):.3f} vs "
        f"no defense max {max(r['no_defense_asr'] for r in rs):.3f}; "
        f"overhead {rs[0]['overhead_steps']} steps on "
        f"{rs[0]['config']['steps']}.", ""]
    lines += ["| metric | " + " | ".join(detect.DETECTORS) + " |",
              "|---|" + "---|" * len(detect.DETECTORS)]
    for metric in dict.fromkeys(t["metric"] for t in table
                                if t["dataset"] == name):
      cells = []
      for det in detect.DETECTORS:
        t = next(t for t in table if (t["dataset"], t["metric"],
                                      t["detector"]) == (name, metric, det))
        cells.append(f"{100 * t['tpr']:.1f} / {100 * t['fpr']:.1f}")
      lines.append(f"| {metric} | " + " | ".join(cells) + " |")
    lines += ["", "cells: % of malicious identified (TPR) / % of benign "
              f"flagged (FPR), pooled over seeds; alpha {args.alpha}, "
              f"ks_margin {args.ks_margin}.", ""]
  return "\n".join(lines)


if __name__ == "__main__":
  _common.run(main)
