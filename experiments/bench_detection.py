r"""Detection throughput: replicated checks per second as the population grows.

One replicated check is what the client does for a replicated sub-run: n
providers train the same k steps from the same checkpoint (one vmapped,
compiled sub-run: `Simulation.train_providers`), then the n x n distance
matrix of every metric (`jaxrep.distances.model_distances`) and the detector
on each of them (`jaxrep.detect.detect`). Half of the providers are malicious
(the default attack of the dataset), as in the headline setting.

    python experiments/bench_detection.py                     # n = 16..1024
    python experiments/bench_detection.py --n=16,64 --repeats=5 --json out.json

For every n, in one process: the first call of each part (compile + run) is
reported separately as "compile"; then `--repeats` timed checks, each part
waited for (`jax.block_until_ready`, host numpy for the matrices); the table
shows medians. Peak memory: the process's peak resident set
(`resource.getrusage`, grows monotonically, so n runs in increasing order)
and, where the device reports it (GPU/TPU), the device's peak bytes in use.
Nothing here is CPU-specific: on a GPU or TPU the same code runs on the
default device (`--devices=0` splits the providers over all of them).
A size whose training or distances are predicted (from the previous size,
scaled by n or n^2) to take longer than `--budget` seconds is skipped.
"""

from __future__ import annotations

import json
import resource
import statistics
import time

import jax
import numpy as np
from absl import flags

import _common
from jaxrep import data as data_lib
from jaxrep import distances
from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep.core import rng
from jaxrep.detect import detectors as detect_lib

_common.define_list("n", "16,64,256,1024", "numbers of providers", kind=int)
_common.define_list("metrics", ",".join(distances.METRICS),
                    "metrics whose matrices each check computes",
                    choices=distances.METRICS)
flags.DEFINE_string("detector", "ks", "detector run on every metric's matrix")
flags.DEFINE_string("dataset", "digits", "dataset (its default model: MLP)")
flags.DEFINE_integer("k", 20, "steps per sub-run")
flags.DEFINE_integer("batch_size", 32, "examples per step")
flags.DEFINE_integer("repeats", 3, "timed checks per n (medians reported)")
flags.DEFINE_integer("devices", 1, "devices the providers are split over "
                     "(0: all)")
flags.DEFINE_float("budget", 600.0, "skip an n whose check is predicted to "
                   "take longer (seconds)")
flags.DEFINE_string("json", None, "also write the rows to this JSON file")


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB


def _device_peak_mib() -> float | None:
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def _check(sim, inputs, metrics, detector):
  """One replicated check; returns seconds per part and the flags."""
  pop, _, _, schedule, keys, _, behaviour = inputs
  times = {}
  t = time.perf_counter()
  out = jax.block_until_ready(sim.train_providers(pop, schedule, keys,
                                                  behaviour))[0]
  times["train"] = time.perf_counter() - t
  start = jax.tree_util.tree_map(lambda a: a[0], pop.params)
  key = rng.distance(sim.root, 0)
  matrices = {}
  for m in metrics:
    t = time.perf_counter()
    matrices[m] = distances.model_distances(
        m, sim.model.predict, start, out.params, out.model_state,
        sim.probe_x, key, mesh=sim.mesh)          # host numpy: waited for
    times[m] = time.perf_counter() - t
  t = time.perf_counter()
  flagged = {}
  for m, d in matrices.items():
    evidence = detect_lib.Evidence([d], [np.ones(sim.n, bool)])
    flagged[m] = detect_lib.detect(detector, evidence, sim.n,
                                   ks_margin=sim.config.detector.ks_margin,
                                   alpha=sim.config.detector.alpha).flags
  times["detect"] = time.perf_counter() - t
  return times, flagged


