"""Scale-out: the provider axis as a named mesh axis.

Every array of a population (parameters, optimizer and model state, PRNG
keys, divergence, behaviour) has a leading provider axis. Here that axis is
split over the devices of a 1-D `jax.sharding.Mesh` with the axis name
`PROVIDERS`, so the same code runs on 1 CPU, 8 GPUs or a multi-host slice:

* sub-run: `trainer.sub_run` is already one jitted, vmapped computation.
  Placing its provider inputs with `NamedSharding(mesh, P("providers"))` and
  the training set and batch schedule replicated lets XLA's SPMD partitioner
  run each device's providers locally: the compiled program holds no
  collective at all (see `collective_counts`; checked in the tests), and the
  outputs stay provider-sharded.
* parameter-space distances (`pairwise_distances`): a ring in `shard_map`.
  Device i holds its block of b = n / d providers (every leaf, never
  concatenated). Blocks rotate with `lax.ppermute`; at step s device i pairs
  its own block with block (i + s) mod d. Steps s = 0 .. floor(d / 2) cover
  every unordered block pair, so each device computes about n^2 P / d^2 of
  the work and holds three blocks (own, visiting, incoming), never the n x P
  population. The [b, b] tiles (small) are assembled into the n x n matrix.
  L2 / cosine mirror `jaxrep.distances.kernels`: rows centred on a robust centre row
  (chosen from a compact strided sample of <= `centre_sample` coordinates),
  a centred Gram product at HIGHEST precision with Kahan-compensated chunk
  sums, clamping at 0, and an exact fix-up from direct differences of every
  sub-tile holding a pair the Gram product cannot resolve. L1 / L-inf use
  direct differences on sub-tiles.
* output, CKA and Zest: the providers' outputs on the probe set are compact
  (n x probe x classes): they are computed provider-sharded, gathered, and
  handed to `jaxrep.distances.kernels`.

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
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrep.distances import kernels as dist_lib
from jaxrep.core.errors import require

PROVIDERS = "providers"
METRICS = ("l2", "cosine", "l1", "linf")
COLLECTIVES = ("all-gather", "all-reduce", "collective-permute", "all-to-all",
               "reduce-scatter")

_HI = lax.Precision.HIGHEST


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
  `collective_counts` of `trainer.sub_run.lower(*sub_run_inputs(...))`
  shows it).
  """
  args = sub_run_inputs(mesh, pop, x_train, y_train, schedule, keys, div,
                        behaviour)
  return trainer.sub_run(*args)


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


# --------------------------------------------------------------------------
# Ring distance kernels (inside shard_map).


class _Opts(NamedTuple):
  """Static sizes of a ring kernel."""
  block: int       # providers per fix-up / direct sub-tile
  chunk: int       # parameters per streamed chunk of the Gram product
  tile_chunk: int  # parameters per chunk of a direct sub-tile
  fixup_tol: float


# Streaming helpers shared with the single-device kernels.
_fold_chunks = dist_lib._fold_chunks
_cols = dist_lib._cols
_kahan = dist_lib._kahan_add


def _zeros(shape, dtype):
  """Zeros typed as varying over the provider axis (inside shard_map), so
  they can start a loop carry that the body fills with per-device values."""
  return lax.pcast(jnp.zeros(shape, dtype), (PROVIDERS,), to="varying")


