"""Parameter-space distances with the providers split over a mesh: a ring.

Device i holds its block of b = n / d providers (every leaf, never
concatenated), inside `shard_map`. Blocks rotate with `lax.ppermute`; at
step s device i pairs its own block with block (i + s) mod d. Steps
s = 0 .. floor(d / 2) cover every unordered block pair, so each device
computes about n^2 P / d^2 of the work and holds three blocks (own,
visiting, incoming), never the n x P population.

Every block pair runs `numerics.pair_tiles`, the same kernel the single
device runs on its one row set (robust centre, centred Gram product with
Kahan sums, exact fix-up; direct tiles for L1 / L-inf). The [b, b] tiles
are small: they are gathered and assembled into the n x n matrix, which
`numerics.combine` and `numerics.finalize` turn into distances as on one
device.

The robust centre is chosen as on one device (`numerics.densest_row`) from
the strided coordinate sample, the only part of the population gathered;
the centre row is then broadcast around the ring by a psum.

`working_set_bytes` is this kernel's memory model (`jaxrep.runtime.memory`
takes its result).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrep.distances import numerics as nm
from jaxrep.runtime import mesh as mesh_lib

PROVIDERS = mesh_lib.PROVIDERS


def _centre_vectors(own: list[nm.Rows], centre) -> list[jax.Array]:
  """The centre row (held by one device) on every device, made finite."""
  b = own[0].x.shape[0]
  me = lax.axis_index(PROVIDERS)
  owner, local = centre // b, centre % b
  vectors = []
  for r in own:
    row = lax.dynamic_index_in_dim(r.x, local, axis=0, keepdims=False)
    row = lax.psum(jnp.where(me == owner, row, 0), PROVIDERS)
    vectors.append(nm.sanitize(row))
  return vectors


def _ring_body(metric: str, sizes: nm.Sizes, num_devices: int):
  """Per-device body of the ring kernel (runs inside shard_map)."""
  steps = num_devices // 2 + 1
  perm = [(j, (j - 1) % num_devices) for j in range(num_devices)]

  def body(leaves, centre):
    b = leaves[0].shape[0]
    own = [nm.Rows(leaf.reshape(b, -1)) for leaf in leaves]
    centres = (_centre_vectors(own, centre) if metric in nm.GRAM_METRICS
               else None)
    stats = nm.row_stats(metric, own, centres, sizes.chunk)

    def pair(other, other_stats, diagonal):
      return nm.pair_tiles(metric, own, stats, other, other_stats, centres,
                           sizes, diagonal)

    tiles0 = pair(own, stats, diagonal=True)
    if steps == 1:
      tiles = [t[None] for t in tiles0]
    else:
      def step(carry, _):
        carry = lax.ppermute(carry, PROVIDERS, perm)
        return carry, pair(*carry, diagonal=False)
      _, rest = lax.scan(step, (own, stats), None, length=steps - 1)
      tiles = [jnp.concatenate([t0[None], t], axis=0)
               for t0, t in zip(tiles0, rest)]
    return tuple(tiles), stats.norm2, stats.bad

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


@functools.lru_cache(maxsize=None)
def ring_fn(mesh: Mesh, metric: str, sizes: nm.Sizes, num_leaves: int):
  """The jitted ring kernel (leaves, centre) -> [n, n] for a mesh, metric,
  static sizes (per device) and number of leaves."""
  d = mesh_lib.mesh_size(mesh)
  replicated = mesh_lib.replicated_sharding(mesh)
  mapped = jax.shard_map(_ring_body(metric, sizes, d), mesh=mesh,
                         in_specs=([P(PROVIDERS)] * num_leaves, P()),
                         out_specs=P(PROVIDERS))

  def run(leaves, centre):
    tiles, norm2, bad = mapped(leaves, centre)
    # Gather the small tiles once; the n x n assembly then runs locally.
    tiles, norm2, bad = lax.with_sharding_constraint((tiles, norm2, bad),
                                                     replicated)
    parts = tuple(_assemble(t, d) for t in tiles)
    return nm.finalize(nm.combine(metric, parts, norm2), bad)

  return jax.jit(run, out_shardings=replicated)


@functools.lru_cache(maxsize=None)
def _sample_fn(mesh: Mesh, sample: int):
  """Jitted strided coordinate sample, gathered to every device."""
  return jax.jit(lambda leaves: nm.centre_sample(leaves, sample),
                 out_shardings=mesh_lib.replicated_sharding(mesh))


_densest_row = jax.jit(nm.densest_row, static_argnames=("block", "chunk"))


def _choose_centre(leaves, mesh: Mesh, sizes: nm.Sizes) -> int:
  """The robust centre of a provider-sharded population (see module doc)."""
  sample = _sample_fn(mesh, sizes.centre_sample)(leaves)
  return int(mesh_lib.to_host(_densest_row(sample, block=sizes.block,
                                           chunk=sizes.tile_chunk)))


def pairwise_distances(x, mesh: Mesh, metric: str, *, centre: Optional[int],
                       **options) -> jax.Array:
  """`jaxrep.distances.pairwise_distances(x, metric, mesh=mesh, ...)`.

  Same metrics, options (block_size, chunk_size, max_bytes, centre_sample,
  fixup_tol; all required here) and guarantees as on one device (symmetric,
  zero diagonal, non-negative, +inf for non-finite rows); sizes apply per
  device. `x` (sharded or not) is placed provider-sharded on `mesh`; n must
  be a multiple of the mesh size. Returns the [n, n] matrix replicated on
  every device.
  """
  nm.check_metric(metric)
  leaves, n, dtype = nm.population_leaves(x)
  leaves = mesh_lib.shard_provider_tree(leaves, mesh, "x")
  if any(leaf.dtype != dtype for leaf in leaves):
    leaves = [leaf.astype(dtype) for leaf in leaves]
  sizes = nm.sizes(n // mesh_lib.mesh_size(mesh), jnp.dtype(dtype).itemsize,
                   **options)
  centre = nm.check_centre(centre, n)
  if centre is None:
    centre = (_choose_centre(leaves, mesh, sizes)
              if metric in nm.GRAM_METRICS else 0)
  run = ring_fn(mesh, metric, sizes, len(leaves))
  return run(leaves, mesh_lib.replicate_tree(np.int32(centre), mesh))


def working_set_bytes(providers: int, devices: int, param_bytes: int,
                      max_bytes: int = nm.DEFAULT_MAX_BYTES) -> int:
  """Bytes per device the parameter-space kernels hold for n providers.

  Three blocks of n / d updates (own, visiting, incoming), the streamed
  working sets capped by `max_bytes` (the Gram chunks, about four
  [block, chunk] arrays, and one direct tile of block_size^2 x tile chunk
  floats) and a few n x n float32 matrices. With one device it bounds the
  single-device kernel too.

  Args:
    providers: n.
    devices: d, the mesh size (1 without a mesh).
    param_bytes: bytes of ONE provider's update (its parameters).
    max_bytes: the kernels' `max_bytes` option.
  """
  n = providers
  block = -(-n // devices)
  gram = min(max_bytes, 4 * block * param_bytes)
  tile = min(max_bytes, nm.DEFAULT_BLOCK_SIZE ** 2
             * min(nm.DEFAULT_TILE_CHUNK * 4, param_bytes))
  return 3 * block * param_bytes + gram + tile + 6 * n * n * 4
