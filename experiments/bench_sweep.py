r"""A sweep against separate main-job calls: the same cells, in one run.

The headline grid (16 providers, 8 malicious, badnets, digits: the main
job's defaults) over S seeds, run (a) as S separate
`python -m jaxrep.simulate --seed=s` processes, one after another, as a user
without sweeps would, and (b) as one `python -m jaxrep.sweep --seeds=0:S
--workers=W --threads=T` for every W of --workers and T of --threads. Each
starts from a cold compilation cache. Prints the wall seconds of each, the
ratios, and whether every cell's summary is identical (wall time aside).

    python experiments/bench_sweep.py --seeds=10 --out=runs/bench_sweep
    python experiments/bench_sweep.py --seeds=10 --workers=1,2,4 --threads=1
    python experiments/bench_sweep.py --seeds=2 --set=steps=100  # smoke run
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import flags

import jax

import _common
from jaxrep.sweep import store

FLAGS = flags.FLAGS
flags.DEFINE_integer("seeds", 10, "seeds 0..S-1 of the grid")
flags.DEFINE_string("out", "runs/bench_sweep", "scratch directory (emptied)")
_common.define_list("set", "", "extra main-job settings name=value for "
                    "both (e.g. steps=100)")
_common.define_list("workers", "1,2", "worker processes of each timed sweep",
                    kind=int)
_common.define_list("threads", "1,2", "cells side by side in each process "
                    "of each timed sweep", kind=int)

# Summary figures that depend on the clock, not on the simulation.
CLOCK = ("wall_seconds",)


def _timed(argv: list[str]) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", *argv], check=True,
                 stdout=subprocess.DEVNULL)
  return time.perf_counter() - start


def main() -> None:
  args = _common.script_args()
  shutil.rmtree(args.out, ignore_errors=True)
  extra = [f"--{s}" for s in args.set if s]
  seeds = range(args.seeds)

  separate = 0.0
  summaries = {}
  for s in seeds:
    out = os.path.join(args.out, "separate", str(s))
    separate += _timed(["jaxrep.simulate", f"--seed={s}", f"--out={out}",
                        "--noprogress", *extra])
    with open(os.path.join(out, "results.json")) as f:
      summaries[s] = json.load(f)["summary"]
    print(f"separate seed {s}: {separate:.1f} s so far", flush=True)

  print(f"\njax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
  print(f"{args.seeds} separate simulate calls: {separate:.1f} s")
  for w, t in [(w, t) for w in args.workers for t in args.threads]:
    sweep_out = os.path.join(args.out, f"sweep-{w}-{t}")
    swept = _timed(["jaxrep.sweep", f"--seeds=0:{args.seeds}",
                    f"--out={sweep_out}", "--noprogress", f"--workers={w}",
                    f"--threads={t}", *extra])
    differ = []
    cells = {r["seed"]: r["summary"]
             for r in store.all_cells(sweep_out).values()}
    for s in seeds:
      a = {k: v for k, v in summaries[s].items() if k not in CLOCK}
      b = {k: v for k, v in cells[s].items() if k in a}
      if a != b:
        differ.append((s, sorted(k for k in a if a[k] != b.get(k))))
    print(f"one sweep of {args.seeds} cells, {w} worker(s) x {t} "
          f"thread(s): {swept:.1f} s, "
          f"ratio {separate / swept:.2f}x fewer seconds; per-cell summaries "
          "identical (wall time aside): "
          + ("yes" if not differ else f"NO, {differ}"), flush=True)


if __name__ == "__main__":
  _common.run(main)
