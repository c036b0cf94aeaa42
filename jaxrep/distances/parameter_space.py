"""Parameter-space distances between the models of n providers.

RTTD flags a provider whose model sits far from the others. `updates` gives
each provider's update end - start of a sub-run; `pairwise_distances`
compares them with L2, cosine (1 - cos), L1 or L-inf, returning a symmetric
[n, n] matrix with zeros on the diagonal. The population is a 2-D array
[n, P] or a pytree whose leaves carry a leading provider axis [n, ...]; it
is streamed leaf by leaf and never concatenated.

On one device the whole population is one row set of the kernels in
`numerics.py` (robust centre, centred Gram product, exact fix-up; see there
for why). With a `mesh` the providers stay split over its devices and the
ring of `ring.py` runs the same kernels block by block.

Memory: the Gram path holds O(n * chunk) floats at a time, the tile path
O(block^2 * chunk); both are bounded by `max_bytes` (plus the O(n^2)
result). Nothing of size n x n x P (or n x P beyond the caller's input) is
built.

`offset_distances` compares rows given as a base plus accurate offsets (the
CKA and Zest metrics build their signatures that way).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from jaxrep.core.errors import require
from jaxrep.distances import numerics as nm
from jaxrep.distances import ring

KERNEL_OPTIONS = ("block_size", "chunk_size", "max_bytes", "centre_sample",
                  "fixup_tol")


def updates(start_params, end_params):
  """Per-provider updates end - start of a sub-run, as a pytree.

  Args:
    start_params: the sub-run's starting checkpoint, either a single model
      (leaves without the provider axis, broadcast to every provider) or a
      population with the same shapes as `end_params`.
    end_params: the returned models, leaves [n, ...].

  Returns:
    A pytree shaped like `end_params` holding end - start.
  """
  s_def = jax.tree_util.tree_structure(start_params)
  e_def = jax.tree_util.tree_structure(end_params)
  require(s_def == e_def, "start_params",
          f"must have the same tree structure as end_params; got {s_def} vs "
          f"{e_def}")

  def diff(s, e):
    s, e = jnp.asarray(s), jnp.asarray(e)
    require(s.shape == e.shape or (e.ndim >= 1 and s.shape == e.shape[1:]),
            "start_params",
            f"leaf shape {s.shape} must equal the end leaf shape {e.shape} or "
            "that shape without its leading provider axis")
    dtype = nm.float_dtype([s.dtype, e.dtype])
    return e.astype(dtype) - s.astype(dtype)

  return jax.tree_util.tree_map(diff, start_params, end_params)


@functools.partial(jax.jit, static_argnames=("metric", "sizes", "auto_centre"))
def _pairwise_jit(leaves, centre, metric: str, sizes: nm.Sizes,
                  auto_centre: bool):
  rows = [nm.Rows(*leaf) for leaf in leaves]
  centres = None
  if metric in nm.GRAM_METRICS:
    if auto_centre:
      sample = nm.centre_sample([r.x for r in rows], sizes.centre_sample)
      centre = nm.densest_row(sample, sizes.block, sizes.tile_chunk)
    centres = nm.centre_vectors(rows, centre)
  stats = nm.row_stats(metric, rows, centres, sizes.chunk)
  parts = nm.pair_tiles(metric, rows, stats, rows, stats, centres, sizes,
                        diagonal=True)
  return nm.finalize(nm.combine(metric, parts, stats.norm2), stats.bad)


def _run(rows: list[nm.Rows], metric: str, *, centre,
         **options) -> jax.Array:
  nm.check_metric(metric)
  n = rows[0].x.shape[0]
  sizes = nm.sizes(n, jnp.dtype(rows[0].x.dtype).itemsize, **options)
  centre = nm.check_centre(centre, n)
  auto = centre is None
  return _pairwise_jit([tuple(r) for r in rows],
                       jnp.int32(0 if auto else centre), metric, sizes, auto)


def pairwise_distances(x, metric: str = "l2", *, mesh=None,
                       block_size: int = nm.DEFAULT_BLOCK_SIZE,
                       chunk_size: Optional[int] = None,
                       max_bytes: int = nm.DEFAULT_MAX_BYTES,
                       centre: Optional[int] = None,
                       centre_sample: int = nm.DEFAULT_CENTRE_SAMPLE,
                       fixup_tol: float = nm.DEFAULT_FIXUP_TOL) -> jax.Array:
  """Pairwise distances between providers in parameter space.

  Args:
    x: the population, a 2-D array [n, P] or a pytree whose leaves carry a
      leading provider axis [n, ...] (typically `updates(start, end)`).
    metric: "l2" (Euclidean), "cosine" (1 - cos, in [0, 2]), "l1" or "linf".
    mesh: None computes on one device; a mesh from
      `jaxrep.runtime.mesh.make_mesh` splits the providers over its devices
      (n must be a multiple of its size) and runs the ring of `ring.py`;
      sizes then apply per device.
    block_size: providers per tile of the direct-difference kernels (L1, L-inf
      and the fix-up pass of L2 / cosine).
    chunk_size: parameters per streamed chunk; None derives it from
      `max_bytes` (Gram path) and a cache-sized default (tile path).
    max_bytes: bound on the working set of a streamed chunk, about
      4 * n * chunk * itemsize for the Gram path and
      block^2 * chunk * itemsize for the tile path, plus the O(n^2) result.
    centre: row to centre on before the Gram product; None picks a row inside
      the densest cluster automatically.
    centre_sample: coordinates sampled (strided) to choose the centre.
    fixup_tol: a pair whose Gram squared distance is below this fraction of
      its centred squared norms is recomputed from direct differences.

  Returns:
    [n, n] float matrix (float32 unless the input is float64): symmetric,
    zero diagonal, non-negative, +inf for rows holding NaN / Inf. With a
    mesh it is replicated on every device.

  Raises:
    ConfigError: unknown metric, bad sizes, leaves without a shared leading
      provider axis, n not divisible by the mesh size.
  """
  options = dict(block_size=block_size, chunk_size=chunk_size,
                 max_bytes=max_bytes, centre_sample=centre_sample,
                 fixup_tol=fixup_tol)
  if mesh is not None:
    return ring.pairwise_distances(x, mesh, metric, centre=centre, **options)
  leaves, n, dtype = nm.population_leaves(x)
  rows = [nm.Rows(jnp.asarray(leaf).reshape(n, -1).astype(dtype))
          for leaf in leaves]
  return _run(rows, metric, centre=centre, **options)


def kernel_options(opts: dict) -> dict:
  """`pairwise_distances` options (without centre), checked and defaulted."""
  unknown = set(opts) - set(KERNEL_OPTIONS)
  require(not unknown, "kernel_opts",
          f"unknown options {sorted(unknown)}; allowed: {KERNEL_OPTIONS}")
  return dict(dict(block_size=nm.DEFAULT_BLOCK_SIZE, chunk_size=None,
                   max_bytes=nm.DEFAULT_MAX_BYTES,
                   centre_sample=nm.DEFAULT_CENTRE_SAMPLE,
                   fixup_tol=nm.DEFAULT_FIXUP_TOL), **opts)


@functools.partial(jax.jit, static_argnames=("sizes",))
def _centre_jit(rows, sizes: nm.Sizes):
  sample = nm.centre_sample([rows], sizes.centre_sample)
  return nm.densest_row(sample, sizes.block, sizes.tile_chunk)


def robust_centre_row(rows: jax.Array, opts: dict) -> jax.Array:
  """Robust centre row of a small [n, m] matrix (see `numerics.densest_row`).

  opts: from `kernel_options`.
  """
  sizes = nm.sizes(rows.shape[0], jnp.dtype(rows.dtype).itemsize,
                   block_size=opts["block_size"], chunk_size=None,
                   max_bytes=opts["max_bytes"],
                   centre_sample=opts["centre_sample"], fixup_tol=0.0)
  return _centre_jit(rows, sizes)


def offset_distances(base: jax.Array, offsets: jax.Array, centre,
                     metric: str, opts: dict) -> jax.Array:
  """Distances between the rows base + offsets[i]; offsets[centre] is zero.

  Offsets computed accurately (e.g. from differences of outputs) keep
  near-identical rows at full relative accuracy. opts: from
  `kernel_options`.
  """
  n = offsets.shape[0]
  offsets = offsets.reshape(n, -1)
  rows = nm.Rows(offsets, base.reshape(-1) if metric == "cosine" else None)
  return _run([rows], metric, centre=centre, **opts)
