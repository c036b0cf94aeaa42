"""The numerics of the parameter-space distances, written once.

Both drivers of the L2, cosine, L1 and L-inf kernels call the functions here:
the single-device kernel (`parameter_space.py`) with the whole population as
one row set, the ring (`ring.py`) with a device's own block of providers and
the block visiting it. A row set is a list of `Rows`, one [m, p] block per
leaf of the population, streamed leaf by leaf and chunk by chunk, never
concatenated.

Benign replicas differ by about 1e-6 of the update norm, so their squared
distance is about 1e-12 of the squared norms, far below float32 resolution:
the Gram identity |a|^2 + |b|^2 - 2 a.b returns noise there. Hence

1. rows are centred on a *robust centre*: a provider row inside the densest
   cluster (`densest_row`: the row whose ceil(n/2) nearest rows are closest,
   by exact direct differences on the strided sample `centre_sample` of at
   most `Sizes.centre_sample` coordinates). Subtracting a nearby row is exact
   or correctly rounded, so the benign cluster keeps full relative precision;
2. the Gram product of the centred rows (`gram_tile`) runs at
   `Precision.HIGHEST` (TPUs and recent GPUs default to bf16 / TF32), with
   Kahan-compensated sums across chunks, and is clamped at zero;
3. pairs the Gram product cannot resolve (squared distance below `fixup_tol`
   times the sum of their centred squared norms, e.g. a tight cluster of
   colluding attackers far from the centre) are flagged, and every
   [block, block] tile holding a flagged pair is recomputed from direct
   differences x_i - x_j (`fixup`).

Cosine distance uses 1 - cos(a, b) = (|a - b|^2 - (|a| - |b|)^2) / (2|a||b|)
with |a| - |b| = (|a|^2 - |b|^2) / (|a| + |b|), where |a|^2 - |b|^2 comes
from the centred quantities (or from direct differences (a - b).(a + b) in
the fix-up), so near-identical rows keep relative accuracy on a distance of
1e-12. L1 and L-inf have no matrix-product form: they are computed from
direct differences on [block, block, chunk] tiles (`direct_matrix`).

Non-finite input: a row holding NaN or Inf (or, for L2 / cosine, whose
squared norm overflows) is flagged `bad`; `finalize` puts it at +inf from
every other row and leaves every other entry alone.

Loop carries start from `jnp.zeros_like` of the input rows, so inside
`shard_map` they vary over the mesh axis like the rows do.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrep.core.errors import require

PARAM_METRICS = ("l2", "cosine", "l1", "linf")
GRAM_METRICS = ("l2", "cosine")

HIGHEST = lax.Precision.HIGHEST
DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_BLOCK_SIZE = 64
DEFAULT_TILE_CHUNK = 512
DEFAULT_CENTRE_SAMPLE = 256
DEFAULT_FIXUP_TOL = 0.05


# --------------------------------------------------------------------------
# Inputs and options.


class Rows(NamedTuple):
  """One leaf of a row set: [m, p] rows, optionally offsets from `base`.

  With `base` None the rows are raw coordinates (centred on the robust
  centre row). Otherwise rows are accurate offsets y_i from a common base
  vector [p], i.e. the vectors compared are base + y_i.
  """
  x: jax.Array
  base: Optional[jax.Array] = None


class Sizes(NamedTuple):
  """Static sizes of a kernel (see `sizes`)."""
  block: int          # rows per direct-difference tile
  chunk: int          # parameters per streamed chunk of the Gram product
  tile_chunk: int     # parameters per chunk of a direct-difference tile
  centre_sample: int  # coordinates sampled to choose the robust centre
  fixup_tol: float


def check_metric(metric: str) -> None:
  require(metric in PARAM_METRICS, "metric",
          f"must be one of {PARAM_METRICS}; got {metric!r}")


def float_dtype(dtypes) -> Any:
  """The float dtype distances are computed in (at least float32)."""
  dtype = jnp.result_type(*dtypes)
  if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
    dtype = jnp.float32
  return dtype


def population_leaves(x, name: str = "x") -> tuple[list, int, Any]:
  """Validates a population; returns (non-empty leaves, n, float dtype).

  `x` is a 2-D array [n, P] or a pytree whose leaves carry a leading
  provider axis [n, ...]. Leaves are returned as given (not copied, moved or
  cast), so sharded leaves stay where they are.
  """
  leaves = jax.tree_util.tree_leaves(x)
  require(len(leaves) > 0, name,
          "must be a 2-D array [n, P] or a non-empty pytree of arrays with a "
          "leading provider axis [n, ...]")
  for leaf in leaves:
    require(hasattr(leaf, "shape") and len(leaf.shape) >= 1, name,
            "every leaf must be an array with a leading provider axis "
            f"[n, ...]; got {type(leaf).__name__} of shape "
            f"{getattr(leaf, 'shape', None)}")
  n = leaves[0].shape[0]
  require(n >= 1, name, "needs at least one provider (leading axis n >= 1)")
  shapes = [tuple(leaf.shape) for leaf in leaves]
  require(all(s[0] == n for s in shapes), name,
          f"all leaves must share the leading provider axis n; got shapes "
          f"{shapes}")
  dtype = float_dtype([leaf.dtype for leaf in leaves])
  leaves = [leaf for leaf in leaves if math.prod(leaf.shape) > 0]
  require(len(leaves) > 0, name, "has no parameters (every leaf is empty)")
  return leaves, n, dtype


def check_centre(centre, n: int) -> Optional[int]:
  """None (automatic) or a validated row index in [0, n)."""
  if centre is None:
    return None
  if isinstance(centre, jax.Array) and centre.ndim == 0:
    centre = int(centre)
  require(isinstance(centre, (int, np.integer)) and 0 <= centre < n,
          "centre", f"must be None (automatic) or a row index in [0, {n}); "
          f"got {centre!r}")
  return int(centre)


def sizes(rows: int, itemsize: int, *, block_size, chunk_size, max_bytes,
          centre_sample, fixup_tol) -> Sizes:
  """Validates the kernel options and derives static tile / chunk sizes.

  Args:
    rows: providers one device holds (n, or n / d on a ring of d devices).
    itemsize: bytes per float.
    block_size, chunk_size, max_bytes, centre_sample, fixup_tol: the
      options of `jaxrep.distances.pairwise_distances`.
  """
  require(isinstance(max_bytes, (int, np.integer)) and max_bytes > 0,
          "max_bytes", f"must be a positive int (bytes); got {max_bytes!r}")
  require(isinstance(block_size, (int, np.integer)) and block_size >= 1,
          "block_size", f"must be an int >= 1; got {block_size!r}")
  require(chunk_size is None or (isinstance(chunk_size, (int, np.integer))
                                 and chunk_size >= 1),
          "chunk_size", f"must be None or an int >= 1; got {chunk_size!r}")
  require(isinstance(centre_sample, (int, np.integer)) and centre_sample >= 1,
          "centre_sample", f"must be an int >= 1; got {centre_sample!r}")
  require(isinstance(fixup_tol, (float, int)) and 0 <= fixup_tol < 1,
          "fixup_tol", f"must be a float in [0, 1); got {fixup_tol!r}")
  block = int(min(block_size, rows))
  gram_cap = max_bytes // (4 * rows * itemsize)
  tile_cap = max_bytes // (block * block * itemsize)
  require(gram_cap >= 1 and tile_cap >= 1, "max_bytes",
          f"{max_bytes} bytes is too small for {rows} providers per device "
          f"and block_size={block}; need at least "
          f"{max(4 * rows, block * block) * itemsize}")
  if chunk_size is None:
    chunk = max(128, (gram_cap // 128) * 128) if gram_cap >= 128 else gram_cap
    tile_chunk = min(DEFAULT_TILE_CHUNK, tile_cap)
  else:
    chunk = min(int(chunk_size), gram_cap)
    tile_chunk = min(int(chunk_size), tile_cap)
  return Sizes(block, int(chunk), int(tile_chunk), int(centre_sample),
               float(fixup_tol))


# --------------------------------------------------------------------------
# Streaming.


def fold_chunks(p: int, chunk: int, fn, carry):
  """Folds fn(carry, start, size) over [0, p) in chunks of static size."""
  nfull, tail = divmod(p, chunk)
  if nfull == 1:
    carry = fn(carry, 0, chunk)
  elif nfull > 1:
    carry = lax.fori_loop(0, nfull, lambda k, c: fn(c, k * chunk, chunk),
                          carry)
  if tail:
    carry = fn(carry, nfull * chunk, tail)
  return carry


def fold_rows(rows: list[Rows], chunk: int, fn, carry):
  """Folds fn(carry, leaf index, start, size) over every leaf's chunks."""
  for i, r in enumerate(rows):
    carry = fold_chunks(r.x.shape[1], chunk,
                        lambda c, start, size, i=i: fn(c, i, start, size),
                        carry)
  return carry