def _sub_starts(b: int, block: int) -> list[int]:
  """Start rows of the sub-tiles of a b-row block (last one clamped)."""
  return sorted({min(k * block, b - block) for k in range(-(-b // block))})


def _row_stats(leaves, centre_rows, chunk: int, cosine: bool):
  """Per-row (|y|^2, y.c, |x|^2, non-finite) of a block, y = x - c."""
  b = leaves[0].shape[0]
  dtype = leaves[0].dtype
  z = _zeros((b,), dtype)
  carry = ((z, z), (z, z), (z, z), _zeros((b,), bool))
  for x, c in zip(leaves, centre_rows):
    def fn(acc, start, size, x=x, c=c):
      sq, cross, norm2, bad = acc
      xs, cs = _cols(x, start, size), _cols(c, start, size)
      y = xs - cs[None, :]
      sq = _kahan(sq, jnp.sum(y * y, axis=1))
      if cosine:
        cross = _kahan(cross, jnp.sum(y * cs[None, :], axis=1))
        norm2 = _kahan(norm2, jnp.sum(xs * xs, axis=1))
      bad = bad | ~jnp.all(jnp.isfinite(xs), axis=1)
      return sq, cross, norm2, bad
    carry = _fold_chunks(x.shape[1], chunk, fn, carry)
  (sq, _), (cross, _), (norm2, _), bad = carry
  bad = bad | ~jnp.isfinite(sq) | ~jnp.isfinite(norm2)
  return sq, cross, norm2, bad


def _gram_block(own, other, centre_rows, chunk: int):
  """Centred Gram product [b, b] of two blocks, compensated over chunks."""
  b = own[0].shape[0]
  dtype = own[0].dtype
  acc = (_zeros((b, b), dtype), _zeros((b, b), dtype))
  for xa, xb, c in zip(own, other, centre_rows):
    def fn(acc, start, size, xa=xa, xb=xb, c=c):
      cs = _cols(c, start, size)[None, :]
      ya = _cols(xa, start, size) - cs
      yb = _cols(xb, start, size) - cs
      return _kahan(acc, jnp.dot(ya, yb.T, precision=_HI))
    acc = _fold_chunks(xa.shape[1], chunk, fn, acc)
  return acc[0]


def _direct_sub_tile(own, other, si, sj, block: int, chunk: int, kind: str):
  """Exact [block, block] statistics from direct differences.

  kind "l1": sum |a - b|; "linf": max |a - b|; "l2": sum (a - b)^2;
  "cosine": (sum (a - b)^2, sum (a - b)(a + b)).
  """
  dtype = own[0].dtype
  zero = _zeros((block, block), dtype)
  carry = (zero, zero) if kind == "cosine" else zero
  for xa, xb in zip(own, other):
    def fn(acc, start, size, xa=xa, xb=xb):
      a = lax.dynamic_slice(xa, (si, start), (block, size))
      b = lax.dynamic_slice(xb, (sj, start), (block, size))
      diff = a[:, None, :] - b[None, :, :]
      if kind == "l1":
        return acc + jnp.sum(jnp.abs(diff), axis=-1)
      if kind == "linf":
        return jnp.maximum(acc, jnp.max(jnp.abs(diff), axis=-1))
      if kind == "l2":
        return acc + jnp.sum(diff * diff, axis=-1)
      total = a[:, None, :] + b[None, :, :]
      return (acc[0] + jnp.sum(diff * diff, axis=-1),
              acc[1] + jnp.sum(diff * total, axis=-1))
    carry = _fold_chunks(xa.shape[1], chunk, fn, carry)
  return carry if kind == "cosine" else (carry,)


def _direct_block(own, other, opts: _Opts, kind: str):
  """[b, b] L1 or L-inf between two blocks, sub-tile by sub-tile."""
  b = own[0].shape[0]
  blk = min(opts.block, b)
  out = _zeros((b, b), own[0].dtype)
  for si in _sub_starts(b, blk):
    for sj in _sub_starts(b, blk):
      (tile,) = _direct_sub_tile(own, other, si, sj, blk, opts.tile_chunk,
                                 kind)
      out = lax.dynamic_update_slice(out, tile, (si, sj))
  return out


def _fixup_block(own, other, flag, values: tuple, opts: _Opts, kind: str):
  """Replaces flagged entries by direct values, computing only sub-tiles
  that hold a flagged pair."""
  b = flag.shape[0]
  blk = min(opts.block, b)
  starts = [(si, sj) for si in _sub_starts(b, blk)
            for sj in _sub_starts(b, blk)]
  si_arr = jnp.asarray([s[0] for s in starts], jnp.int32)
  sj_arr = jnp.asarray([s[1] for s in starts], jnp.int32)

  def step(vals, s):
    si, sj = s
    f = lax.dynamic_slice(flag, (si, sj), (blk, blk))
    olds = tuple(lax.dynamic_slice(v, (si, sj), (blk, blk)) for v in vals)
    # The skip branch returns the old values (not fresh zeros), so both
    # branches carry the same varying-axis type inside shard_map.
    tiles = lax.cond(
        jnp.any(f),
        lambda: _direct_sub_tile(own, other, si, sj, blk, opts.tile_chunk,
                                 kind),
        lambda: olds)
    new = [lax.dynamic_update_slice(v, jnp.where(f, t, old), (si, sj))
           for v, t, old in zip(vals, tiles, olds)]
    return tuple(new), None

  vals, _ = lax.scan(step, tuple(values), (si_arr, sj_arr))
  return vals


def _pair_tiles(metric: str, opts: _Opts, centre_rows, own, own_stats,
                other, other_stats, diagonal: bool):
  """The [b, b] tiles (one, or two for cosine) of a block pair."""
  if metric in ("l1", "linf"):
    return (_direct_block(own, other, opts, metric),)
  sq_a, cross_a, _, bad_a = own_stats
  sq_b, cross_b, _, bad_b = other_stats
  g = _gram_block(own, other, centre_rows, opts.chunk)
  sum_sq = sq_a[:, None] + sq_b[None, :]
  d2 = jnp.maximum(sum_sq - 2 * g, 0)
  flag = (d2 < opts.fixup_tol * sum_sq) & ~bad_a[:, None] & ~bad_b[None, :]
  if diagonal:
    b = d2.shape[0]
    flag = flag & (jnp.arange(b)[:, None] < jnp.arange(b)[None, :])
  if metric == "l2":
    return _fixup_block(own, other, flag, (d2,), opts, "l2")
  dn2 = (sq_a[:, None] - sq_b[None, :]) + 2 * (cross_a[:, None] -
                                               cross_b[None, :])
  return _fixup_block(own, other, flag, (d2, dn2), opts, "cosine")


def _ring_body(metric: str, opts: _Opts, num_devices: int):
  """Per-device body of the ring kernel (runs inside shard_map)."""
  steps = num_devices // 2 + 1
  perm = [(j, (j - 1) % num_devices) for j in range(num_devices)]
  gram = metric in ("l2", "cosine")

  def body(leaves, centre):
    b = leaves[0].shape[0]
    own = [leaf.reshape(b, -1) for leaf in leaves]
    if gram:
      me = lax.axis_index(PROVIDERS)
      owner, local = centre // b, centre % b
      centre_rows = []
      for x in own:
        row = lax.dynamic_index_in_dim(x, local, axis=0, keepdims=False)
        row = lax.psum(jnp.where(me == owner, row, 0), PROVIDERS)
        centre_rows.append(jnp.where(jnp.isfinite(row), row, 0))
    else:
      centre_rows = [jnp.zeros((x.shape[1],), x.dtype) for x in own]
    stats = _row_stats(own, centre_rows, opts.chunk, metric == "cosine")
    tiles0 = _pair_tiles(metric, opts, centre_rows, own, stats, own, stats,
                         diagonal=True)
    if steps == 1:
      tiles = [t[None] for t in tiles0]
    else:
      def step(carry, _):
        other, other_stats = lax.ppermute(carry, PROVIDERS, perm)
        t = _pair_tiles(metric, opts, centre_rows, own, stats, other,
                        other_stats, diagonal=False)
        return (other, other_stats), t
      _, rest = lax.scan(step, (own, stats), None, length=steps - 1)
      tiles = [jnp.concatenate([t0[None], t], axis=0)
               for t0, t in zip(tiles0, rest)]
    sq, _, norm2, bad = stats
    return tuple(tiles), norm2, bad

  return body


def _assembly_index(num_devices: int) -> np.ndarray:
  """[d, d] index into concat(tiles, tiles^T) giving each block of the matrix.

  Device i computes block (i, (i + s) mod d) at step s; the block below the
  diagonal is the transpose. The first computation of a block wins.
  """
  d = num_devices
  steps = d // 2 + 1
  sel = np.full((d, d), -1, np.int64)
  for i in range(d):
    for s in range(steps):
      j = (i + s) % d
      if sel[i, j] < 0:
        sel[i, j] = i * steps + s
      if sel[j, i] < 0:
        sel[j, i] = d * steps + i * steps + s
  assert (sel >= 0).all()
  return sel


def _assemble(tiles: jax.Array, num_devices: int) -> jax.Array:
  """[n, n] matrix from the [d * steps, b, b] tiles of the ring."""
  b = tiles.shape[-1]
  d = num_devices
  both = jnp.concatenate([tiles, jnp.swapaxes(tiles, 1, 2)], axis=0)
  blocks = both[jnp.asarray(_assembly_index(d))]           # [d, d, b, b]
  return blocks.transpose(0, 2, 1, 3).reshape(d * b, d * b)


def _mirror_upper(d: jax.Array) -> jax.Array:
  return jnp.triu(d) + jnp.triu(d, 1).T


def _cosine_from_parts(d2, dn2, norm2):
  """1 - cos from |a - b|^2, |a|^2 - |b|^2 and the squared norms."""
  nrm = jnp.sqrt(norm2)
  ni, nj = nrm[:, None], nrm[None, :]
  dn = dn2 / jnp.where(ni + nj > 0, ni + nj, 1)
  num = jnp.maximum(d2 - dn * dn, 0)
  cos_d = jnp.minimum(0.5 * (num / jnp.where(ni > 0, ni, 1))
                      / jnp.where(nj > 0, nj, 1), 2)
  either = (ni == 0) | (nj == 0)
  both = (ni == 0) & (nj == 0)
  return jnp.where(either, jnp.where(both, 0, 1), cos_d).astype(d2.dtype)


def _finalize(d: jax.Array, bad: jax.Array) -> jax.Array:
  """Symmetric, non-negative, zero diagonal, +inf for non-finite rows."""
  d = _mirror_upper(d)
  d = jnp.where(bad[:, None] | bad[None, :] | jnp.isnan(d), jnp.inf, d)
  d = jnp.maximum(d, 0)
  return jnp.where(jnp.eye(d.shape[0], dtype=bool), 0, d)


@functools.lru_cache(maxsize=None)
def _ring_fn(mesh: Mesh, metric: str, opts: _Opts, num_leaves: int):
  """The jitted ring kernel for a mesh, metric and static sizes."""
  d = mesh_size(mesh)
  body = _ring_body(metric, opts, d)
  ntiles = 2 if metric == "cosine" else 1
  mapped = jax.shard_map(
      body, mesh=mesh,
      in_specs=([P(PROVIDERS)] * num_leaves, P()),
      out_specs=((P(PROVIDERS),) * ntiles, P(PROVIDERS), P(PROVIDERS)))

  def run(leaves, centre):
    tiles, norm2, bad = mapped(leaves, centre)
    # Gather the small tiles once; the n x n assembly then runs locally.
    tiles, norm2, bad = jax.lax.with_sharding_constraint(
        (tiles, norm2, bad), replicated_sharding(mesh))
    mats = [_assemble(t, d) for t in tiles]
    if metric == "l2":
      out = jnp.sqrt(mats[0])
    elif metric == "cosine":
      out = _cosine_from_parts(mats[0], mats[1], norm2)
    else:
      out = mats[0]
    return _finalize(out, bad)

  return jax.jit(run, out_shardings=replicated_sharding(mesh))


def _ring_opts(n: int, d: int, itemsize: int, block_size, chunk_size,
               max_bytes, fixup_tol) -> _Opts:
  """Validates options and derives the kernel's static sizes."""
  require(isinstance(max_bytes, (int, np.integer)) and max_bytes > 0,
          "max_bytes", f"must be a positive int (bytes); got {max_bytes!r}")
  require(isinstance(block_size, (int, np.integer)) and block_size >= 1,
          "block_size", f"must be an int >= 1; got {block_size!r}")
  require(chunk_size is None or (isinstance(chunk_size, (int, np.integer))
                                 and chunk_size >= 1),
          "chunk_size", f"must be None or an int >= 1; got {chunk_size!r}")
  require(isinstance(fixup_tol, (float, int)) and 0 <= fixup_tol < 1,
          "fixup_tol", f"must be a float in [0, 1); got {fixup_tol!r}")
  b = n // d
  block = int(min(block_size, b))
  gram_cap = max_bytes // (4 * b * itemsize)
  tile_cap = max_bytes // (block * block * itemsize)
  require(gram_cap >= 1 and tile_cap >= 1, "max_bytes",
          f"{max_bytes} bytes is too small for blocks of {b} providers and "
          f"block_size={block}; need at least "
          f"{max(4 * b, block * block) * itemsize}")
  if chunk_size is None:
    chunk = max(128, (gram_cap // 128) * 128) if gram_cap >= 128 else gram_cap
    tile_chunk = min(dist_lib.DEFAULT_TILE_CHUNK, tile_cap)
  else:
    chunk = min(int(chunk_size), gram_cap)
    tile_chunk = min(int(chunk_size), tile_cap)
  return _Opts(block, int(chunk), int(tile_chunk), float(fixup_tol))


def _centre_sample(leaves, n: int, sample: int) -> jax.Array:
  """The strided coordinate sample [n, <= sample] used to pick the centre
  (the same columns `jaxrep.distances.kernels` samples)."""
  rows = [leaf.reshape(n, -1) for leaf in leaves]
  total = sum(r.shape[1] for r in rows)
  stride = max(1, total // sample)
  sub = jnp.concatenate([r[:, ::stride] for r in rows], axis=1)
  return sub[:, :max(sample, len(rows))]


@functools.partial(jax.jit, static_argnames=("k",))
def _densest_row(d2, k: int):
  """Row whose k nearest rows (itself included) are closest in total."""
  nearest = -lax.top_k(-d2, k)[0]
  score = jnp.sum(nearest, axis=1)
  score = jnp.where(jnp.isfinite(score), score, jnp.inf)
  return jnp.argmin(score).astype(jnp.int32)


def choose_centre(x, mesh: Mesh, centre_sample: int = 256) -> int:
  """A provider row inside the densest cluster of a sharded population.

  Only a strided sample of <= `centre_sample` coordinates per provider (a
  compact [n, m] array) is gathered; its exact pairwise squared distances
  pick the row whose ceil(n / 2) nearest rows are closest, as in
  `jaxrep.distances.kernels`.
  """
  require(isinstance(centre_sample, (int, np.integer)) and centre_sample >= 1,
          "centre_sample", f"must be an int >= 1; got {centre_sample!r}")
  leaves = jax.tree_util.tree_leaves(x)
  n = leaves[0].shape[0]
  sample = _sample_fn(mesh, n, int(centre_sample))(leaves)
  d = dist_lib.pairwise_distances(sample, "l2")
  return int(to_host(_densest_row(d * d, k=(n + 1) // 2)))


@functools.lru_cache(maxsize=None)
def _sample_fn(mesh: Mesh, n: int, sample: int):
  """Jitted strided sample, gathered to every device; non-finite rows NaN."""
  def run(leaves):
    sub = _centre_sample(leaves, n, sample)
    finite = jnp.all(jnp.isfinite(sub), axis=1, keepdims=True)
    return jnp.where(finite, sub, jnp.nan)
  return jax.jit(run, out_shardings=replicated_sharding(mesh))


def pairwise_distances(x, mesh: Mesh, metric: str = "l2", *,
                       block_size: int = dist_lib.DEFAULT_BLOCK_SIZE,
                       chunk_size: Optional[int] = None,
                       max_bytes: int = dist_lib.DEFAULT_MAX_BYTES,
                       centre: Optional[int] = None,
                       centre_sample: int = dist_lib.DEFAULT_CENTRE_SAMPLE,
                       fixup_tol: float = dist_lib.DEFAULT_FIXUP_TOL
                       ) -> jax.Array:
  """Parameter-space distances with the providers split over the mesh.

  Same metrics, options and guarantees as `jaxrep.distances.kernels.
  pairwise_distances` (symmetric, zero diagonal, non-negative, +inf for
  non-finite rows), computed by the ring described in the module docstring:
  no device ever holds more than three provider blocks of n / d rows.

  Args:
    x: [n, P] array or pytree of [n, ...] leaves (e.g. `updates(start,
      end)`), sharded or not; it is placed provider-sharded on `mesh`.
    mesh: a mesh from `make_mesh`; n must be a multiple of its size.
    metric: "l2", "cosine", "l1" or "linf".
    block_size, chunk_size, max_bytes, centre, centre_sample, fixup_tol: as
      in `jaxrep.distances.kernels.pairwise_distances` (sizes apply per device).

  Returns:
    [n, n] matrix, replicated on every device.
  """
  require(metric in METRICS, "metric",
          f"must be one of {METRICS}; got {metric!r}")
  leaves = jax.tree_util.tree_leaves(x)
  require(len(leaves) > 0 and all(np.ndim(leaf) >= 1 for leaf in leaves),
          "x", "must be a 2-D array [n, P] or a pytree of arrays with a "
          "leading provider axis [n, ...]")
  n = np.shape(leaves[0])[0]
  dtype = dist_lib._float_dtype([leaf.dtype for leaf in leaves])
  leaves = [leaf for leaf in leaves if np.size(leaf) > 0]
  require(len(leaves) > 0, "x", "has no parameters (every leaf is empty)")
  leaves = shard_provider_tree(leaves, mesh, "x")
  if any(leaf.dtype != dtype for leaf in leaves):
    leaves = [leaf.astype(dtype) for leaf in leaves]
  d = mesh_size(mesh)
  opts = _ring_opts(n, d, jnp.dtype(dtype).itemsize, block_size, chunk_size,
                    max_bytes, fixup_tol)
  if metric in ("l2", "cosine"):
    if centre is None:
      centre = choose_centre(leaves, mesh, centre_sample)
    require(isinstance(centre, (int, np.integer)) and 0 <= centre < n,
            "centre", f"must be None (automatic) or a row index in [0, {n}); "
            f"got {centre!r}")
  else:
    centre = 0
  run = _ring_fn(mesh, metric, opts, len(leaves))
  return run(leaves, _place(np.int32(centre), replicated_sharding(mesh)))


# --------------------------------------------------------------------------
# Model-based metrics: compact per-provider outputs.


@functools.lru_cache(maxsize=None)
def _outputs_fn(apply_fn: Callable, mesh: Mesh):
  """Each device runs the forward pass of its own providers (shard_map: no
  collective inside); the compact outputs are then gathered."""
  def local(params, model_state, x):
    return jax.vmap(lambda p, s: apply_fn(p, s, x))(params, model_state)
  mapped = jax.shard_map(local, mesh=mesh, in_specs=(P(PROVIDERS),
                                                     P(PROVIDERS), P()),
                         out_specs=P(PROVIDERS))
  return jax.jit(mapped, out_shardings=replicated_sharding(mesh))


def provider_outputs(apply_fn: Callable, params, model_state, x,
                     mesh: Mesh):
  """Every provider's (logits, features) on `x`, computed sharded.

  The forward passes run provider-sharded (each device its own providers);
  only the compact outputs [n, B, C] and [n, B, d] are gathered to every
  device.
  """
  params = shard_provider_tree(params, mesh, "params")
  model_state = _shard_state(model_state, mesh)
  x = replicate_tree(jnp.asarray(x), mesh)
  return _outputs_fn(apply_fn, mesh)(params, model_state, x)


def _gather(tree, mesh: Mesh):
  """Provider-sharded arrays -> replicated, in a program of its own."""
  return _gather_fn(mesh)(tree)


@functools.lru_cache(maxsize=None)
def _gather_fn(mesh: Mesh):
  return jax.jit(lambda tree: tree, out_shardings=replicated_sharding(mesh))


def _shard_state(model_state, mesh: Mesh):
  if jax.tree_util.tree_leaves(model_state):
    return shard_provider_tree(model_state, mesh, "model_state")
  return model_state


def _lookup(outputs, state, x):
  """apply_fn that returns one provider's precomputed outputs."""
  del state, x
  return outputs


def output_distances(apply_fn: Callable, params, model_state, probe_x,
                     mesh: Mesh, **kwargs) -> jax.Array:
  """`jaxrep.distances.kernels.output_distances` with sharded forward passes.

  The providers' outputs are computed sharded and gathered (compact); the
  distance kernel of `jaxrep.distances.kernels` then runs on them unchanged.
  """
  outs = provider_outputs(apply_fn, params, model_state, probe_x, mesh)
  return dist_lib.output_distances(_lookup, outs, {}, probe_x, **kwargs)


def cka_distances(apply_fn: Callable, params, model_state, probe_x,
                  mesh: Mesh, **kwargs) -> jax.Array:
  """`jaxrep.distances.kernels.cka_distances` with sharded forward passes."""
  outs = provider_outputs(apply_fn, params, model_state, probe_x, mesh)
  return dist_lib.cka_distances(_lookup, outs, {}, probe_x, **kwargs)


def _local_blocks(tree, mesh: Mesh) -> dict:
  """{device: the device's block of a provider-sharded tree} (this process)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  blocks = {dev: [] for dev in mesh.local_devices}
  for leaf in leaves:
    for shard in leaf.addressable_shards:
      blocks[shard.device].append(shard.data)
  return {dev: jax.tree_util.tree_unflatten(treedef, parts)
          for dev, parts in blocks.items()}


def _zest_fit_blocks(apply_fn: Callable, params, model_state, reference_x,
                     key, mesh: Mesh, **fit_opts) -> dist_lib.ZestFit:
  """`distances.zest_fit`, each device on its own providers; replicated fit.

  One single-device program per device. On CPU they run one after another:
  the fit's batched pseudo-inverse (LAPACK SVD) spreads its batch over the
  host's intra-op thread pool and waits for it, and with several forced CPU
  devices executing it at once every pool thread ended up waiting
  (deadlock, seen in jaxlib 0.10.2 by a thread dump). On GPU / TPU the
  programs are dispatched asynchronously and run in parallel.
  """
  sequential = mesh.devices.flat[0].platform == "cpu"
  p_blocks = _local_blocks(params, mesh)
  s_blocks = (_local_blocks(model_state, mesh)
              if jax.tree_util.tree_leaves(model_state) else None)
  fits = {}
  for dev in mesh.local_devices:
    fit = dist_lib.zest_fit(
        apply_fn, p_blocks[dev],
        s_blocks[dev] if s_blocks is not None else model_state,
        jax.device_put(reference_x, dev), jax.device_put(key, dev),
        **fit_opts)
    fits[dev] = jax.block_until_ready(fit) if sequential else fit
  first = fits[mesh.local_devices[0]]
  n = jax.tree_util.tree_leaves(params)[0].shape[0]
  sharding = provider_sharding(mesh)

  def assemble(name):
    parts = [getattr(fits[dev], name) for dev in mesh.local_devices]
    shape = (n,) + parts[0].shape[1:]
    return jax.make_array_from_single_device_arrays(shape, sharding, parts)

  outputs, coefficients = _gather((assemble("outputs"),
                                   assemble("coefficients")), mesh)
  design, pinv = replicate_tree((to_host(first.design), to_host(first.pinv)),
                                mesh)
  return dist_lib.ZestFit(design, outputs, coefficients, pinv)


def zest_distances(apply_fn: Callable, params, model_state, reference_x, key,
                   mesh: Mesh, *, grid: int = 4, num_perturbations: int = 64,
                   num_references: Optional[int] = None, fill: str = "zero",
                   metric: str = "cosine", **kernel_opts) -> jax.Array:
  """`jaxrep.distances.kernels.zest_distances` with sharded forward passes.

  Every device runs `jaxrep.distances.kernels.zest_fit` on its own providers (the
  references, masks and pseudo-inverses are the same on every device); the
  fit (compact: [n, R, S, C] outputs) is then gathered and the signatures
  compared exactly as `zest_distances` does. See `_zest_fit_blocks` for why
  the per-device fits do not run in one multi-device program on CPU.
  """
  require(metric in METRICS, "metric",
          f"must be one of {METRICS}; got {metric!r}")
  params = shard_provider_tree(params, mesh, "params")
  model_state = _shard_state(model_state, mesh)
  fit = _zest_fit_blocks(apply_fn, params, model_state,
                         jnp.asarray(reference_x), key, mesh, grid=grid,
                         num_perturbations=num_perturbations,
                         num_references=num_references, fill=fill)
  # The tail of distances.zest_distances (no public entry point takes a fit;
  # see the proposed `zest_distances_from_fit` in BUILD_NOTES.md).
  n = fit.outputs.shape[0]
  r = dist_lib._centre_row_index(fit.outputs.reshape(n, -1), **kernel_opts)
  base, offsets = dist_lib._zest_offsets(fit, r)
  return dist_lib._offset_distances(base, offsets, r, metric,
                                    **dist_lib._kernel_only(kernel_opts))


def model_distances(metric: str, mesh: Mesh, *, start_params=None,
                    params=None, model_state=None, apply_fn=None,
                    probe_x=None, key=None, **kwargs) -> jax.Array:
  """Dispatches any RTTD metric to its sharded implementation.

  Parameter metrics need `start_params` and `params` (the update end - start
  is compared); output / cka need `apply_fn`, `params`, `model_state`,
  `probe_x`; zest also `key` (it uses `probe_x` as references).
  """
  if metric in METRICS:
    upd = dist_lib.updates(start_params, params)
    return pairwise_distances(upd, mesh, metric, **kwargs)
  if metric == "output":
    return output_distances(apply_fn, params, model_state, probe_x, mesh,
                            **kwargs)
  if metric == "cka":
    return cka_distances(apply_fn, params, model_state, probe_x, mesh,
                         **kwargs)
  require(metric == "zest", "metric",
          f"must be one of {METRICS + ('output', 'cka', 'zest')}; got "
          f"{metric!r}")
  return zest_distances(apply_fn, params, model_state, probe_x, key, mesh,
                        **kwargs)
