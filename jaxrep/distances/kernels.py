"""Pairwise distances between the models returned by n providers.

RTTD flags a provider whose model sits far from the others, so every metric
here returns a symmetric [n, n] matrix with zeros on the diagonal:

* parameter space (`pairwise_distances`): L2, cosine (1 - cos), L1 and L-inf
  between rows of a population of updates, given as a 2-D array [n, P] or as a
  pytree whose leaves carry a leading provider axis [n, ...];
* output space (`output_distances`): mean total-variation distance between the
  providers' softmax outputs on a probe set (or mean absolute logit gap);
* representation (`cka_distances`): 1 - linear CKA of penultimate activations;
* Zest (`zest_distances`): distance between LIME-style linear-surrogate
  signatures (Jia et al., ICLR 2022).

Numerics. Benign replicas differ by about 1e-6 of the update norm, so the
squared distance is about 1e-12 of the squared norms, far below float32
resolution: the Gram identity |a|^2 + |b|^2 - 2 a.b returns noise there. The
kernels therefore

1. centre every row on a *robust centre*: a provider row chosen inside the
   densest cluster (the row whose ceil(n/2) nearest rows are closest, measured
   by exact direct differences on a strided sample of <= `centre_sample`
   coordinates). Subtracting a nearby row is exact or correctly rounded, so the
   benign cluster keeps full relative precision after centring;
2. form the Gram product of the centred rows with `Precision.HIGHEST`,
   streaming over leaves and parameter chunks with compensated summation
   across chunks, and clamp at zero;
3. flag the pairs the Gram product cannot resolve (squared distance below
   `fixup_tol` times the sum of their centred squared norms, e.g. a tight
   cluster of colluding attackers far from the centre) and recompute every
   provider tile that holds a flagged pair from direct differences x_i - x_j.

Cosine distance uses 1 - cos(a, b) = (|a - b|^2 - (|a| - |b|)^2) / (2|a||b|)
with |a| - |b| = (|a|^2 - |b|^2) / (|a| + |b|), and |a|^2 - |b|^2 obtained
from the centred quantities (or direct differences (a - b).(a + b) in the
fix-up), so near-identical rows keep relative accuracy on a distance of 1e-12.

L1 and L-inf cannot use a matrix product: they are computed from direct
differences on [block, block, chunk] tiles, upper-triangle tiles only, mirrored.

Memory: the Gram path holds O(n * chunk) floats at a time, the tile path
O(block^2 * chunk); both are bounded by `max_bytes` (plus the O(n^2) result).
Nothing of size n x n x P (or even n x P beyond the caller's own input) is
built.

Non-finite input: a provider whose row holds NaN or Inf (or whose squared
norm overflows) is at distance +inf from everyone else, its diagonal entry is
0 and no other entry is affected.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from jaxrep.core.errors import ConfigError, require

METRICS = ("l2", "cosine", "l1", "linf")
OUTPUT_SPACES = ("probs", "logits")
ZEST_FILLS = ("zero", "mean")

_HI = lax.Precision.HIGHEST
DEFAULT_MAX_BYTES = 64 * 2**20
DEFAULT_BLOCK_SIZE = 64
DEFAULT_TILE_CHUNK = 512
DEFAULT_CENTRE_SAMPLE = 256
DEFAULT_FIXUP_TOL = 0.05


# --------------------------------------------------------------------------
# Input handling.


class _Leaf(NamedTuple):
  """One streamed [n, p] block of rows, optionally offsets from `base`.

  With `base` None the rows are raw coordinates (centred internally on the
  robust centre row). Otherwise rows are accurate offsets y_i from a common
  base vector [p], i.e. the vectors compared are base + y_i.
  """
  x: jax.Array
  base: Optional[jax.Array] = None


def _float_dtype(dtypes) -> Any:
  dtype = jnp.result_type(*dtypes)
  if not jnp.issubdtype(dtype, jnp.floating) or jnp.finfo(dtype).bits < 32:
    dtype = jnp.float32
  return dtype


def _population_rows(x, name: str = "x") -> tuple[list[jax.Array], int]:
  """[n, p_l] views of every leaf of a population pytree (or 2-D array)."""
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
  dtype = _float_dtype([leaf.dtype for leaf in leaves])
  rows = [jnp.asarray(leaf).reshape(n, -1).astype(dtype) for leaf in leaves]
  rows = [r for r in rows if r.shape[1] > 0]
  require(len(rows) > 0, name, "has no parameters (every leaf is empty)")
  return rows, n


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
    dtype = _float_dtype([s.dtype, e.dtype])
    return e.astype(dtype) - s.astype(dtype)

  return jax.tree_util.tree_map(diff, start_params, end_params)


# --------------------------------------------------------------------------
# Streaming helpers.


def _fold_chunks(p: int, chunk: int, fn, carry):
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


def _cols(a: jax.Array, start, size: int) -> jax.Array:
  return lax.dynamic_slice_in_dim(a, start, size, axis=a.ndim - 1)


def _kahan_add(acc, value):
  """Compensated addition of `value` into the (sum, compensation) pair."""
  total, comp = acc
  y = value - comp
  t = total + y
  return t, (t - total) - y


def _tile_starts(n: int, block: int) -> tuple[np.ndarray, np.ndarray]:
  """Start rows of the upper-triangle provider tiles (last block clamped)."""
  starts = [min(i * block, n - block) for i in range(-(-n // block))]
  pairs = [(a, b) for ia, a in enumerate(starts) for b in starts[ia:]]
  return (np.asarray([a for a, _ in pairs], np.int32),
          np.asarray([b for _, b in pairs], np.int32))


def _mirror_upper(d: jax.Array) -> jax.Array:
  """Exactly symmetric matrix from the upper triangle of `d`."""
  # Not jnp.where(iota_mask, d, d.T): that fusion segfaults on the XLA CPU
  # backend of jax 0.10.2 for n >= 1024.
  return jnp.triu(d) + jnp.triu(d, 1).T


def _finalize(d: jax.Array, bad: jax.Array) -> jax.Array:
  """Symmetric, non-negative, +inf rows/cols for bad providers, zero diagonal."""
  d = _mirror_upper(d)
  d = jnp.where(bad[:, None] | bad[None, :] | jnp.isnan(d), jnp.inf, d)
  d = jnp.maximum(d, 0)
  return jnp.where(jnp.eye(d.shape[0], dtype=bool), 0, d)


def _nonfinite_rows(leaves: list[_Leaf], chunk: int) -> jax.Array:
  """[n] bool: rows holding any NaN / Inf."""
  n = leaves[0].x.shape[0]

  def fold(leaf):
    def fn(bad, start, size):
      vals = _cols(leaf.x, start, size)
      if leaf.base is not None:
        vals = vals + _cols(leaf.base, start, size)[None, :]
      return bad | ~jnp.all(jnp.isfinite(vals), axis=1)
    return fn

  bad = jnp.zeros((n,), bool)
  for leaf in leaves:
    bad = _fold_chunks(leaf.x.shape[1], chunk, fold(leaf), bad)
  return bad


# --------------------------------------------------------------------------
# Direct-difference tiles (L1, L-inf and the exact fix-up of L2 / cosine).


def _direct_tile(leaves: list[_Leaf], si, sj, block: int, chunk: int,
                 kind: str):
  """Exact statistics of a [block, block] tile from direct differences.

  kind: "l1" -> sum |d|; "linf" -> max |d|; "l2" -> sum d^2;
  "cosine" -> (sum d^2, sum d * s) with d = a - b, s = a + b, so that the
  second term is |a|^2 - |b|^2.
  """
  dtype = leaves[0].x.dtype
  zeros = jnp.zeros((block, block), dtype)
  carry = (zeros, zeros) if kind == "cosine" else zeros

  def fold(leaf):
    def fn(acc, start, size):
      xi = lax.dynamic_slice(leaf.x, (si, start), (block, size))
      xj = lax.dynamic_slice(leaf.x, (sj, start), (block, size))
      d = xi[:, None, :] - xj[None, :, :]
      if kind == "l1":
        return acc + jnp.sum(jnp.abs(d), axis=-1)
      if kind == "linf":
        return jnp.maximum(acc, jnp.max(jnp.abs(d), axis=-1))
      if kind == "l2":
        return acc + jnp.sum(d * d, axis=-1)
      s = xi[:, None, :] + xj[None, :, :]
      if leaf.base is not None:
        s = s + 2 * _cols(leaf.base, start, size)
      return acc[0] + jnp.sum(d * d, axis=-1), acc[1] + jnp.sum(d * s, axis=-1)
    return fn

  for leaf in leaves:
    carry = _fold_chunks(leaf.x.shape[1], chunk, fold(leaf), carry)
  return carry


def _direct_matrix(leaves: list[_Leaf], block: int, chunk: int,
                   kind: str) -> jax.Array:
  """Upper-triangle tiles of an elementwise metric ("l1", "linf", "l2")."""
  n = leaves[0].x.shape[0]
  si, sj = _tile_starts(n, block)

  def step(d, s):
    tile = _direct_tile(leaves, s[0], s[1], block, chunk, kind)
    return lax.dynamic_update_slice(d, tile, (s[0], s[1])), None

  d0 = jnp.zeros((n, n), leaves[0].x.dtype)
  d, _ = lax.scan(step, d0, (jnp.asarray(si), jnp.asarray(sj)))
  return d


# --------------------------------------------------------------------------
# Robust centre.


def _choose_centre(leaves: list[_Leaf], sample: int, block: int,
                   chunk: int) -> jax.Array:
  """Index of a row inside the densest cluster (see module docstring)."""
  n = leaves[0].x.shape[0]
  total = sum(leaf.x.shape[1] for leaf in leaves)
  stride = max(1, total // sample)
  cols = [leaf.x[:, ::stride] for leaf in leaves]
  sub = jnp.concatenate(cols, axis=1) if len(cols) > 1 else cols[0]
  sub = sub[:, :max(sample, len(leaves))]
  finite = jnp.all(jnp.isfinite(sub), axis=1)
  sub = jnp.where(finite[:, None], sub, 0)
  blk = min(block, n)
  d2 = _mirror_upper(_direct_matrix([_Leaf(sub)], blk, chunk, "l2"))
  k = (n + 1) // 2
  nearest = -lax.top_k(-d2, k)[0]
  score = jnp.where(finite, jnp.sum(nearest, axis=1), jnp.inf)
  return jnp.argmin(score).astype(jnp.int32)


# --------------------------------------------------------------------------
# Gram path (L2 and cosine).


class _GramStats(NamedTuple):
  gram: jax.Array    # [n, n] centred Gram y_i . y_j
  sq: jax.Array      # [n] centred squared norms |y_i|^2
  cross: jax.Array   # [n] y_i . c (cosine only)
  norm2: jax.Array   # [n] |x_i|^2 (cosine only)
  bad: jax.Array     # [n] bool, rows with a non-finite squared norm


def _gram_stats(leaves: list[_Leaf], centre, chunk: int,
                cosine: bool) -> _GramStats:
  """Streams centred Gram statistics over leaves and parameter chunks."""
  n = leaves[0].x.shape[0]
  dtype = leaves[0].x.dtype

  def fold(leaf):
    def fn(carry, start, size):
      g, sq, cross, norm2 = carry
      # Rows are not sanitized: a matrix product keeps a non-finite row i
      # inside row / column i, and such rows are detected from their
      # non-finite squared norm. Only the centre must be finite.
      x = _cols(leaf.x, start, size)
      if leaf.base is None:
        c = lax.dynamic_index_in_dim(x, centre, axis=0, keepdims=False)
      else:
        c = _cols(leaf.base, start, size)
      c = jnp.where(jnp.isfinite(c), c, 0)
      y = x - c[None, :] if leaf.base is None else x
      g = _kahan_add(g, jnp.dot(y, y.T, precision=_HI))
      sq = _kahan_add(sq, jnp.sum(y * y, axis=1))
      if cosine:
        # A fused multiply-reduce, not a matrix-vector product: XLA folds it
        # into the same pass over y as the squared norms.
        cross = _kahan_add(cross, jnp.sum(y * c[None, :], axis=1))
        full = x if leaf.base is None else c[None, :] + y
        norm2 = _kahan_add(norm2, jnp.sum(full * full, axis=1))
      return g, sq, cross, norm2
    return fn

  zn = jnp.zeros((n,), dtype)
  zz = jnp.zeros((n, n), dtype)
  carry = ((zz, zz), (zn, zn), (zn, zn), (zn, zn))
  for leaf in leaves:
    carry = _fold_chunks(leaf.x.shape[1], chunk, fold(leaf), carry)
  g, sq, cross, norm2 = carry
  g, sq, cross, norm2 = g[0], sq[0], cross[0], norm2[0]
  bad = ~jnp.isfinite(sq) | ~jnp.isfinite(norm2)
  return _GramStats(g, sq, cross, norm2, bad)


def _fixup(leaves: list[_Leaf], flag: jax.Array, values: tuple, block: int,
           chunk: int, kind: str) -> tuple:
  """Replaces the entries of tiles holding a flagged pair by direct values."""
  n = flag.shape[0]
  si, sj = _tile_starts(n, block)

  def step(vals, s):
    f = lax.dynamic_slice(flag, (s[0], s[1]), (block, block))

    def direct():
      out = _direct_tile(leaves, s[0], s[1], block, chunk, kind)
      return out if kind == "cosine" else (out,)

    def skip():
      return tuple(jnp.zeros((block, block), v.dtype) for v in vals)

    tiles = lax.cond(jnp.any(f), direct, skip)
    new = []
    for v, t in zip(vals, tiles):
      old = lax.dynamic_slice(v, (s[0], s[1]), (block, block))
      new.append(lax.dynamic_update_slice(v, jnp.where(f, t, old),
                                          (s[0], s[1])))
    return tuple(new), None

  vals, _ = lax.scan(step, tuple(values), (jnp.asarray(si), jnp.asarray(sj)))
  return vals


def _gram_distances(leaves: list[_Leaf], centre, metric: str, block: int,
                    chunk: int, tile_chunk: int, fixup_tol: float):
  """L2 or cosine distance matrix (upper triangle valid) and bad rows."""
  cosine = metric == "cosine"
  st = _gram_stats(leaves, centre, chunk, cosine)
  n = st.sq.shape[0]
  sum_sq = st.sq[:, None] + st.sq[None, :]
  d2 = jnp.maximum(sum_sq - 2 * st.gram, 0)
  upper = jnp.arange(n)[:, None] < jnp.arange(n)[None, :]
  flag = upper & (d2 < fixup_tol * sum_sq) & ~st.bad[:, None] & ~st.bad[None]
  if not cosine:
    (d2,) = _fixup(leaves, flag, (d2,), block, tile_chunk, "l2")
    return jnp.sqrt(d2), st.bad
  # |x_i|^2 - |x_j|^2 from the centred quantities.
  dn2 = (st.sq[:, None] - st.sq[None, :]) + 2 * (st.cross[:, None] -
                                                 st.cross[None, :])
  d2, dn2 = _fixup(leaves, flag, (d2, dn2), block, tile_chunk, "cosine")
  return _cosine_from_parts(d2, dn2, st.norm2), st.bad


def _cosine_from_parts(d2, dn2, norm2):
  """1 - cos from |a-b|^2, |a|^2-|b|^2 and the squared norms."""
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


# --------------------------------------------------------------------------
# Sizes and the dispatcher.


class _Sizes(NamedTuple):
  block: int
  chunk: int
  tile_chunk: int
  centre_sample: int
  fixup_tol: float


def _sizes(n: int, itemsize: int, block_size, chunk_size, max_bytes,
           centre_sample, fixup_tol) -> _Sizes:
  """Validates options and derives static tile / chunk sizes."""
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
  block = int(min(block_size, n))
  gram_cap = max_bytes // (4 * n * itemsize)
  tile_cap = max_bytes // (block * block * itemsize)
  require(gram_cap >= 1 and tile_cap >= 1, "max_bytes",
          f"{max_bytes} bytes is too small for n={n} providers and "
          f"block_size={block}; need at least "
          f"{max(4 * n, block * block) * itemsize}")
  if chunk_size is None:
    chunk = max(128, (gram_cap // 128) * 128) if gram_cap >= 128 else gram_cap
    tile_chunk = min(DEFAULT_TILE_CHUNK, tile_cap)
  else:
    chunk = min(int(chunk_size), gram_cap)
    tile_chunk = min(int(chunk_size), tile_cap)
  return _Sizes(block, int(chunk), int(tile_chunk), int(centre_sample),
                float(fixup_tol))


@functools.partial(jax.jit, static_argnames=("metric", "sizes", "auto_centre"))
def _pairwise_jit(leaves, centre, metric: str, sizes: _Sizes,
                  auto_centre: bool):
  leaves = [_Leaf(*leaf) for leaf in leaves]
  if metric in ("l1", "linf"):
    bad = _nonfinite_rows(leaves, sizes.chunk)
    d = _direct_matrix(leaves, sizes.block, sizes.tile_chunk, metric)
    return _finalize(d, bad)
  if auto_centre:
    centre = _choose_centre(leaves, sizes.centre_sample, sizes.block,
                            sizes.tile_chunk)
  d, bad = _gram_distances(leaves, centre, metric, sizes.block, sizes.chunk,
                           sizes.tile_chunk, sizes.fixup_tol)
  return _finalize(d, bad)


def _run(leaves: list[_Leaf], n: int, metric: str, *, block_size, chunk_size,
         max_bytes, centre, centre_sample, fixup_tol) -> jax.Array:
  require(metric in METRICS, "metric",
          f"must be one of {METRICS}; got {metric!r}")
  itemsize = jnp.dtype(leaves[0].x.dtype).itemsize
  sizes = _sizes(n, itemsize, block_size, chunk_size, max_bytes,
                 centre_sample, fixup_tol)
  auto = centre is None
  if not auto:
    if isinstance(centre, jax.Array) and centre.ndim == 0:
      centre = int(centre)
    require(isinstance(centre, (int, np.integer)) and 0 <= centre < n,
            "centre", f"must be None (automatic) or a row index in [0, {n}); "
            f"got {centre!r}")
  leaves = [tuple(leaf) for leaf in leaves]
  return _pairwise_jit(leaves, jnp.int32(0 if auto else centre), metric,
                       sizes, auto)


def pairwise_distances(x, metric: str = "l2", *,
                       block_size: int = DEFAULT_BLOCK_SIZE,
                       chunk_size: Optional[int] = None,
                       max_bytes: int = DEFAULT_MAX_BYTES,
                       centre: Optional[int] = None,
                       centre_sample: int = DEFAULT_CENTRE_SAMPLE,
                       fixup_tol: float = DEFAULT_FIXUP_TOL) -> jax.Array:
  """Pairwise distances between providers in parameter space.

  Args:
    x: the population, a 2-D array [n, P] or a pytree whose leaves carry a
      leading provider axis [n, ...] (typically `updates(start, end)`). Leaves
      are streamed one by one and never concatenated.
    metric: "l2" (Euclidean), "cosine" (1 - cos, in [0, 2]), "l1" or "linf".
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
    zero diagonal, non-negative, +inf for rows holding NaN / Inf.

  Raises:
    ConfigError: unknown metric, bad sizes, leaves without a shared leading
      provider axis.
  """
  rows, n = _population_rows(x)
  return _run([_Leaf(r) for r in rows], n, metric, block_size=block_size,
              chunk_size=chunk_size, max_bytes=max_bytes, centre=centre,
              centre_sample=centre_sample, fixup_tol=fixup_tol)


def _offset_distances(base: jax.Array, offsets: jax.Array, centre: int,
                      metric: str, **opts) -> jax.Array:
  """Distances between rows base + offsets[i]; offsets[centre] is zero."""
  n = offsets.shape[0]
  base = base.reshape(-1)
  offsets = offsets.reshape(n, -1)
  if metric in ("l2", "l1", "linf"):
    return _run([_Leaf(offsets)], n, metric, centre=centre, **opts)
  return _run([_Leaf(offsets, base)], n, metric, centre=centre, **opts)


# --------------------------------------------------------------------------
# Model-based metrics.


def _check_population_models(params, model_state, name="params") -> int:
  leaves = jax.tree_util.tree_leaves(params)
  require(len(leaves) > 0, name, "must be a non-empty pytree of arrays with "
          "a leading provider axis [n, ...]")
  n = leaves[0].shape[0] if leaves[0].ndim else None
  require(n is not None and all(l.ndim >= 1 and l.shape[0] == n
                                for l in leaves), name,
          "every leaf needs the same leading provider axis n; got shapes "
          f"{[tuple(l.shape) for l in leaves]}")
  for leaf in jax.tree_util.tree_leaves(model_state):
    require(leaf.ndim >= 1 and leaf.shape[0] == n, "model_state",
            f"leaves need the leading provider axis n={n}; got {leaf.shape}")
  return n


def population_apply(apply_fn: Callable, params, model_state, x, *,
                     provider_batch: Optional[int] = None):
  """Runs a single-provider `apply_fn` for every provider on the same inputs.

  Args:
    apply_fn: (params, model_state, x) -> (logits [B, C], features [B, d]).
    params, model_state: population pytrees, leaves [n, ...] (model_state may
      be an empty dict or None).
    x: inputs [B, ...] shared by all providers.
    provider_batch: if set, providers are evaluated this many at a time
      (bounds memory); otherwise all at once with vmap.

  Returns:
    (logits [n, B, C], features [n, B, d]).
  """
  _check_population_models(params, model_state)
  require(provider_batch is None or (isinstance(provider_batch, int)
                                     and provider_batch >= 1),
          "provider_batch", f"must be None or an int >= 1; got "
          f"{provider_batch!r}")
  return _population_apply_jit(apply_fn, params, model_state, x,
                               provider_batch)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _population_apply_jit(apply_fn, params, model_state, x, provider_batch):
  one = lambda pm: apply_fn(pm[0], pm[1], x)
  return lax.map(one, (params, model_state), batch_size=provider_batch) \
      if provider_batch else jax.vmap(one)((params, model_state))


def output_distances(apply_fn: Callable, params, model_state, probe_x, *,
                     space: str = "probs",
                     provider_batch: Optional[int] = None,
                     **kernel_opts) -> jax.Array:
  """Output-space distance between providers on a fixed probe set.

  With space="probs" (default) the distance is the mean over probe examples
  of the total-variation distance between the providers' softmax outputs,
  (1 / B) sum_b 0.5 * |p_i(x_b) - p_j(x_b)|_1, in [0, 1]. With
  space="logits" it is the mean absolute logit difference over examples and
  classes. Both are computed from direct differences (exact in float32).

  Args:
    apply_fn: single-provider (params, model_state, x) -> (logits, features).
    params, model_state: population pytrees with leading provider axis n.
    probe_x: probe inputs [B, ...].
    space: "probs" or "logits".
    provider_batch: see `population_apply`.
    **kernel_opts: forwarded to the tile kernel (block_size, chunk_size,
      max_bytes).

  Returns:
    [n, n] distance matrix.
  """
  require(space in OUTPUT_SPACES, "space",
          f"must be one of {OUTPUT_SPACES}; got {space!r}")
  logits, _ = population_apply(apply_fn, params, model_state, probe_x,
                               provider_batch=provider_batch)
  require(logits.ndim == 3, "apply_fn",
          f"must return logits [B, C] per provider; got {logits.shape[1:]}")
  n, b, c = logits.shape
  if space == "probs":
    out = jax.nn.softmax(logits.astype(_float_dtype([logits.dtype])), -1)
    scale = 0.5 / b
  else:
    out = logits
    scale = 1.0 / (b * c)
  d = pairwise_distances(out.reshape(n, -1), "l1", **kernel_opts)
  return d * scale


def _centre_row_index(rows: jax.Array, **opts) -> jax.Array:
  """Robust centre row of a small [n, m] matrix (for model-based metrics)."""
  sizes = _sizes(rows.shape[0], jnp.dtype(rows.dtype).itemsize,
                 opts.get("block_size", DEFAULT_BLOCK_SIZE), None,
                 opts.get("max_bytes", DEFAULT_MAX_BYTES),
                 opts.get("centre_sample", DEFAULT_CENTRE_SAMPLE), 0.0)
  return _centre_jit(rows, sizes)


@functools.partial(jax.jit, static_argnames=("sizes",))
def _centre_jit(rows, sizes):
  return _choose_centre([_Leaf(rows)], sizes.centre_sample, sizes.block,
                        sizes.tile_chunk)


@jax.jit
def _cka_offsets(features, r):
  """Centred Gram matrices as base K_r plus accurate offsets K_i - K_r."""
  f = features
  xr = f[r] - jnp.mean(f[r], axis=0)
  e = f - f[r][None]
  e = e - jnp.mean(e, axis=1, keepdims=True)
  m = jnp.einsum("nbd,cd->nbc", e, xr, precision=_HI)
  ee = jnp.einsum("nbd,ncd->nbc", e, e, precision=_HI)
  offsets = m + jnp.swapaxes(m, 1, 2) + ee
  base = jnp.einsum("bd,cd->bc", xr, xr, precision=_HI)
  return base, offsets


def cka_distances(apply_fn: Callable, params, model_state, probe_x, *,
                  provider_batch: Optional[int] = None,
                  **kernel_opts) -> jax.Array:
  """1 - linear CKA between providers' penultimate activations.

  Linear CKA (Kornblith et al., 2019) of centred features X_i, X_j [B, d] is
  <K_i, K_j>_F / (|K_i|_F |K_j|_F) with K = X X^T, so 1 - CKA is the cosine
  distance between the flattened Gram matrices. They are formed as a base
  K_r (robust centre provider r) plus offsets K_i - K_r computed from
  feature differences, and compared with the cosine kernel: benign replicas
  keep relative accuracy. Memory: n * B^2 floats for the offsets.

  Args:
    apply_fn, params, model_state, probe_x, provider_batch: as in
      `output_distances`.
    **kernel_opts: forwarded to the cosine kernel.

  Returns:
    [n, n] matrix of 1 - CKA, in [0, 1].
  """
  _, feats = population_apply(apply_fn, params, model_state, probe_x,
                              provider_batch=provider_batch)
  require(feats.ndim == 3, "apply_fn",
          f"must return features [B, d] per provider; got {feats.shape[1:]}")
  feats = feats.astype(_float_dtype([feats.dtype]))
  n = feats.shape[0]
  r = _centre_row_index(feats.reshape(n, -1), **kernel_opts)
  base, offsets = _cka_offsets(feats, r)
  return _offset_distances(base, offsets, r, "cosine",
                           **_kernel_only(kernel_opts))


def _kernel_only(opts: dict) -> dict:
  keys = ("block_size", "chunk_size", "max_bytes", "centre_sample",
          "fixup_tol")
  unknown = set(opts) - set(keys)
  require(not unknown, "kernel_opts",
          f"unknown options {sorted(unknown)}; allowed: {keys}")
  defaults = dict(block_size=DEFAULT_BLOCK_SIZE, chunk_size=None,
                  max_bytes=DEFAULT_MAX_BYTES,
                  centre_sample=DEFAULT_CENTRE_SAMPLE,
                  fixup_tol=DEFAULT_FIXUP_TOL)
  defaults.update(opts)
  return defaults


# --------------------------------------------------------------------------
# Zest.


class ZestFit(NamedTuple):
  """Per-provider LIME surrogates of a Zest run.

  design: [R, S, 1 + g*g] design matrices (intercept column, patch masks).
  outputs: [n, R, S, C] softmax outputs on the perturbed samples.
  coefficients: [n, R, 1 + g*g, C] least-squares fits (intercept first).
  pinv: [R, 1 + g*g, S] pseudo-inverses of the design matrices.
  """
  design: jax.Array
  outputs: jax.Array
  coefficients: jax.Array
  pinv: jax.Array


def _patch_ids(h: int, w: int, grid: int) -> jax.Array:
  """[H, W] index of the grid patch each pixel belongs to."""
  rows = (np.arange(h) * grid) // h
  cols = (np.arange(w) * grid) // w
  return jnp.asarray(rows[:, None] * grid + cols[None, :])


def _span_ids(length: int, segments: int) -> jax.Array:
  """[L] index of the contiguous token span each position belongs to."""
  return jnp.asarray((np.arange(length) * segments) // length)


def _perturb(refs, masks, grid, fill):
  """Perturbed copies [R, S, ...] of references under feature masks [R, S, F].

  Images [R, H, W, C]: feature p is the p-th cell of a grid x grid array of
  patches; a masked-out patch is 0 (fill "zero") or the image's per-channel
  mean ("mean"). Token sequences [R, L] (integer ids): feature p is the p-th
  of grid^2 contiguous spans of about L / grid^2 tokens; a masked-out span
  is replaced by the token id `fill` (an int, e.g. the unk id; "zero" means
  id 0, the pad token): token masking, the text counterpart of blanking a
  patch.
  """
  if refs.ndim == 2:
    on = masks[:, :, _span_ids(refs.shape[1], grid * grid)]      # [R,S,L]
    token = 0 if fill == "zero" else fill
    return jnp.where(on, refs[:, None], jnp.asarray(token, refs.dtype))
  _, h, w, _ = refs.shape
  pixel_on = masks[:, :, _patch_ids(h, w, grid)][..., None]   # [R,S,H,W,1]
  fill_val = (jnp.zeros_like(refs) if fill == "zero" else
              jnp.broadcast_to(jnp.mean(refs, axis=(1, 2), keepdims=True),
                               refs.shape))
  return jnp.where(pixel_on, refs[:, None], fill_val[:, None])


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8, 9))
def _zest_fit_jit(apply_fn, params, model_state, reference_x, key, grid,
                  num_perturbations, num_references, fill, provider_batch):
  k_ref, k_mask = jax.random.split(key)
  total = reference_x.shape[0]
  idx = (jnp.arange(total) if num_references == total else
         jax.random.choice(k_ref, total, (num_references,), replace=False))
  refs = reference_x[idx]
  dtype = (refs.dtype if jnp.issubdtype(refs.dtype, jnp.floating)
           else jnp.float32)
  squeeze = refs.ndim == 3
  if squeeze:
    refs = refs[..., None]
  r = refs.shape[0]
  masks = jax.random.bernoulli(k_mask, 0.5,
                               (r, num_perturbations, grid * grid))
  design = jnp.concatenate(
      [jnp.ones((r, num_perturbations, 1), dtype),
       masks.astype(dtype)], axis=-1)
  pinv = jnp.linalg.pinv(design)
  pert = _perturb(refs, masks, grid, fill)
  pert = pert.reshape((r * num_perturbations,) + pert.shape[2:])
  if squeeze:
    pert = pert[..., 0]
  one = lambda pm: apply_fn(pm[0], pm[1], pert)[0]
  logits = (lax.map(one, (params, model_state), batch_size=provider_batch)
            if provider_batch else jax.vmap(one)((params, model_state)))
  n = logits.shape[0]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  outputs = probs.reshape(n, r, num_perturbations, -1)
  coef = jnp.einsum("rks,nrsc->nrkc", pinv, outputs, precision=_HI)
  return ZestFit(design, outputs, coef, pinv)


def zest_fit(apply_fn: Callable, params, model_state, reference_x, key, *,
             grid: int = 4, num_perturbations: int = 64,
             num_references: Optional[int] = None, fill: str = "zero",
             provider_batch: Optional[int] = None) -> ZestFit:
  """Fits every provider's LIME surrogates for Zest (Jia et al., 2022).

  Procedure: pick `num_references` reference inputs (random subset under
  `key`; all of them if None). Token sequences [R, L] are handled the same
  way with grid^2 contiguous token spans as the superpixels and masked-out
  spans replaced by a token id (see `_perturb`). Split each H x W image into a grid x grid
  array of patches (the superpixels). Draw `num_perturbations` random binary
  masks over the grid*grid patches per reference (Bernoulli(1/2)); a masked
  out patch is set to 0 (fill="zero") or to the image's per-channel mean
  (fill="mean"). Evaluate every provider's model on all perturbed samples and
  take softmax probabilities. For each reference, fit per class the linear
  surrogate probs ~ w0 + sum_p w_p * mask_p by least squares; the design
  matrix [1, masks] is shared by all providers, so its pseudo-inverse is
  computed once and applied to every provider with one batched matmul.

  Args:
    apply_fn: single-provider (params, model_state, x) -> (logits, features).
    params, model_state: population pytrees with leading provider axis n.
    reference_x: reference images [R, H, W, C] or [R, H, W], or integer
      token ids [R, L].
    key: PRNG key for the reference subset and the masks.
    grid: patches per side (grid^2 superpixels).
    num_perturbations: perturbed samples per reference, >= grid^2 + 1.
    num_references: references used (<= R); None uses all.
    fill: images: "zero" or "mean"; token ids: "zero" (id 0) or a token id.
    provider_batch: see `population_apply`.

  Returns:
    A `ZestFit`.
  """
  _check_population_models(params, model_state)
  text = (hasattr(reference_x, "ndim") and reference_x.ndim == 2
          and not jnp.issubdtype(reference_x.dtype, jnp.floating))
  require(text or (hasattr(reference_x, "ndim")
                   and reference_x.ndim in (3, 4)), "reference_x",
          "must be images [R, H, W, C] or [R, H, W], or integer token ids "
          f"[R, L]; got shape {getattr(reference_x, 'shape', None)}")
  total = reference_x.shape[0]
  num_references = total if num_references is None else num_references
  require(isinstance(num_references, int) and 1 <= num_references <= total,
          "num_references", f"must be an int in [1, {total}]; got "
          f"{num_references!r}")
  if text:
    length = reference_x.shape[1]
    require(isinstance(grid, int) and 1 <= grid * grid <= length, "grid",
            f"must be an int with 1 <= grid^2 <= L={length} (grid^2 token "
            f"spans); got {grid!r}")
    require(fill == "zero" or (isinstance(fill, int)
                               and not isinstance(fill, bool)
                               and fill >= 0), "fill",
            f"for token ids must be 'zero' (the pad id 0) or a token id; got "
            f"{fill!r}")
  else:
    require(isinstance(grid, int)
            and 1 <= grid <= min(reference_x.shape[1:3]), "grid",
            f"must be an int in [1, min(H, W)="
            f"{min(reference_x.shape[1:3])}]; got {grid!r}")
    require(fill in ZEST_FILLS, "fill",
            f"must be one of {ZEST_FILLS}; got {fill!r}")
  require(isinstance(num_perturbations, int)
          and num_perturbations >= grid * grid + 1, "num_perturbations",
          f"must be an int >= grid^2 + 1 = {grid * grid + 1} so the "
          f"least-squares fit is determined; got {num_perturbations!r}")
  require(provider_batch is None or (isinstance(provider_batch, int)
                                     and provider_batch >= 1),
          "provider_batch", f"must be None or an int >= 1; got "
          f"{provider_batch!r}")
  reference_x = jnp.asarray(reference_x)
  if not text and not jnp.issubdtype(reference_x.dtype, jnp.floating):
    reference_x = reference_x.astype(jnp.float32)
  return _zest_fit_jit(apply_fn, params, model_state, reference_x, key, grid,
                       num_perturbations, num_references, fill,
                       provider_batch)


@jax.jit
def _zest_offsets(fit: ZestFit, r):
  """Signatures (slope coefficients) as base + accurate offsets."""
  pinv = fit.pinv[:, 1:, :]
  dy = fit.outputs - fit.outputs[r][None]
  offsets = jnp.einsum("rks,nrsc->nrkc", pinv, dy, precision=_HI)
  base = jnp.einsum("rks,rsc->rkc", pinv, fit.outputs[r], precision=_HI)
  n = offsets.shape[0]
  return base.reshape(-1), offsets.reshape(n, -1)


def zest_signatures(fit: ZestFit) -> jax.Array:
  """[n, R * grid^2 * C] signatures: concatenated surrogate slopes."""
  n = fit.coefficients.shape[0]
  return fit.coefficients[:, :, 1:, :].reshape(n, -1)


def zest_distances(apply_fn: Callable, params, model_state, reference_x, key,
                   *, grid: int = 4, num_perturbations: int = 64,
                   num_references: Optional[int] = None, fill: str = "zero",
                   metric: str = "cosine",
                   provider_batch: Optional[int] = None,
                   **kernel_opts) -> jax.Array:
  """Zest model distance between providers.

  Fits the LIME surrogates (see `zest_fit` for the procedure), forms each
  provider's signature (the concatenated slope coefficients over references,
  patches and classes; intercepts dropped) and compares signatures with
  `metric` in {"l1", "l2", "linf", "cosine"}. Signatures are handled as the
  robust centre provider's signature plus offsets fitted on output
  differences, so near-identical providers keep relative accuracy.

  Returns:
    [n, n] distance matrix.
  """
  require(metric in METRICS, "metric",
          f"must be one of {METRICS}; got {metric!r}")
  fit = zest_fit(apply_fn, params, model_state, reference_x, key, grid=grid,
                 num_perturbations=num_perturbations,
                 num_references=num_references, fill=fill,
                 provider_batch=provider_batch)
  n = fit.outputs.shape[0]
  r = _centre_row_index(fit.outputs.reshape(n, -1), **kernel_opts)
  base, offsets = _zest_offsets(fit, r)
  return _offset_distances(base, offsets, r, metric,
                           **_kernel_only(kernel_opts))