def cols(a: jax.Array, start, size: int) -> jax.Array:
  """Columns [start, start + size) of the last axis."""
  return lax.dynamic_slice_in_dim(a, start, size, axis=a.ndim - 1)


def kahan_add(acc, value):
  """Compensated addition of `value` into the (sum, compensation) pair."""
  total, comp = acc
  y = value - comp
  t = total + y
  return t, (t - total) - y


def zeros_like_rows(rows: list[Rows], shape, dtype=None) -> jax.Array:
  """Zeros typed like the rows (varying over the mesh inside shard_map)."""
  return jnp.zeros_like(rows[0].x, dtype=dtype, shape=shape)


# --------------------------------------------------------------------------
# Tiles.


def tile_pairs(m: int, block: int, upper: bool) -> tuple[np.ndarray,
                                                         np.ndarray]:
  """Start rows (si, sj) of the [block, block] tiles of an [m, m] matrix.

  The last start is clamped to m - block. upper: only the tiles on or above
  the diagonal (enough for a symmetric matrix); else all of them.
  """
  starts = [min(i * block, m - block) for i in range(-(-m // block))]
  pairs = [(a, b) for ia, a in enumerate(starts)
           for b in (starts[ia:] if upper else starts)]
  return (np.asarray([a for a, _ in pairs], np.int32),
          np.asarray([b for _, b in pairs], np.int32))


def direct_tile(rows_a: list[Rows], rows_b: list[Rows], si, sj, block: int,
                chunk: int, kind: str) -> tuple:
  """Exact statistics of a [block, block] tile from direct differences.

  Rows si.. of `rows_a` against rows sj.. of `rows_b` (the same leaves and
  bases). kind: "l1" -> (sum |d|,); "linf" -> (max |d|,); "l2" ->
  (sum d^2,); "cosine" -> (sum d^2, sum d * s) with d = a - b, s = a + b,
  the second term being |a|^2 - |b|^2.
  """
  zeros = zeros_like_rows(rows_a, (block, block))
  carry = (zeros, zeros) if kind == "cosine" else zeros

  def fn(acc, i, start, size):
    a = lax.dynamic_slice(rows_a[i].x, (si, start), (block, size))
    b = lax.dynamic_slice(rows_b[i].x, (sj, start), (block, size))
    d = a[:, None, :] - b[None, :, :]
    if kind == "l1":
      return acc + jnp.sum(jnp.abs(d), axis=-1)
    if kind == "linf":
      return jnp.maximum(acc, jnp.max(jnp.abs(d), axis=-1))
    if kind == "l2":
      return acc + jnp.sum(d * d, axis=-1)
    s = a[:, None, :] + b[None, :, :]
    if rows_a[i].base is not None:
      s = s + 2 * cols(rows_a[i].base, start, size)
    return acc[0] + jnp.sum(d * d, axis=-1), acc[1] + jnp.sum(d * s, axis=-1)

  carry = fold_rows(rows_a, chunk, fn, carry)
  return carry if kind == "cosine" else (carry,)


def direct_matrix(rows_a: list[Rows], rows_b: list[Rows], pairs,
                  block: int, chunk: int, kind: str) -> jax.Array:
  """[m_a, m_b] elementwise metric ("l1", "linf", "l2") on the given tiles;
  entries outside them are zero."""
  def step(d, s):
    (tile,) = direct_tile(rows_a, rows_b, s[0], s[1], block, chunk, kind)
    return lax.dynamic_update_slice(d, tile, (s[0], s[1])), None

  d0 = zeros_like_rows(rows_a, (rows_a[0].x.shape[0], rows_b[0].x.shape[0]))
  d, _ = lax.scan(step, d0, tuple(jnp.asarray(p) for p in pairs))
  return d


def fixup(rows_a: list[Rows], rows_b: list[Rows], flag: jax.Array,
          values: tuple, pairs, block: int, chunk: int, kind: str) -> tuple:
  """Replaces the flagged entries of `values` by direct values, computing
  only the tiles (of `pairs`) that hold a flagged pair."""
  def step(vals, s):
    f = lax.dynamic_slice(flag, (s[0], s[1]), (block, block))
    olds = tuple(lax.dynamic_slice(v, (s[0], s[1]), (block, block))
                 for v in vals)
    tiles = lax.cond(
        jnp.any(f),
        lambda: direct_tile(rows_a, rows_b, s[0], s[1], block, chunk, kind),
        lambda: olds)
    return tuple(lax.dynamic_update_slice(v, jnp.where(f, t, old),
                                          (s[0], s[1]))
                 for v, t, old in zip(vals, tiles, olds)), None

  vals, _ = lax.scan(step, tuple(values),
                     tuple(jnp.asarray(p) for p in pairs))
  return vals


# --------------------------------------------------------------------------
# Robust centre.


def centre_sample(leaves: list[jax.Array], sample: int) -> jax.Array:
  """[n, m] strided sample of every provider's coordinates, m at most
  max(sample, number of leaves)."""
  rows = [leaf.reshape(leaf.shape[0], -1) for leaf in leaves]
  total = sum(r.shape[1] for r in rows)
  stride = max(1, total // sample)
  sub = jnp.concatenate([r[:, ::stride] for r in rows], axis=1)
  return sub[:, :max(sample, len(rows))]


def densest_row(sub: jax.Array, block: int, chunk: int) -> jax.Array:
  """Index of the row of `sub` whose ceil(n/2) nearest rows (by exact squared
  differences) are closest in total; rows holding NaN / Inf never win."""
  n = sub.shape[0]
  finite = jnp.all(jnp.isfinite(sub), axis=1)
  rows = [Rows(jnp.where(finite[:, None], sub, 0))]
  blk = min(block, n)
  d2 = mirror_upper(direct_matrix(rows, rows, tile_pairs(n, blk, upper=True),
                                  blk, chunk, "l2"))
  nearest = -lax.top_k(-d2, (n + 1) // 2)[0]
  score = jnp.where(finite, jnp.sum(nearest, axis=1), jnp.inf)
  return jnp.argmin(score).astype(jnp.int32)


def sanitize(c: jax.Array) -> jax.Array:
  """The centre with non-finite coordinates set to zero."""
  return jnp.where(jnp.isfinite(c), c, 0)


def centre_vectors(rows: list[Rows], centre) -> list[jax.Array]:
  """Per leaf, the finite vector rows are centred on: the base of offset
  rows, else row `centre`."""
  return [sanitize(r.base if r.base is not None else
                   lax.dynamic_index_in_dim(r.x, centre, axis=0,
                                            keepdims=False))
          for r in rows]


# --------------------------------------------------------------------------
# Per-row statistics and block pairs.


class RowStats(NamedTuple):
  """Per-row statistics of a row set (all [m])."""
  sq: jax.Array      # centred squared norms |y_i|^2 (L2 / cosine)
  cross: jax.Array   # y_i . c (cosine)
  norm2: jax.Array   # |x_i|^2 (cosine)
  bad: jax.Array     # bool: non-finite row (or squared norm)


def _centred(r: Rows, c_cols: jax.Array, start, size: int) -> jax.Array:
  x = cols(r.x, start, size)
  return x if r.base is not None else x - c_cols[None, :]


def nonfinite_rows(rows: list[Rows], chunk: int) -> jax.Array:
  """[m] bool: rows holding any NaN / Inf."""
  def fn(bad, i, start, size):
    vals = cols(rows[i].x, start, size)
    if rows[i].base is not None:
      vals = vals + cols(rows[i].base, start, size)[None, :]
    return bad | ~jnp.all(jnp.isfinite(vals), axis=1)

  m = rows[0].x.shape[0]
  return fold_rows(rows, chunk, fn, zeros_like_rows(rows, (m,), bool))


def row_stats(metric: str, rows: list[Rows], centres, chunk: int) -> RowStats:
  """`RowStats` of a row set, compensated over chunks.

  L1 / L-inf need only `bad` (the other fields are zero). For L2 / cosine
  the rows are centred on `centres` (from `centre_vectors`), and a row is
  bad when its squared norm is not finite.
  """
  m = rows[0].x.shape[0]
  z = zeros_like_rows(rows, (m,))
  if metric not in GRAM_METRICS:
    return RowStats(z, z, z, nonfinite_rows(rows, chunk))
  cosine = metric == "cosine"

  def fn(carry, i, start, size):
    sq, cross, norm2 = carry
    c = cols(centres[i], start, size)
    y = _centred(rows[i], c, start, size)
    sq = kahan_add(sq, jnp.sum(y * y, axis=1))
    if cosine:
      # A fused multiply-reduce, not a matrix-vector product: XLA folds it
      # into the same pass over y as the squared norms.
      cross = kahan_add(cross, jnp.sum(y * c[None, :], axis=1))
      full = (c[None, :] + y if rows[i].base is not None
              else cols(rows[i].x, start, size))
      norm2 = kahan_add(norm2, jnp.sum(full * full, axis=1))
    return sq, cross, norm2

  (sq, _), (cross, _), (norm2, _) = fold_rows(rows, chunk, fn,
                                              ((z, z), (z, z), (z, z)))
  return RowStats(sq, cross, norm2, ~jnp.isfinite(sq) | ~jnp.isfinite(norm2))


def gram_tile(rows_a: list[Rows], rows_b: list[Rows], centres,
              chunk: int) -> jax.Array:
  """Centred Gram product [m_a, m_b] of two row sets, compensated over chunks.

  Rows are not sanitized: a matrix product keeps a non-finite row inside its
  own row / column, where `RowStats.bad` catches it. Only the centre must be
  finite.
  """
  zeros = zeros_like_rows(rows_a, (rows_a[0].x.shape[0],
                                   rows_b[0].x.shape[0]))

  def fn(acc, i, start, size):
    c = cols(centres[i], start, size)
    ya = _centred(rows_a[i], c, start, size)
    yb = _centred(rows_b[i], c, start, size)
    return kahan_add(acc, jnp.dot(ya, yb.T, precision=HIGHEST))

  return fold_rows(rows_a, chunk, fn, (zeros, zeros))[0]


def pair_tiles(metric: str, rows_a: list[Rows], stats_a: RowStats,
               rows_b: list[Rows], stats_b: RowStats, centres, sizes: Sizes,
               diagonal: bool) -> tuple:
  """The [m_a, m_b] parts of the distances between two row sets.

  Returns (d,) for L1 / L-inf, (d2,) for L2 and (d2, |a|^2 - |b|^2) for
  cosine; `combine` turns them into distances. diagonal: the two sets are
  the same rows; only the upper triangle is valid (see `mirror_upper`).
  """
  m = rows_a[0].x.shape[0]
  pairs = tile_pairs(m, sizes.block, upper=diagonal)
  if metric not in GRAM_METRICS:
    return (direct_matrix(rows_a, rows_b, pairs, sizes.block,
                          sizes.tile_chunk, metric),)
  g = gram_tile(rows_a, rows_b, centres, sizes.chunk)
  sum_sq = stats_a.sq[:, None] + stats_b.sq[None, :]
  d2 = jnp.maximum(sum_sq - 2 * g, 0)
  flag = ((d2 < sizes.fixup_tol * sum_sq) & ~stats_a.bad[:, None]
          & ~stats_b.bad[None, :])
  if diagonal:
    flag = flag & (jnp.arange(m)[:, None] < jnp.arange(m)[None, :])
  values = (d2,)
  if metric == "cosine":
    values += ((stats_a.sq[:, None] - stats_b.sq[None, :])
               + 2 * (stats_a.cross[:, None] - stats_b.cross[None, :]),)
  return fixup(rows_a, rows_b, flag, values, pairs, sizes.block,
               sizes.tile_chunk, metric)


# --------------------------------------------------------------------------
# From parts to the distance matrix.


def cosine_from_parts(d2, dn2, norm2):
  """1 - cos from |a - b|^2, |a|^2 - |b|^2 and the squared norms."""
  nrm = jnp.sqrt(norm2)
  ni, nj = nrm[:, None], nrm[None, :]
  dn = dn2 / jnp.where(ni + nj > 0, ni + nj, 1)
  num = jnp.maximum(d2 - dn * dn, 0)
  safe_i = jnp.where(ni > 0, ni, 1)
  safe_j = jnp.where(nj > 0, nj, 1)
  cos_d = jnp.minimum(0.5 * (num / safe_i) / safe_j, 2)
  either_zero = (ni == 0) | (nj == 0)
  both_zero = (ni == 0) & (nj == 0)
  return jnp.where(either_zero, jnp.where(both_zero, 0, 1), cos_d).astype(
      d2.dtype)


def combine(metric: str, parts: tuple, norm2: jax.Array) -> jax.Array:
  """The distance matrix from the parts of `pair_tiles` (any layout)."""
  if metric == "l2":
    return jnp.sqrt(parts[0])
  if metric == "cosine":
    return cosine_from_parts(parts[0], parts[1], norm2)
  return parts[0]


def mirror_upper(d: jax.Array) -> jax.Array:
  """Exactly symmetric matrix from the upper triangle of `d`."""
  # Not jnp.where(iota_mask, d, d.T): that fusion segfaults on the XLA CPU
  # backend of jax 0.10.2 for n >= 1024.
  return jnp.triu(d) + jnp.triu(d, 1).T


def finalize(d: jax.Array, bad: jax.Array) -> jax.Array:
  """Symmetric, non-negative, +inf rows/cols for bad rows, zero diagonal."""
  d = mirror_upper(d)
  d = jnp.where(bad[:, None] | bad[None, :] | jnp.isnan(d), jnp.inf, d)
  d = jnp.maximum(d, 0)
  return jnp.where(jnp.eye(d.shape[0], dtype=bool), 0, d)
