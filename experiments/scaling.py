"""Scaling study: providers n x devices d for the sharded sub-run + detection.

Run (default sweep; a few minutes on the shared 2-core CPU):

  python experiments/scaling.py --json runs/scaling.json --plots runs/scaling
  python experiments/scaling.py --quick          # smoke run
  python experiments/scaling.py --max_n 1024     # as far as time allows

For every device count d (CPU: 1, 2, 4, 8 forced host devices; GPU / TPU:
1, 2, 4, ... up to the real device count) a subprocess is started (on CPU
with XLA_FLAGS=--xla_force_host_platform_device_count=d, which must be set
before JAX initialises), and for every n in 2, 4, ..., --max_n that d divides
it measures, on the digits MLP (batch 32, k steps, half the providers
planting BadNets backdoors; the protocol's first sub-run, `protocol.setup`
with the providers over the process's d devices):

* provider-steps per second of the sharded sub-run (n * k / time);
* the ring distance kernel's time (L2, `jaxrep.distances.pairwise_distances`
  with a mesh);
* replicated sub-runs verified per second, end to end: sub-run + L2
  distances + KS detector on the host, one after the other;
* peak memory: the estimate of `jaxrep.runtime.memory` (the simulation's
  plan without the client's resident models; per device, all of it) and the
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

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import _common
from jaxrep import data, detect, distances, protocol
from jaxrep.config import SimConfig
from jaxrep.runtime import mesh as mesh_lib

flags.DEFINE_integer("max_n", 256, "largest number of providers")
_common.define_list("devices", "", "device counts (default: 1, 2, 4, 8 on "
                    "CPU; powers of 2 up to the device count elsewhere)",
                    kind=int)
flags.DEFINE_integer("steps", 10, "k")
flags.DEFINE_integer("repeats", 3, "timed calls per measurement")
flags.DEFINE_float("budget", 40.0, "seconds per measurement before a device "
                   "count stops growing n")
flags.DEFINE_bool("quick", False, "smoke run: n <= 16, devices 1 and 2, k 3, "
                  "1 rep")
flags.DEFINE_string("json", "", "write the rows to this JSON")
flags.DEFINE_string("plots", "", "directory for the PNG plots")
flags.DEFINE_bool("worker", False, "internal: measure in this process")
flags.DEFINE_string("out", "", "internal: the worker's JSON output")

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
    xla = [f for f in env.get("XLA_FLAGS", "").split()
           if "force_host_platform_device_count" not in f]
    xla.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(xla)
  return env


def _peak_measured() -> tuple[int, str]:
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
  (d,) = args.devices
  ds = data.load_dataset("digits")
  # devices=0 (all of them, also when that is one) keeps every row on a mesh.
  base = SimConfig.from_flat(
      dataset="digits", model="mlp", steps=args.steps,
      subrun_steps=args.steps, replicated=1, schedule="constant",
      attack_check=False, devices=0 if jax.device_count() == d else d)
  rows = []
  n = 2
  while n <= args.max_n:
    if n % d:
      n *= 2
      continue
    sim = protocol.setup(base.replace(providers=n, malicious=n // 2),
                         dataset=ds)
    mesh = sim.mesh
    if sim.memory.num_chunks > 1:
      print(f"# devices={d}: stopping at n={n}: the population no longer "
            "fits in one sub-run", flush=True)
      break
    est = sim.memory.estimate
    pop, *rest = _common.subrun_inputs(sim)
    placed = mesh_lib.sub_run_inputs(mesh, pop, *rest)
    start = mesh_lib.replicate_tree(pop.params, mesh)
    sub_run = lambda: sim.trainer.sub_run(*placed)
    t_sub = _common.timed(sub_run, args.repeats)
    out, _ = sub_run()
    upd = mesh_lib.shard_provider_tree(distances.updates(start, out.params),
                                       mesh)
    t_dist = _common.timed(
        lambda: distances.pairwise_distances(upd, "l2", mesh=mesh),
        args.repeats)
    members = np.ones(n, bool)

    def verify():
      out, _ = sim.trainer.sub_run(*placed)
      dm = distances.pairwise_distances(
          distances.updates(start, out.params), "l2", mesh=mesh)
      ev = detect.Evidence([np.asarray(mesh_lib.to_host(dm), np.float64)],
                           [members])
      verdict = detect.detect("ks", ev, n, ks_margin=10.0)
      return jnp.asarray(np.asarray(verdict.flags))

    t_e2e = _common.timed(verify, args.repeats)
    peak, how = _peak_measured()
    # This process holds no client models: the estimate without them.
    per_device = est["peak"] - est["resident"]
    row = {"devices": d, "providers": n, "steps": args.steps,
           "platform": jax.default_backend(),
           "provider_steps_per_s": n * args.steps / t_sub,
           "subrun_s": t_sub, "distance_s": t_dist,
           "verified_subruns_per_s": 1.0 / t_e2e, "end_to_end_s": t_e2e,
           "memory_estimate_bytes": per_device * d,
           "memory_estimate_per_device_bytes": per_device,
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
  args = _common.script_args()
  if args.quick:
    args.max_n, args.steps, args.repeats = min(args.max_n, 16), 3, 1
    args.devices = args.devices or [1, 2]
  if args.worker:
    rows = worker(args)
    with open(args.out, "w") as f:
      json.dump(rows, f)
    return

  platform, count = _probe_platform()
  if args.devices:
    counts = args.devices
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
  _common.run(main)
