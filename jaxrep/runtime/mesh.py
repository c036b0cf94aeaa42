"""The provider axis as a named mesh axis: mesh, placement, sharded sub-run.

Every array of a population (parameters, optimizer and model state, PRNG
keys, divergence, behaviour) has a leading provider axis. Here that axis is
split over the devices of a 1-D `jax.sharding.Mesh` with the axis name
`PROVIDERS`, so the same code runs on 1 CPU, 8 GPUs or a multi-host slice
(`jaxrep.runtime.distributed`):

* placement: `shard_provider_tree` splits provider-axis arrays over the
  devices, `replicate_tree` copies shared ones (training set, schedule) to
  every device, `to_host` brings (possibly multi-process) results back;
* sub-run: `trainer.sub_run` is already one jitted, vmapped computation.
  `sharded_sub_run` places its provider inputs with
  `NamedSharding(mesh, P("providers"))` and the training set and batch
  schedule replicated, so XLA's SPMD partitioner runs each device's
  providers locally: the compiled program holds no collective at all
  (`collective_counts`; checked in the tests), and the outputs stay
  provider-sharded;
* collectives: `collective_ops` / `collective_counts` read them off a
  compiled program, so tests can check what crosses devices (the distance
  ring of `jaxrep.distances.ring` moves provider blocks by
  collective-permute only).

Divisibility: the number of providers n must be a multiple of the number of
devices; otherwise a `ConfigError` names the field (choose n or the device
count accordingly). Padding is not done: padded copies of a provider would
join cohort-wide steps (clean twins) and the robust centre choice.

Bits: float32 results of a sharded sub-run equal an unsharded one to rounding
(about 1e-7 relative), not always bitwise: XLA:CPU picks its batched-kernel
strategy by the per-device provider count, and the same per-device count
gives the same bits (see BUILD_NOTES.md).
"""

from __future__ import annotations

import functools
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrep.core.errors import require

PROVIDERS = "providers"
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
               "reduce-scatter")


# --------------------------------------------------------------------------
# Mesh and placement.


def make_mesh(num_devices: Optional[int] = None, devices=None) -> Mesh:
  """A 1-D mesh over `num_devices` devices with the axis `PROVIDERS`.

  Args:
    num_devices: devices to use (the first ones of `devices`); None uses all.
    devices: devices to build the mesh from; None uses `jax.devices()` (every
      device of every process in a multi-host run).

  Returns:
    A `Mesh` whose single axis has type Auto, so jitted code without
    sharding annotations is partitioned by propagation.
  """
  devices = list(jax.devices() if devices is None else devices)
  if num_devices is None:
    num_devices = len(devices)
  require(isinstance(num_devices, (int, np.integer))
          and 1 <= num_devices <= len(devices), "devices",
          f"must be an int in [1, {len(devices)}] (devices available); got "
          f"{num_devices!r}")
  return jax.make_mesh((int(num_devices),), (PROVIDERS,),
                       axis_types=(AxisType.Auto,),
                       devices=devices[:num_devices])


def mesh_size(mesh: Mesh) -> int:
  """Number of devices along the provider axis."""
  return int(mesh.shape[PROVIDERS])


def provider_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an array whose leading axis is the provider axis."""
  return NamedSharding(mesh, P(PROVIDERS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an array held in full by every device."""
  return NamedSharding(mesh, P())


def check_divisible(n: int, mesh: Mesh, field: str = "providers") -> None:
  """Raises ConfigError unless n providers split evenly over the mesh."""
  d = mesh_size(mesh)
  require(n % d == 0, field,
          f"{n} providers do not split evenly over {d} devices; use a "
          f"multiple of {d} providers or a device count dividing {n}")


def _is_key(x) -> bool:
  return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype,
                                                     jax.dtypes.prng_key)


def _place(x, sharding: NamedSharding):
  """Puts one array (or typed PRNG key array) on `sharding`.

  Works in a multi-process run: a host value (identical on every process)
  becomes a global array through `make_array_from_callback`.
  """
  if _is_key(x):
    data = _place(jax.random.key_data(x), sharding)
    return _wrap_keys(str(jax.random.key_impl(x)), sharding)(data)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return jax.device_put(x, sharding)
  if sharding.is_fully_addressable:
    return jax.device_put(x, sharding)
  host = np.asarray(x)
  return jax.make_array_from_callback(host.shape, sharding,
                                      lambda index: host[index])


@functools.lru_cache(maxsize=None)
def _wrap_keys(impl: str, sharding: NamedSharding):
  return jax.jit(functools.partial(jax.random.wrap_key_data, impl=impl),
                 out_shardings=sharding)


