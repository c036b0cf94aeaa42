"""Zest model distance (Jia et al., ICLR 2022): compare LIME surrogates.

Every provider's model is explained by LIME-style linear surrogates fitted
on random perturbations of a few reference inputs (`zest_fit`); a
provider's signature is the concatenation of the surrogates' slopes
(`zest_signatures`), and providers are compared by a parameter-space metric
on their signatures (`zest_distances`). Images are perturbed by blanking
grid patches, token sequences by masking contiguous token spans.

With a `mesh`, every device fits the surrogates of its own providers (the
references, masks and pseudo-inverses are the same on every device) and the
compact fit is gathered; the signatures are then compared as on one device.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxrep.core.errors import require
from jaxrep.distances import numerics as nm
from jaxrep.distances import parameter_space as ps
from jaxrep.distances.function_space import (apply_each,
                                             check_population_models,
                                             check_provider_batch)
from jaxrep.runtime import mesh as mesh_lib

ZEST_FILLS = ("zero", "mean")


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
  logits = apply_each(lambda p, s, x: apply_fn(p, s, x)[0], params,
                      model_state, pert, provider_batch)
  n = logits.shape[0]
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  outputs = probs.reshape(n, r, num_perturbations, -1)
  coef = jnp.einsum("rks,nrsc->nrkc", pinv, outputs, precision=nm.HIGHEST)
  return ZestFit(design, outputs, coef, pinv)


def zest_fit(apply_fn: Callable, params, model_state, reference_x, key, *,
             grid: int = 4, num_perturbations: int = 64,
             num_references: Optional[int] = None, fill: str = "zero",
             provider_batch: Optional[int] = None) -> ZestFit:
  """Fits every provider's LIME surrogates for Zest (Jia et al., 2022).

  Procedure: pick `num_references` reference inputs (random subset under
  `key`; all of them if None). Split each H x W image into a grid x grid
  array of patches (the superpixels). Draw `num_perturbations` random binary
  masks over the grid*grid patches per reference (Bernoulli(1/2)); a masked
  out patch is set to 0 (fill="zero") or to the image's per-channel mean
  (fill="mean"). Token sequences [R, L] are handled the same way with grid^2
  contiguous token spans as the superpixels and masked-out spans replaced by
  a token id (see `_perturb`). Evaluate every provider's model on all perturbed samples and
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
  check_population_models(params, model_state)
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
  check_provider_batch(provider_batch, None)
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
  offsets = jnp.einsum("rks,nrsc->nrkc", pinv, dy, precision=nm.HIGHEST)
  base = jnp.einsum("rks,rsc->rkc", pinv, fit.outputs[r], precision=nm.HIGHEST)
  n = offsets.shape[0]
  return base.reshape(-1), offsets.reshape(n, -1)


def _local_blocks(tree, mesh: Mesh) -> dict:
  """{device: the device's block of a provider-sharded tree} (this process)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  blocks = {dev: [] for dev in mesh.local_devices}
  for leaf in leaves:
    for shard in leaf.addressable_shards:
      blocks[shard.device].append(shard.data)
  return {dev: jax.tree_util.tree_unflatten(treedef, parts)
          for dev, parts in blocks.items()}


def _sharded_zest_fit(apply_fn: Callable, params, model_state, reference_x,
                      key, mesh: Mesh, **fit_opts) -> ZestFit:
  """`zest_fit`, each device on its own providers; the fit replicated.

  One single-device program per device. On CPU they run one after another:
  the fit's batched pseudo-inverse (LAPACK SVD) spreads its batch over the
  host's intra-op thread pool and waits for it, and with several forced CPU
  devices executing it at once every pool thread ended up waiting
  (deadlock, seen in jaxlib 0.10.2 by a thread dump). On GPU / TPU the
  programs are dispatched asynchronously and run in parallel.
  """
  params = mesh_lib.shard_provider_tree(params, mesh, "params")
  model_state = mesh_lib.shard_model_state(model_state, mesh)
  reference_x = jnp.asarray(reference_x)
  sequential = mesh.devices.flat[0].platform == "cpu"
  p_blocks = _local_blocks(params, mesh)
  s_blocks = (_local_blocks(model_state, mesh)
              if jax.tree_util.tree_leaves(model_state) else None)
  fits = {}
  for dev in mesh.local_devices:
    fit = zest_fit(
        apply_fn, p_blocks[dev],
        s_blocks[dev] if s_blocks is not None else model_state,
        jax.device_put(reference_x, dev), jax.device_put(key, dev),
        **fit_opts)
    fits[dev] = jax.block_until_ready(fit) if sequential else fit
  first = fits[mesh.local_devices[0]]
  n = jax.tree_util.tree_leaves(params)[0].shape[0]
  sharding = mesh_lib.provider_sharding(mesh)

  def assemble(name):
    parts = [getattr(fits[dev], name) for dev in mesh.local_devices]
    shape = (n,) + parts[0].shape[1:]
    return jax.make_array_from_single_device_arrays(shape, sharding, parts)

  outputs, coefficients = mesh_lib.replicate_sharded(
      (assemble("outputs"), assemble("coefficients")), mesh)
  design, pinv = mesh_lib.replicate_tree(
      (mesh_lib.to_host(first.design), mesh_lib.to_host(first.pinv)), mesh)
  return ZestFit(design, outputs, coefficients, pinv)


def zest_signatures(fit: ZestFit) -> jax.Array:
  """[n, R * grid^2 * C] signatures: concatenated surrogate slopes."""
  n = fit.coefficients.shape[0]
  return fit.coefficients[:, :, 1:, :].reshape(n, -1)


def zest_distances(apply_fn: Callable, params, model_state, reference_x, key,
                   *, grid: int = 4, num_perturbations: int = 64,
                   num_references: Optional[int] = None, fill: str = "zero",
                   metric: str = "cosine",
                   provider_batch: Optional[int] = None,
                   mesh: Optional[Mesh] = None,
                   **kernel_opts) -> jax.Array:
  """Zest model distance between providers.

  Fits the LIME surrogates (see `zest_fit` for the procedure), forms each
  provider's signature (the concatenated slope coefficients over references,
  patches and classes; intercepts dropped) and compares signatures with
  `metric` in {"l1", "l2", "linf", "cosine"}. Signatures are handled as the
  robust centre provider's signature plus offsets fitted on output
  differences, so near-identical providers keep relative accuracy.

  Args:
    apply_fn, params, model_state, reference_x, key, grid,
      num_perturbations, num_references, fill, provider_batch: as in
      `zest_fit`.
    metric: "l2", "cosine", "l1" or "linf" between signatures.
    mesh: if given, the surrogates are fitted provider-sharded (see
      `_sharded_zest_fit`); provider_batch must then be None.
    **kernel_opts: forwarded to the distance kernel.

  Returns:
    [n, n] distance matrix.
  """
  nm.check_metric(metric)
  opts = ps.kernel_options(kernel_opts)
  fit_opts = dict(grid=grid, num_perturbations=num_perturbations,
                  num_references=num_references, fill=fill)
  if mesh is None:
    fit = zest_fit(apply_fn, params, model_state, reference_x, key,
                   provider_batch=provider_batch, **fit_opts)
  else:
    check_provider_batch(provider_batch, mesh)
    fit = _sharded_zest_fit(apply_fn, params, model_state, reference_x, key,
                            mesh, **fit_opts)
  n = fit.outputs.shape[0]
  r = ps.robust_centre_row(fit.outputs.reshape(n, -1), opts)
  base, offsets = _zest_offsets(fit, r)
  return ps.offset_distances(base, offsets, r, metric, opts)
