"""Memory: estimate a sub-run's peak before running it, and plan chunks.

    sizes = memory.sizes_for(trainer, behaviour, div, x_train, y_train,
                             providers=n, batch_size=32, subrun_steps=k,
                             devices=d)
    sizes = dataclasses.replace(
        sizes, distance_bytes=distances.working_set_bytes(n, d, sizes.params))
    p = memory.plan(sizes)              # ConfigError if nothing fits
    out, losses = memory.chunked_sub_run(trainer, pop, ..., chunk_size=p.chunk)

Memory model (bytes per device, c providers in flight, d devices):

* population: c / d * (params + optimizer state + model state), held twice
  by the jitted sub-run (its input and its output: nothing is donated);
* step: c / d * (fixed + batch_size * per_example), the temporaries of one
  training step of one provider (gradients, updates, activations and their
  gradients), measured by summing the sizes of every intermediate of the
  step's jaxpr at two batch sizes (an upper bound: XLA reuses buffers);
* losses: k * c / d floats;
* training set: x_train + y_train, replicated on every device;
* distances (after the sub-run, with all n providers): `distance_bytes`,
  the working set of the distance kernels, which the caller gets from
  `jaxrep.distances.working_set_bytes` (this module sits below the
  distances stage and only takes the number).

Peak = training set + max(sub-run(c), distances(n)). Providers are
independent (per-provider keys, divergence and behaviour), so a population
that does not fit is trained in provider chunks with the same result
(`chunked_sub_run`); a config where even one provider per device does not fit
raises ConfigError before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import os
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import trees
from jaxrep.core.errors import require
from jaxrep.runtime import mesh as mesh_lib

DEFAULT_SAFETY = 0.8


@dataclasses.dataclass(frozen=True)
class Sizes:
  """What the memory model needs (bytes unless stated).

  Attributes:
    providers: n.
    params, opt_state, model_state: bytes of ONE provider's state.
    step_fixed: batch-independent temporaries of one provider's step.
    step_per_example: temporaries of one provider's step per example.
    batch_size: examples per step.
    subrun_steps: k.
    train_set: bytes of the training set on device.
    devices: devices the providers are split over.
    distance_bytes: working set of the distance kernels per device
      (`jaxrep.distances.working_set_bytes`); 0 leaves them out.
    resident: other bytes per device that stay allocated throughout (e.g.
      the providers' own full-run models of the protocol's attack check).
  """
  providers: int
  params: int
  opt_state: int
  model_state: int
  step_fixed: int
  step_per_example: int
  batch_size: int
  subrun_steps: int
  train_set: int
  devices: int = 1
  distance_bytes: int = 0
  resident: int = 0


def _tree_bytes(tree) -> int:
  return int(sum(np.prod(np.shape(x)) * np.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def _aval_bytes(aval) -> int:
  shape = getattr(aval, "shape", None)
  dtype = getattr(aval, "dtype", None)
  if shape is None or dtype is None:
    return 0
  try:
    itemsize = np.dtype(dtype).itemsize
  except TypeError:           # PRNG key types
    itemsize = 8
  return int(np.prod(shape)) * itemsize


def jaxpr_bytes(jaxpr) -> int:
  """Sum of the sizes of every intermediate of a jaxpr (nested included)."""
  total = 0
  for eqn in jaxpr.eqns:
    total += sum(_aval_bytes(v.aval) for v in eqn.outvars)
    for value in eqn.params.values():
      for sub in (value if isinstance(value, (tuple, list)) else (value,)):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += jaxpr_bytes(inner)
  return total


def one_provider(tree):
  """Abstract shapes of one provider's slice of a tree whose leaves have a
  leading provider axis."""
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(np.shape(a)[1:], a.dtype), tree)


def single_step_bytes(single_step, state, x, y, key, div, behaviour) -> int:
  """Temporaries of one provider's training step `single_step(*state, x, y,
  key, div, behaviour)`, traced on abstract (or one provider's) arguments:
  nothing is computed or allocated."""
  jaxpr = jax.make_jaxpr(single_step)(*state, x, y, key, div, behaviour)
  return jaxpr_bytes(jaxpr.jaxpr)


def step_bytes(trainer, behaviour, div, x_example, y_example,
               batch_size: int) -> tuple[int, int]:
  """(fixed, per_example) temporaries of one provider's training step.

  Traces `trainer.single_step` for one provider at batch sizes B and 2B
  (abstractly: nothing is computed or allocated) and fits
  bytes(B) = fixed + B * per_example.
  """
  pop = jax.eval_shape(lambda k: trainer.init(k, 1), jax.random.key(0))
  state = one_provider(tuple(pop))
  div1, beh1 = one_provider(div), one_provider(behaviour)
  key = jax.random.key(0)

  def traced(b):
    x = jax.ShapeDtypeStruct((b, *np.shape(x_example)), x_example.dtype)
    y = jax.ShapeDtypeStruct((b, *np.shape(y_example)), y_example.dtype)
    return single_step_bytes(trainer.single_step, state, x, y, key, div1,
                             beh1)

  b = max(1, int(batch_size))
  t1, t2 = traced(b), traced(2 * b)
  per_example = max(0, (t2 - t1) // b)
  return max(0, t1 - b * per_example), per_example


def sizes_for(trainer, behaviour, div, x_train, y_train, *, providers: int,
              batch_size: int, subrun_steps: int, devices: int = 1) -> Sizes:
  """Measures `Sizes` for a trainer and data without running anything.

  `distance_bytes` and `resident` are left at 0: they depend on the caller
  (set them with `dataclasses.replace`).
  """
  pop = jax.eval_shape(lambda k: trainer.init(k, 1), jax.random.key(0))
  fixed, per_example = step_bytes(trainer, behaviour, div, x_train[0],
                                  y_train[0], batch_size)
  return Sizes(providers=int(providers), params=_tree_bytes(pop.params),
               opt_state=_tree_bytes(pop.opt_state),
               model_state=_tree_bytes(pop.model_state), step_fixed=fixed,
               step_per_example=per_example, batch_size=int(batch_size),
               subrun_steps=int(subrun_steps),
               train_set=_tree_bytes((x_train, y_train)),
               devices=int(devices))


def estimate(sizes: Sizes, chunk: Optional[int] = None) -> dict[str, int]:
  """Peak bytes per device, broken down, with `chunk` providers in flight.

  Returns:
    {"population", "step", "losses", "subrun", "distances", "train_set",
     "resident", "peak"}; "subrun" = population + step + losses, and
    "peak" = train_set + resident + max(subrun, distances).
  """
  n, d = sizes.providers, sizes.devices
  c = n if chunk is None else int(chunk)
  per_dev = -(-c // d)
  state = sizes.params + sizes.opt_state + sizes.model_state
  population = 2 * per_dev * state
  step = per_dev * (sizes.step_fixed
                    + sizes.batch_size * sizes.step_per_example)
  losses = 4 * sizes.subrun_steps * per_dev
  subrun = population + step + losses
  return {"population": population, "step": step, "losses": losses,
          "subrun": subrun, "distances": sizes.distance_bytes,
          "train_set": sizes.train_set, "resident": sizes.resident,
          "peak": (sizes.train_set + sizes.resident
                   + max(subrun, sizes.distance_bytes))}


def host_available_bytes() -> int:
  """Memory the host can still give: MemAvailable, else physical memory."""
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def device_available_bytes(device=None) -> int:
  """Bytes one device can still allocate.

  Uses `device.memory_stats()` (bytes_limit - bytes_in_use) where the
  backend exposes it (GPU, TPU). On CPU it returns None: the host's available
  memory is shared by the process's CPU devices (forced host devices share
  one RAM), so it is divided by their number.
  """
  device = jax.local_devices()[0] if device is None else device
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # some backends raise instead of returning None
    stats = None
  if stats and "bytes_limit" in stats:
    return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  same = [dv for dv in jax.local_devices() if dv.platform == device.platform]
  return host_available_bytes() // max(1, len(same))


class Plan(NamedTuple):
  """Result of `plan`."""
  chunk: int              # providers per chunk (n: one shot)
  num_chunks: int
  estimate: dict          # breakdown for `chunk` (bytes per device)
  available: int          # bytes per device considered
  budget: int             # available * safety


def _fmt(b: float) -> str:
  return f"{b / 2**20:.1f} MiB"


def plan(sizes: Sizes, available: Optional[int] = None,
         safety: float = DEFAULT_SAFETY) -> Plan:
  """Chooses the provider chunk size that fits the device.

  Args:
    sizes: from `sizes_for` (or written by hand).
    available: bytes per device; None asks the device
      (`device_available_bytes`).
    safety: share of `available` the estimate may use, in (0, 1].

  Returns:
    A `Plan`; chunk == n when the whole population fits. Chunks are
    multiples of the device count.

  Raises:
    ConfigError: even one provider per device does not fit (field
      "providers" names the cheapest failing piece: batch_size, model or
      providers for the distance working set).
  """
  require(0 < safety <= 1, "safety", f"must be in (0, 1], got {safety!r}")
  n, d = sizes.providers, sizes.devices
  require(n >= 1 and d >= 1 and n % d == 0, "providers",
          f"{n} providers must be a positive multiple of {d} devices")
  if available is None:
    available = device_available_bytes()
  budget = int(available * safety)
  one = estimate(sizes, d)            # one provider per device
  where = (f"the budget of {_fmt(budget)} per device ({safety:.0%} of "
           f"{_fmt(available)} available); use fewer providers, a smaller "
           f"batch or model, or more devices")
  fixed = sizes.train_set + sizes.resident
  held = (f"the training set ({_fmt(sizes.train_set)})" if not sizes.resident
          else f"the training set and resident models "
               f"({_fmt(sizes.train_set)} + {_fmt(sizes.resident)})")
  require(fixed + one["distances"] <= budget, "providers",
          f"does not fit in memory: the distance working set of {n} "
          f"providers ({_fmt(one['distances'])}) plus {held} exceeds {where}")
  require(fixed + one["subrun"] <= budget, "batch_size",
          f"does not fit in memory: a sub-run of one provider per device "
          f"needs {_fmt(one['subrun'])} (step temporaries "
          f"{_fmt(one['step'])} at batch {sizes.batch_size}) plus {held}, "
          f"more than {where}")
  # The sub-run's bytes are linear in the providers per device.
  per_device = (budget - fixed) // max(one["subrun"], 1)
  chunk = int(min(n, per_device * d))
  return Plan(chunk, -(-n // chunk), estimate(sizes, chunk), int(available),
              budget)


def chunked_sub_run(trainer, pop, x_train, y_train, schedule, keys, div,
                    behaviour, *, chunk_size: int, mesh=None,
                    to_host: bool = False):
  """`trainer.sub_run` over provider chunks of `chunk_size`.

  Providers are independent, so chunk by chunk gives the same models as one
  shot (bitwise when XLA picks the same kernels for both shapes, else to
  float32 rounding). At most two shapes are compiled (full chunks and the
  remainder).

  Args:
    trainer, pop, x_train, y_train, schedule, keys, div, behaviour: as in
      `trainer.sub_run`; `pop` may live on the host (numpy) so that only one
      chunk is on the device at a time.
    chunk_size: providers per chunk (a multiple of the mesh size if `mesh`).
    mesh: if given, every chunk is split over the mesh
      (`jaxrep.runtime.mesh.sharded_sub_run`).
    to_host: bring every chunk's result back to host memory (numpy), so that
      device memory holds one chunk at a time.

  Returns:
    (population, losses [k, n]) like `trainer.sub_run`.
  """
  n = int(jax.tree_util.tree_leaves(pop.params)[0].shape[0])
  require(isinstance(chunk_size, (int, np.integer)) and chunk_size >= 1,
          "chunk_size", f"must be an int >= 1; got {chunk_size!r}")
  if mesh is not None:
    d = mesh_lib.mesh_size(mesh)
    require(chunk_size % d == 0 and n % d == 0, "chunk_size",
            f"{chunk_size} (and providers={n}) must be multiples of the "
            f"{d} devices")
  outs, losses = [], []
  for start in range(0, n, chunk_size):
    stop = min(n, start + chunk_size)
    part = lambda tree: trees.take_slice(tree, start, stop)
    args = (part(pop), x_train, y_train, schedule, part(keys), part(div),
            part(behaviour))
    if mesh is None:
      out, loss = trainer.sub_run(*args)
    else:
      out, loss = mesh_lib.sharded_sub_run(trainer, mesh, *args)
    if to_host:
      out, loss = mesh_lib.to_host((out, loss))
    outs.append(out)
    losses.append(loss)
  cat = np.concatenate if to_host else jnp.concatenate
  pop_out = jax.tree_util.tree_map(lambda *xs: cat(xs, axis=0), *outs)
  return pop_out, cat(losses, axis=1)
