"""Records the per-look distance matrices of protocol runs and reports the
nearest-replica ratios the `replica` detector thresholds (jaxrep/detect).

    # calibration setting (all-benign, seeds 1000..1019, never scored):
    python experiments/replica_calibration.py --out=runs/replica_cal \
        --seeds=1000:1020 --malicious=0 --stacks=,fp32:0.5,tf32:0.25,bf16:0.25
    # any other setting, to see the attackers' ratios:
    python experiments/replica_calibration.py --out=runs/replica_50 \
        --seeds=0:10 --malicious=8

Each run appends one JSON line to <out>/runs.jsonl (matrices, members,
floors, malicious, stacks), so a killed run resumes. Runs recorded before the
resolution floor existed have no floors and are summarised with floor 0. The summary prints, per look,
the largest benign ratio nn_i / s and the smallest malicious one (see
`jaxrep.detect.detectors.replica_ratios`).
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from scipy import stats
from absl import app, flags

import jaxrep
from jaxrep.detect import detectors

flags.DEFINE_string("out", None, "output directory", required=True)
flags.DEFINE_string("seeds", "1000:1020", "lo:hi")
flags.DEFINE_integer("malicious", 0, "attackers per run")
flags.DEFINE_integer("providers", 16, "providers per run")
flags.DEFINE_string("stacks", ",fp32:0.5,tf32:0.25,bf16:0.25",
                    "comma-free list of --stacks values separated by ';' or "
                    "a leading ',' for the empty (all fp32) profile")
flags.DEFINE_string("extra", "", "further main-job flags k=v;k=v")
flags.DEFINE_bool("summary_only", False, "only summarise <out>/runs.jsonl")
flags.DEFINE_float("margin", None, "also count the looks at which this margin "
                   "flags an honest provider (default: the detector's)")
FLAGS = flags.FLAGS


def _stack_values(text: str) -> list[str]:
  # ",fp32:0.5,tf32:0.25,bf16:0.25" -> ["", "fp32:0.5,tf32:0.25,bf16:0.25"]
  if text.startswith(","):
    return [""] + ([text[1:]] if text[1:] else [])
  return text.split(";")


def _extra(text: str) -> dict:
  out = {}
  for item in filter(None, text.split(";")):
    k, v = item.split("=", 1)
    out[k] = json.loads(v) if v[:1] in "0123456789-[{tf" and v not in (
        "true", "false") else (v == "true" if v in ("true", "false") else v)
  return out


def record(out: str) -> None:
  path = os.path.join(out, "runs.jsonl")
  done = set()
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        r = json.loads(line)
        done.add((r["stacks_spec"], r["seed"], r["extra"]))
  lo, hi = map(int, FLAGS.seeds.split(":"))
  for spec in _stack_values(FLAGS.stacks):
    for seed in range(lo, hi):
      if (spec, seed, FLAGS.extra) in done:
        continue
      cfg = jaxrep.SimConfig.from_flat(
          providers=FLAGS.providers, malicious=FLAGS.malicious, stacks=spec,
          seed=seed, attack_check=False, **_extra(FLAGS.extra))
      res = jaxrep.run(cfg, progress=False)
      row = {"stacks_spec": spec, "seed": seed, "extra": FLAGS.extra,
             "malicious": np.asarray(res.malicious).tolist(),
             "stacks": list(res.stacks),
             "matrices": [np.asarray(m, float).tolist() for m in res.matrices],
             "members": [np.asarray(m, bool).tolist() for m in res.members],
             "floors": list(res.floors)}
      with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")
      print(f"recorded stacks={spec!r} seed={seed}", flush=True)


def summarise(out: str) -> None:
  rows = [json.loads(l) for l in open(os.path.join(out, "runs.jsonl"))]
  by = {}
  for r in rows:
    mal = np.asarray(r["malicious"], bool)
    floors = r.get("floors") or [0.0] * len(r["matrices"])
    for look, (d, mem) in enumerate(zip(r["matrices"], r["members"])):
      d, mem = np.asarray(d), np.asarray(mem, bool)
      if mem.sum() < 2:
        continue
      ratio = detectors.replica_ratios(d, mem, floor=floors[look])
      ben = ratio[mem & ~mal]
      bad = ratio[mem & mal]
      key = (r["stacks_spec"], look)
      by.setdefault(key, []).append(
          (float(ben.max()) if ben.size else np.nan,
           float(bad.min()) if bad.size else np.nan))
  allben = []
  for (spec, look), v in sorted(by.items()):
    v = np.asarray(v)
    allben += list(v[:, 0])
    print(f"stacks={spec or 'fp32'!r:32s} look {look}: runs {len(v):3d}  "
          f"max benign ratio {np.nanmax(v[:, 0]):9.3g}  "
          f"min malicious ratio {np.nanmin(v[:, 1]) if np.isfinite(v[:, 1]).any() else float('nan'):9.3g}")
  allben = np.asarray(allben)
  print(f"looks {allben.size}: benign max-ratio quantiles 50/90/99/max "
        f"{np.nanquantile(allben, [0.5, 0.9, 0.99, 1.0]).round(3).tolist()}")
  margin = FLAGS.margin or detectors.REPLICA_MARGIN
  looks = allben[np.isfinite(allben)]
  bad = int((looks > margin).sum())
  # One-sided 95 % Clopper-Pearson upper bound of the per-look probability
  # that an honest provider is flagged (the per-look family-wise error).
  upper = stats.beta.ppf(0.95, bad + 1, looks.size - bad) if looks.size else 1
  print(f"margin {margin:g}: looks with an honest provider flagged "
        f"{bad} of {looks.size}; per-look family-wise error <= "
        f"{100 * upper:.2f} % (95 % upper bound)")


def main(argv):
  del argv
  os.makedirs(FLAGS.out, exist_ok=True)
  if not FLAGS.summary_only:
    record(FLAGS.out)
  summarise(FLAGS.out)


if __name__ == "__main__":
  app.run(main)
