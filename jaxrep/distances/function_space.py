"""Function-space distances: providers compared by their models' outputs.

Every provider's model is run on the same probe inputs (`population_apply`):

* output space (`output_distances`): mean total-variation distance between
  the providers' softmax outputs (or mean absolute logit gap);
* representation (`cka_distances`): 1 - linear CKA of penultimate
  activations.

(Zest, which compares linear surrogates fitted on the outputs, is in
`zest.py`.) The outputs are compact (n x probe x classes), so with a `mesh`
the forward passes run provider-sharded, each device on its own providers,
the outputs are gathered, and the same distance kernels run on them.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxrep.core.errors import require
from jaxrep.distances import numerics as nm
from jaxrep.distances import parameter_space as ps
from jaxrep.runtime import mesh as mesh_lib

OUTPUT_SPACES = ("probs", "logits")


def check_population_models(params, model_state, name="params") -> int:
  """n, after checking every leaf carries the same leading provider axis."""
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


def check_provider_batch(provider_batch, mesh: Optional[Mesh]) -> None:
  require(provider_batch is None or (isinstance(provider_batch, int)
                                     and provider_batch >= 1),
          "provider_batch", f"must be None or an int >= 1; got "
          f"{provider_batch!r}")
  require(provider_batch is None or mesh is None, "provider_batch",
          "must be None with a mesh (each device runs its own providers)")


def population_apply(apply_fn: Callable, params, model_state, x, *,
                     provider_batch: Optional[int] = None,
                     mesh: Optional[Mesh] = None):
  """Runs a single-provider `apply_fn` for every provider on the same inputs.

  Args:
    apply_fn: (params, model_state, x) -> (logits [B, C], features [B, d]).
    params, model_state: population pytrees, leaves [n, ...] (model_state may
      be an empty dict or None).
    x: inputs [B, ...] shared by all providers.
    provider_batch: if set, providers are evaluated this many at a time
      (bounds memory); otherwise all at once with vmap. Not with a mesh.
    mesh: if given, each device runs the forward passes of its own providers
      (no collective) and only the outputs are gathered to every device.

  Returns:
    (logits [n, B, C], features [n, B, d]).
  """
  check_population_models(params, model_state)
  check_provider_batch(provider_batch, mesh)
  if mesh is None:
    return _population_apply_jit(apply_fn, params, model_state, x,
                                 provider_batch)
  params = mesh_lib.shard_provider_tree(params, mesh, "params")
  model_state = mesh_lib.shard_model_state(model_state, mesh)
  x = mesh_lib.replicate_tree(jnp.asarray(x), mesh)
  return _sharded_apply(apply_fn, mesh)(params, model_state, x)


def apply_each(apply_fn: Callable, params, model_state, x, provider_batch):
  """apply_fn(params_i, model_state_i, x) for every provider i (traceable):
  vmapped, or `provider_batch` providers at a time."""
  one = lambda pm: apply_fn(pm[0], pm[1], x)
  return (lax.map(one, (params, model_state), batch_size=provider_batch)
          if provider_batch else jax.vmap(one)((params, model_state)))


_population_apply_jit = jax.jit(apply_each, static_argnums=(0, 4))


@functools.lru_cache(maxsize=None)
def _sharded_apply(apply_fn: Callable, mesh: Mesh):
  local = lambda params, model_state, x: apply_each(apply_fn, params,
                                                    model_state, x, None)
  providers = P(mesh_lib.PROVIDERS)
  mapped = jax.shard_map(local, mesh=mesh,
                         in_specs=(providers, providers, P()),
                         out_specs=providers)
  return jax.jit(mapped, out_shardings=mesh_lib.replicated_sharding(mesh))


def output_distances(apply_fn: Callable, params, model_state, probe_x, *,
                     space: str = "probs",
                     provider_batch: Optional[int] = None,
                     mesh: Optional[Mesh] = None,
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
    provider_batch, mesh: see `population_apply`.
    **kernel_opts: forwarded to the tile kernel (block_size, chunk_size,
      max_bytes).

  Returns:
    [n, n] distance matrix.
  """
  require(space in OUTPUT_SPACES, "space",
          f"must be one of {OUTPUT_SPACES}; got {space!r}")
  logits, _ = population_apply(apply_fn, params, model_state, probe_x,
                               provider_batch=provider_batch, mesh=mesh)
  require(logits.ndim == 3, "apply_fn",
          f"must return logits [B, C] per provider; got {logits.shape[1:]}")
  n, b, c = logits.shape
  if space == "probs":
    out = jax.nn.softmax(logits.astype(nm.float_dtype([logits.dtype])), -1)
    scale = 0.5 / b
  else:
    out = logits
    scale = 1.0 / (b * c)
  d = ps.pairwise_distances(out.reshape(n, -1), "l1", **kernel_opts)
  return d * scale


@jax.jit
def _cka_offsets(features, r):
  """Centred Gram matrices as base K_r plus accurate offsets K_i - K_r."""
  f = features
  xr = f[r] - jnp.mean(f[r], axis=0)
  e = f - f[r][None]
  e = e - jnp.mean(e, axis=1, keepdims=True)
  m = jnp.einsum("nbd,cd->nbc", e, xr, precision=nm.HIGHEST)
  ee = jnp.einsum("nbd,ncd->nbc", e, e, precision=nm.HIGHEST)
  offsets = m + jnp.swapaxes(m, 1, 2) + ee
  base = jnp.einsum("bd,cd->bc", xr, xr, precision=nm.HIGHEST)
  return base, offsets


def cka_distances(apply_fn: Callable, params, model_state, probe_x, *,
                  provider_batch: Optional[int] = None,
                  mesh: Optional[Mesh] = None,
                  **kernel_opts) -> jax.Array:
  """1 - linear CKA between providers' penultimate activations.

  Linear CKA (Kornblith et al., 2019) of centred features X_i, X_j [B, d] is
  <K_i, K_j>_F / (|K_i|_F |K_j|_F) with K = X X^T, so 1 - CKA is the cosine
  distance between the flattened Gram matrices. They are formed as a base
  K_r (robust centre provider r) plus offsets K_i - K_r computed from
  feature differences, and compared with the cosine kernel: benign replicas
  keep relative accuracy. Memory: n * B^2 floats for the offsets.

  Args:
    apply_fn, params, model_state, probe_x, provider_batch, mesh: as in
      `output_distances`.
    **kernel_opts: forwarded to the cosine kernel.

  Returns:
    [n, n] matrix of 1 - CKA, in [0, 1].
  """
  opts = ps.kernel_options(kernel_opts)
  _, feats = population_apply(apply_fn, params, model_state, probe_x,
                              provider_batch=provider_batch, mesh=mesh)
  require(feats.ndim == 3, "apply_fn",
          f"must return features [B, d] per provider; got {feats.shape[1:]}")
  feats = feats.astype(nm.float_dtype([feats.dtype]))
  n = feats.shape[0]
  r = ps.robust_centre_row(feats.reshape(n, -1), opts)
  base, offsets = _cka_offsets(feats, r)
  return ps.offset_distances(base, offsets, r, "cosine", opts)
