"""Benchmark of the pairwise distance kernels of jaxrep.distances.

Run (default grid, about 5-10 minutes on a 2-core CPU):

  python experiments/bench_distances.py --json out/bench_distances.json

For every (n providers, P parameters) it measures, in the same process:

* the machine's float32 GEMM rate: jnp.dot(x, x.T) on the same [n, P] array,
  Precision.HIGHEST (the ceiling for the Gram-based kernels), timed
  interleaved with each kernel's runs so that the "% of GEMM" ratio is robust
  to the load of a shared machine;
* each kernel of `pairwise_distances` (l2, cosine, l1, linf): median wall time
  of `--repeats` runs after a warm-up compile, with block_until_ready;
* scipy.spatial.distance.pdist on the float64 copy (what scipy computes in),
  converted with squareform (not timed);
* a plain numpy double loop over pairs (small n only).

FLOP counts (per full n x n matrix, as if every ordered pair were computed):
  l2, cosine: 2 n^2 P (the Gram product; the kernels compute it once);
  l1: 3 n^2 P (subtract, abs, add); linf: 3 n^2 P (subtract, abs, max).
The l1 / linf kernels evaluate only the upper-triangle tiles, so their
GFLOP/s by this formula counts the mirrored half as done.

Any measurement (kernel or baseline) is skipped when its predicted time per
run (from the rate measured on a smaller case in the same run) exceeds
--budget seconds, and inputs above --max_gb are skipped (n=1024, P=1e6 is
3.8 GB of float32: pass --max_gb 5 to include it); skipped entries print as
"skip". The plain double loop runs for n <= 64 only.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from scipy.spatial import distance as sd

import _common
from jaxrep import distances

SCIPY = {"l2": "euclidean", "cosine": "cosine", "l1": "cityblock",
         "linf": "chebyshev"}
FLOPS_PER = {"l2": 2, "cosine": 2, "l1": 3, "linf": 3}


_common.define_list("n", "64,256,1024", "numbers of providers", kind=int)
_common.define_list("p", "1e5,1e6", "numbers of parameters", kind=float)
_common.define_list("metrics", ",".join(distances.PARAM_METRICS),
                    "metrics benchmarked", choices=distances.PARAM_METRICS)
flags.DEFINE_integer("repeats", 3, "timed runs per measurement")
flags.DEFINE_float("budget", 20.0, "skip a measurement predicted to take "
                   "longer (s/run)")
flags.DEFINE_float("max_gb", 2.0, "skip (n, P) whose float32 input exceeds "
                   "this")
flags.DEFINE_integer("block_size", None, "block_size of the kernels")
flags.DEFINE_integer("chunk_size", None, "chunk_size of the kernels")
flags.DEFINE_bool("quick", False, "n in {64, 256}, P = 1e5, 2 repeats")
flags.DEFINE_string("json", None, "write the rows to this JSON")


def settings():
  """The script's flags, with --quick applied."""
  args = _common.script_args()
  if args.quick:
    args.n, args.p, args.repeats = [64, 256], [1e5], 2
  return args


def timed_pair(fn, ref, repeats):
  """Median times of fn() and ref() with their runs interleaved.

  On a shared machine the load changes between measurements; interleaving
  makes the kernel / GEMM ratio robust to that.
  """
  jax.block_until_ready(fn())
  jax.block_until_ready(ref())
  t_fn, t_ref = [], []
  for _ in range(repeats):
    for f, ts in ((ref, t_ref), (fn, t_fn)):
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      ts.append(time.perf_counter() - t0)
  return statistics.median(t_fn), statistics.median(t_ref)


def timed_host(fn, repeats):
  """Median wall time of a host (numpy / scipy) function, no warm-up."""
  times, out = [], None
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), out


def double_loop(x64, metric):
  """Plain numpy loop over pairs i < j (the peers' baseline)."""
  n = x64.shape[0]
  d = np.zeros((n, n))
  for i in range(n):
    for j in range(i + 1, n):
      diff = x64[i] - x64[j]
      if metric == "l2":
        v = np.sqrt(diff @ diff)
      elif metric == "cosine":
        v = 1 - x64[i] @ x64[j] / np.sqrt((x64[i] @ x64[i]) *
                                           (x64[j] @ x64[j]))
      elif metric == "l1":
        v = np.abs(diff).sum()
      else:
        v = np.abs(diff).max()
      d[i, j] = d[j, i] = v
  return d


class Predictor:
  """Predicts run time from the best rate (work units / s) seen so far."""

  def __init__(self):
    self.rate = {}

  def predict(self, name, work):
    r = self.rate.get(name)
    return None if r is None else work / r

  def record(self, name, work, seconds):
    self.rate[name] = max(self.rate.get(name, 0.0), work / seconds)


def fmt(v, spec=".3g"):
  return "skip" if v is None else format(v, spec)