def shard_provider_tree(tree, mesh: Mesh, field: str = "providers"):
  """Places every leaf of `tree` split along its leading provider axis.

  Args:
    tree: pytree whose leaves all have the same leading provider axis n
      (population, keys, divergence, behaviour, updates ...).
    mesh: a mesh from `make_mesh`.
    field: the name used in errors.

  Raises:
    ConfigError: a leaf without the shared leading axis, or n not divisible
      by the number of devices.
  """
  leaves = jax.tree_util.tree_leaves(tree)
  require(len(leaves) > 0, field, "has no arrays to shard")
  shapes = [tuple(np.shape(leaf)) for leaf in leaves]
  require(all(len(s) >= 1 for s in shapes)
          and len({s[0] for s in shapes}) == 1, field,
          f"every leaf needs the same leading provider axis; got {shapes}")
  check_divisible(shapes[0][0], mesh, field)
  sharding = provider_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: _place(x, sharding), tree)


def shard_population(pop, mesh: Mesh):
  """`shard_provider_tree` for a `train.Population`."""
  return shard_provider_tree(pop, mesh, "population")


def replicate_tree(tree, mesh: Mesh):
  """Places every leaf of `tree` in full on every device of the mesh."""
  sharding = replicated_sharding(mesh)
  return jax.tree_util.tree_map(lambda x: _place(x, sharding), tree)


def shard_model_state(model_state, mesh: Mesh):
  """`shard_provider_tree` for a population's model state, which is empty
  for models without state (returned as it is)."""
  if jax.tree_util.tree_leaves(model_state):
    return shard_provider_tree(model_state, mesh, "model_state")
  return model_state


def replicate_sharded(tree, mesh: Mesh):
  """Provider-sharded arrays -> replicated on every device.

  Runs as a jitted program of its own, so it works for arrays that span the
  devices of several processes.
  """
  return _identity_replicated(mesh)(tree)


@functools.lru_cache(maxsize=None)
def _identity_replicated(mesh: Mesh):
  return jax.jit(lambda tree: tree, out_shardings=replicated_sharding(mesh))


def to_host(tree):
  """Numpy copy of a pytree of (possibly multi-process, sharded) arrays."""
  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
  return jax.tree_util.tree_map(get, tree)


# --------------------------------------------------------------------------
# Sub-run.


def sub_run_inputs(mesh: Mesh, pop, x_train, y_train, schedule, keys, div,
                   behaviour) -> tuple:
  """The arguments of `trainer.sub_run`, placed on the mesh.

  Provider-axis inputs (pop, keys, div, behaviour) are split over devices;
  the training set and the batch schedule are replicated.
  """
  n = pop.size
  check_divisible(n, mesh)
  for name, tree in (("keys", keys), ("divergence", div),
                     ("behaviour", behaviour)):
    lead = {np.shape(leaf)[0] for leaf in jax.tree_util.tree_leaves(tree)}
    require(lead == {n}, name,
            f"needs the population's leading provider axis n={n}; got {lead}")
  return (shard_population(pop, mesh), *replicate_tree(
      (x_train, y_train, schedule), mesh), shard_provider_tree(keys, mesh),
          shard_provider_tree(div, mesh, "divergence"),
          shard_provider_tree(behaviour, mesh, "behaviour"))


def sharded_sub_run(trainer, mesh: Mesh, pop, x_train, y_train, schedule,
                    keys, div, behaviour):
  """`trainer.sub_run` with the provider axis split over the mesh.

  Same arguments and results as `trainer.sub_run`; the returned population
  is provider-sharded and the losses [k, n] are sharded on their second axis.
  Each device trains only its own providers (no collective is compiled in;
  `collective_counts` of `trainer.sub_run.lower(*sub_run_inputs(...),
  devices=mesh_size(mesh))` shows it; the provider blocks of the sub-run are
  multiples of the mesh size).
  """
  args = sub_run_inputs(mesh, pop, x_train, y_train, schedule, keys, div,
                        behaviour)
  return trainer.sub_run(*args, devices=mesh_size(mesh))


_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2,
             "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8,
             "u64": 8}


def collective_ops(compiled_or_text) -> list[tuple[str, int]]:
  """(op, result bytes per device) of every collective in a compiled program.

  Lets a test check that nothing population-sized crosses devices except
  the ring's collective-permute.
  """
  text = (compiled_or_text if isinstance(compiled_or_text, str)
          else compiled_or_text.as_text())
  ops = []
  for line in text.splitlines():
    m = re.search(r"=\s*(.*?)\s(" + "|".join(COLLECTIVES) + r")(?:-start)?\(",
                  line)
    if not m:
      continue
    size = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", m.group(1)):
      count = int(np.prod([int(v) for v in dims.split(",") if v])) if dims \
          else 1
      size += count * _ITEMSIZE.get(dtype, 4)
    ops.append((m.group(2), size))
  return ops


def collective_counts(compiled_or_text) -> dict[str, int]:
  """Number of each cross-device collective in a compiled program.

  Args:
    compiled_or_text: a `jax.stages.Compiled` or its `as_text()` HLO.

  Returns:
    {"all-gather": count, "all-reduce": ..., "collective-permute": ...,
     "all-to-all": ..., "reduce-scatter": ...}.
  """
  text = (compiled_or_text if isinstance(compiled_or_text, str)
          else compiled_or_text.as_text())
  return {op: len(re.findall(rf"\s{op}(?:-start)?\(", text))
          for op in COLLECTIVES}
