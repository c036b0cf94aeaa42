"""Scaling study: providers n x devices d for the sharded sub-run + detection.

Run (default sweep; a few minutes on the shared 2-core CPU):

  PYTHONPATH=. python experiments/scaling.py --json runs/scaling.json --plots runs/scaling
  PYTHONPATH=. python experiments/scaling.py --quick          # smoke run
  PYTHONPATH=. python experiments/scaling.py --max_n 1024     # as far as time allows

For every device count d (CPU: 1, 2, 4, 8 forced host devices; GPU / TPU:
1, 2, 4, ... up to the real device count) a subprocess is started (on CPU
with XLA_FLAGS=--xla_force_host_platform_device_count=d, which must be set
before JAX initialises), and for every n in 2, 4, ..., --max_n that d divides
it measures, on the digits MLP (batch 32, k steps, half the providers
planting BadNets backdoors):

* provider-steps per second of the sharded sub-run (n * k / time);
* the ring distance kernel's time (L2, `jaxrep.distances.pairwise_distances`
  with a mesh);
* replicated sub-runs verified per second, end to end: sub-run + L2
  distances + KS detector on the host, one after the other;
* peak memory: the estimate of `jaxrep.runtime.memory` (per device, all of it) and the
  measurement: the device's peak_bytes_in_use where the backend exposes it
  (GPU / TPU), else the process's max RSS (`resource.getrusage`, which on
  CPU includes the Python process and every compiled program).

Timing: one warm-up call (compiles), then the median of --repeats calls with
`jax.block_until_ready`. On this machine the forced CPU devices share the
same 2 cores, so more devices show the cost of partitioning (more, smaller
kernels and the ring's transfers), not a speed-up; on GPU / TPU the same
command uses real devices.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _probe_platform() -> tuple[str, int]:
  """(platform, device count) from a subprocess, so this process never
  initialises (and on GPU never grabs memory of) a backend."""
  code = "import jax; print(jax.default_backend(), jax.device_count())"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                       text=True, check=True, env=_env(None)).stdout
  platform, count = out.split()[-2:]
  return platform, int(count)


def _env(devices) -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")])
  if devices is not None:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if "force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
  return env


def _median_time(fn, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn())           # warm-up: compiles
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def _peak_measured() -> tuple[int, str]:
  import jax
  stats = None
  try:
    stats = jax.local_devices()[0].memory_stats()
  except Exception:
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "process max RSS")


def worker(args) -> list[dict]:
  """Measures every n for this process's device count."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxrep.population import image_attacks as A
  from jaxrep.data import datasets as data_lib
  from jaxrep.detect import detectors as detect_lib
  from jaxrep.population import divergence as div_lib
  from jaxrep import distances
  from jaxrep.runtime import memory
  from jaxrep.models import zoo as models
  from jaxrep.runtime import mesh as mesh_lib
  from jaxrep.train import trainer as train

  d = args.devices
  mesh = mesh_lib.make_mesh(d)
  ds = data_lib.load_dataset("digits")
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  model = models.get_model("mlp", ds.num_classes, ds.input_shape)
  schedule = jnp.asarray(data_lib.batch_schedule(0, 0, args.steps, 32,
                                                 len(ds.y_train)))
  rows = []
  n = 2
  while n <= args.max_n:
    if n % d:
      n *= 2
      continue
    specs = A.population_specs(n, n // 2, "badnets", num_classes=10)
    behaviour = A.make_behaviour(specs, ds.input_shape, ds.num_classes)
    trainer = train.make_trainer(model, train.TrainConfig(),
                                 div_lib.DivergenceConfig(),
                                 A.make_hooks(behaviour))
    pop = trainer.init(jax.random.key(0), n)
    keys = train.provider_keys(jax.random.key(1), n)
    div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
    sizes = memory.sizes_for(trainer, behaviour, div, x_train, y_train,
                             providers=n, batch_size=32,
                             subrun_steps=args.steps, devices=d)
    sizes = dataclasses.replace(sizes, distance_bytes=(
        distances.working_set_bytes(n, d, sizes.params)))
    est = memory.estimate(sizes)
    placed = mesh_lib.sub_run_inputs(mesh, pop, x_train, y_train, schedule,
                                     keys, div, behaviour)
    start = mesh_lib.replicate_tree(pop.params, mesh)
    sub_run = lambda: trainer.sub_run(*placed)
    t_sub = _median_time(sub_run, args.repeats)
    out, _ = sub_run()
    upd = mesh_lib.shard_provider_tree(distances.updates(start, out.params),
                                       mesh)
    t_dist = _median_time(lambda: distances.pairwise_distances(upd, "l2",
                                                               mesh=mesh),
                          args.repeats)
    members = np.ones(n, bool)

    def verify():
      out, _ = trainer.sub_run(*placed)
      dm = distances.pairwise_distances(
          distances.updates(start, out.params), "l2", mesh=mesh)
      ev = detect_lib.Evidence([np.asarray(mesh_lib.to_host(dm),
                                           np.float64)], [members])
      verdict = detect_lib.detect("ks", ev, n, ks_margin=10.0)
      return jnp.asarray(np.asarray(verdict.flags))

    t_e2e = _median_time(verify, args.repeats)
    peak, how = _peak_measured()
    row = {"devices": d, "providers": n, "steps": args.steps,
           "platform": jax.default_backend(),
           "provider_steps_per_s": n * args.steps / t_sub,
           "subrun_s": t_sub, "distance_s": t_dist,
           "verified_subruns_per_s": 1.0 / t_e2e, "end_to_end_s": t_e2e,
           "memory_estimate_bytes": est["peak"] * d,
           "memory_estimate_per_device_bytes": est["peak"],
           "memory_measured_bytes": peak, "memory_measured_kind": how,
           "load_average": os.getloadavg()[0]}
    print(json.dumps(row), flush=True)
    rows.append(row)
    if t_e2e * (args.repeats + 1) * 2.2 > args.budget:
      print(f"# devices={d}: stopping after n={n} (next n predicted over "
            f"--budget={args.budget:g}s)", flush=True)
      break
    n *= 2
  return rows


def _table(rows) -> str:
  head = ("| devices | n | provider-steps/s | sub-run s | L2 ring s | "
          "verified sub-runs/s | mem est MiB | mem measured MiB |")
  lines = [head, "|" + "---|" * 8]
  for r in sorted(rows, key=lambda r: (r["devices"], r["providers"])):
    lines.append(
        f"| {r['devices']} | {r['providers']} | "
        f"{r['provider_steps_per_s']:.0f} | {r['subrun_s']:.3f} | "
        f"{r['distance_s']:.4f} | {r['verified_subruns_per_s']:.2f} | "
        f"{r['memory_estimate_bytes'] / 2**20:.1f} | "
        f"{r['memory_measured_bytes'] / 2**20:.0f} |")
  return "\n".join(lines)


def _plots(rows, directory: str) -> list[str]:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  os.makedirs(directory, exist_ok=True)
  panels = [("provider_steps_per_s", "provider-steps / s"),
            ("distance_s", "L2 ring kernel (s)"),
            ("verified_subruns_per_s", "verified sub-runs / s (end to end)"),
            ("memory_estimate_bytes", "peak memory estimate (bytes)")]
  paths = []
  for key, label in panels:
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for d in sorted({r["devices"] for r in rows}):
      sel = sorted((r for r in rows if r["devices"] == d),
                   key=lambda r: r["providers"])
      ax.plot([r["providers"] for r in sel], [r[key] for r in sel], "o-",
              label=f"{d} device{'s' if d > 1 else ''}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("providers n")
    ax.set_ylabel(label)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(directory, f"scaling_{key}.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    paths.append(path)
  return paths


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--max_n", type=int, default=256)
  parser.add_argument("--devices", default="",
                      help="comma-separated device counts (default: 1, 2, 4, "
                           "8 on CPU; powers of 2 up to the device count "
                           "elsewhere)")
  parser.add_argument("--steps", type=int, default=10, help="k")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--budget", type=float, default=40.0,
                      help="seconds per measurement before a device count "
                           "stops growing n")
  parser.add_argument("--quick", action="store_true",
                      help="smoke run: n <= 16, devices 1 and 2, k 3, 1 rep")
  parser.add_argument("--json", default="")
  parser.add_argument("--plots", default="")
  parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--out", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.max_n, args.steps, args.repeats = min(args.max_n, 16), 3, 1
    args.devices = args.devices or "1,2"
  if args.worker:
    args.devices = int(args.devices)
    rows = worker(args)
    with open(args.out, "w") as f:
      json.dump(rows, f)
    return

  platform, count = _probe_platform()
  if args.devices:
    counts = [int(v) for v in args.devices.split(",")]
  elif platform == "cpu":
    counts = [1, 2, 4, 8]
  else:
    counts = [2 ** i for i in range(count.bit_length()) if 2 ** i <= count]
  print(f"# platform {platform}; device counts {counts}"
        + ("; forced CPU devices share this machine's cores: more devices "
           "show partitioning overhead, not speed-up" if platform == "cpu"
           else ""), flush=True)
  rows = []
  t0 = time.perf_counter()
  for d in counts:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
      path = tmp.name
    cmd = [sys.executable, os.path.abspath(__file__), "--worker",
           f"--devices={d}", f"--max_n={args.max_n}", f"--steps={args.steps}",
           f"--repeats={args.repeats}", f"--budget={args.budget}",
           f"--out={path}"]
    subprocess.run(cmd, check=True,
                   env=_env(d if platform == "cpu" else None))
    with open(path) as f:
      rows.extend(json.load(f))
    os.unlink(path)
  wall = time.perf_counter() - t0
  print()
  print(_table(rows))
  print(f"\n# wall {wall:.0f} s; k={args.steps}, batch 32, digits MLP, "
        f"median of {args.repeats}; memory measured as "
        f"{rows[-1]['memory_measured_kind'] if rows else '-'}")
  if args.json:
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
      json.dump({"platform": platform, "device_counts": counts,
                 "steps": args.steps, "repeats": args.repeats,
                 "wall_seconds": wall, "rows": rows}, f, indent=1)
    print(f"wrote {args.json}")
  if args.plots:
    print("wrote " + ", ".join(_plots(rows, args.plots)))


if __name__ == "__main__":
  main()