def measure(n: int, args, ds) -> dict:
  config = SimConfig.from_flat(
      dataset=args.dataset, providers=n, malicious=n // 2, steps=args.k,
      subrun_steps=args.k, replicated=1, batch_size=args.batch_size,
      attack_check=False, devices=args.devices, detector=args.detector)
  sim = protocol.setup(config, dataset=ds)
  inputs = _common.subrun_inputs(sim)
  t = time.perf_counter()
  first, _ = _check(sim, inputs, args.metrics, args.detector)
  compile_s = time.perf_counter() - t
  runs = [_check(sim, inputs, args.metrics, args.detector)
          for _ in range(args.repeats)]
  parts = list(runs[0][0])
  med = {p: statistics.median(r[0][p] for r in runs) for p in parts}
  dist = sum(med[m] for m in args.metrics)
  total = med["train"] + dist + med["detect"]
  mal = np.asarray(sim.behaviour.malicious)
  flags_ = runs[-1][1]
  return {
      "n": n, "model": sim.config.model.name,
      "checks_per_s": 1.0 / total, "check_s": total,
      "train_s": med["train"], "distances_s": dist, "detect_s": med["detect"],
      "per_metric_s": {m: med[m] for m in args.metrics},
      "share": {"train": med["train"] / total, "distances": dist / total,
                "detect": med["detect"] / total},
      "first_call_s": compile_s,
      "compile_s": compile_s - total,
      "peak_rss_mib": _peak_rss_mib(), "device_peak_mib": _device_peak_mib(),
      "memory_chunks": sim.memory.num_chunks,
      "detected": {m: f"{int(f[mal].sum())}/{int(mal.sum())} malicious, "
                      f"{int(f[~mal].sum())}/{int((~mal).sum())} benign"
                   for m, f in flags_.items()},
      "all_times": [r[0] for r in runs],
  }


def _table(rows, metrics) -> str:
  head = ("| n | checks/s | check (s) | train | distances | detection | "
          + " | ".join(metrics) + " | compile (s) | peak RSS (MiB) |")
  lines = [head, "|" + "---|" * (head.count("|") - 1)]
  for r in rows:
    pm = " | ".join(f"{r['per_metric_s'][m]:.3g}" for m in metrics)
    s = r["share"]
    lines.append(
        f"| {r['n']} | {r['checks_per_s']:.3g} | {r['check_s']:.3g} | "
        f"{100 * s['train']:.0f} % | {100 * s['distances']:.0f} % | "
        f"{100 * s['detect']:.1f} % | {pm} | {r['compile_s']:.3g} | "
        f"{r['peak_rss_mib']:.0f} |")
  return "\n".join(lines)


def main():
  args = _common.script_args()
  dev = jax.devices()[0]
  print(f"device: {dev.platform} / {dev.device_kind} x {jax.device_count()}; "
        f"jax {jax.__version__}")
  ds = data_lib.load_dataset(args.dataset)
  rows, last = [], None
  for n in sorted(args.n):
    if last is not None:
      scale = n / last["n"]
      guess = (last["train_s"] * scale + last["distances_s"] * scale ** 2
               + last["detect_s"] * scale ** 2) * (args.repeats + 1)
      if guess > args.budget:
        print(f"n={n}: skipped (predicted {guess:.0f} s > --budget "
              f"{args.budget:.0f} s)")
        continue
    try:
      row = measure(n, args, ds)
    except Exception as e:  # pylint: disable=broad-except
      print(f"n={n}: failed: {type(e).__name__}: {str(e).splitlines()[0]}")
      break
    rows.append(row)
    last = row
    print(f"n={n}: {row['checks_per_s']:.3g} checks/s "
          f"(train {row['train_s']:.3g} s, distances {row['distances_s']:.3g}"
          f" s, detection {row['detect_s']:.3g} s; compile "
          f"{row['compile_s']:.3g} s; peak RSS {row['peak_rss_mib']:.0f} MiB"
          + (f", device peak {row['device_peak_mib']:.0f} MiB"
             if row["device_peak_mib"] is not None else "")
          + f"); {args.detector}: " + "; ".join(
              f"{m} {v}" for m, v in row["detected"].items()), flush=True)
  print()
  print(f"k={args.k} steps, batch {args.batch_size}, {args.dataset}, "
        f"detector {args.detector}, medians of {args.repeats}; shares of one "
        "check; per-metric columns in seconds")
  print(_table(rows, args.metrics))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"device_kind": dev.device_kind, "platform": dev.platform,
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  _common.run(main)