def run_case(n, p, args, pred, rows):
  key = jax.random.PRNGKey(0)
  x = jax.random.normal(key, (n, p), jnp.float32)
  x = jax.block_until_ready(x)
  work = float(n) * n * p
  opts = {}
  if args.block_size:
    opts["block_size"] = args.block_size
  if args.chunk_size:
    opts["chunk_size"] = args.chunk_size

  gemm = jax.jit(lambda a: jnp.dot(a, a.T,
                                   precision=jax.lax.Precision.HIGHEST))
  t_gemm = _common.timed(lambda: gemm(x), args.repeats)
  gemm_gflops = 2 * work / t_gemm / 1e9
  print(f"\n== n={n} P={p:.0e}  float32 GEMM x@x.T: {t_gemm:.3f} s = "
        f"{gemm_gflops:.1f} GFLOP/s", flush=True)

  x64 = None
  for metric in args.metrics:
    flops = FLOPS_PER[metric] * work
    fn = lambda: distances.pairwise_distances(x, metric, **opts)
    est = pred.predict(metric, work)
    t_k = None
    t_ref = t_gemm
    if est is None or est <= args.budget:
      t_k, t_ref = timed_pair(fn, lambda: gemm(x), args.repeats)
      pred.record(metric, work, t_k)
    gflops = None if t_k is None else flops / t_k / 1e9
    ref_gflops = 2 * work / t_ref / 1e9

    # scipy pdist in float64 (what it computes in).
    t_sp = None
    est = pred.predict("scipy_" + metric, work)
    if est is None or est <= args.budget:
      if x64 is None:
        x64 = np.asarray(x, np.float64)
      t_sp, _ = timed_host(lambda: sd.pdist(x64, SCIPY[metric]),
                           1 if n * n * p > 1e10 else 2)
      pred.record("scipy_" + metric, work, t_sp)

    # plain double loop: small n only.
    t_loop = None
    est = pred.predict("loop_" + metric, work)
    if n <= 64 and (est is None or est <= args.budget):
      if x64 is None:
        x64 = np.asarray(x, np.float64)
      t_loop, _ = timed_host(lambda: double_loop(x64, metric), 1)
      pred.record("loop_" + metric, work, t_loop)

    row = dict(n=n, P=p, metric=metric, flops=flops,
               kernel_s=t_k, kernel_gflops=gflops,
               gemm_s=t_ref, gemm_gflops=ref_gflops,
               frac_gemm=(None if gflops is None else gflops / ref_gflops),
               scipy_s=t_sp,
               speedup_scipy=(None if t_k is None or t_sp is None
                              else t_sp / t_k),
               loop_s=t_loop,
               speedup_loop=(None if t_k is None or t_loop is None
                             else t_loop / t_k))
    rows.append(row)
    print(f"  {metric:6s} kernel {fmt(t_k)} s  {fmt(gflops, '.1f')} GFLOP/s "
          f"({fmt(row['frac_gemm'], '.0%')} of GEMM)  scipy {fmt(t_sp)} s "
          f"(x{fmt(row['speedup_scipy'], '.1f')})  loop {fmt(t_loop)} s "
          f"(x{fmt(row['speedup_loop'], '.0f')})", flush=True)
  del x, x64


def print_table(rows):
  print("\n| n | P | metric | kernel s | GFLOP/s | % GEMM | GEMM GFLOP/s "
        "| scipy s | x scipy | loop s | x loop |")
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    frac = None if r["frac_gemm"] is None else 100 * r["frac_gemm"]
    print(f"| {r['n']} | {r['P']:.0e} | {r['metric']} | {fmt(r['kernel_s'])} "
          f"| {fmt(r['kernel_gflops'], '.1f')} | {fmt(frac, '.0f')} "
          f"| {r['gemm_gflops']:.1f} | {fmt(r['scipy_s'])} "
          f"| {fmt(r['speedup_scipy'], '.1f')} | {fmt(r['loop_s'])} "
          f"| {fmt(r['speedup_loop'], '.0f')} |")


def main():
  args = settings()
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} CPUs; repeats={args.repeats} (median), "
        f"budget={args.budget}s; FLOPs: l2/cosine 2n^2P, l1/linf 3n^2P")
  t0 = time.perf_counter()
  pred, rows = Predictor(), []
  for p in sorted(int(v) for v in args.p):
    for n in sorted(args.n):
      gb = n * p * 4 / 2**30
      if gb > args.max_gb:
        print(f"\n== n={n} P={p:.0e}: skip (input {gb:.1f} GB > --max_gb)")
        continue
      run_case(n, p, args, pred, rows)
  print_table(rows)
  print(f"\ntotal bench time {time.perf_counter() - t0:.0f} s; 'skip' = "
        f"predicted > {args.budget:.0f} s per run (--budget) from the rates "
        "measured above; the plain loop runs for n <= 64 only")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(dict(args=vars(args), rows=rows, jax=jax.__version__,
                     device=jax.devices()[0].device_kind,
                     cpus=os.cpu_count()), f, indent=1)


if __name__ == "__main__":
  _common.run(main)
