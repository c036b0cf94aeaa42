"""Zest: LIME surrogates fitted exactly, distances between signatures, on
images and on token sequences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import distances
from jaxrep.core.errors import ConfigError


def test_zest_fit_matches_lstsq(tiny_mlp):
  params = tiny_mlp.population(3, different=(2,))
  refs = tiny_mlp.images(6, seed=2)
  fit = distances.zest_fit(tiny_mlp.apply_fn, params, {}, refs,
                           jax.random.PRNGKey(0), grid=3, num_perturbations=20,
                           num_references=4, fill="mean")
  assert fit.coefficients.shape == (3, 4, 10, 5)
  for r in range(4):
    a = np.asarray(fit.design[r], np.float64)
    y = np.asarray(fit.outputs[1, r], np.float64)
    ref = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(fit.coefficients[1, r]), ref,
                               rtol=1e-3, atol=1e-5)
  sig = distances.zest_signatures(fit)
  assert sig.shape == (3, 4 * 9 * 5)


@pytest.mark.parametrize("metric", distances.PARAM_METRICS)
def test_zest_identical_zero_different_larger(metric, ref_distances,
                                              check_matrix, tiny_mlp):
  params = tiny_mlp.population(4, different=(3,))
  refs = tiny_mlp.images(5, seed=3)
  d = np.asarray(distances.zest_distances(
      tiny_mlp.apply_fn, params, {}, refs, jax.random.PRNGKey(1), grid=2,
      num_perturbations=12, metric=metric))
  check_matrix(d)
  assert d[0, 1] == 0 and d[1, 2] == 0
  assert np.all(d[3, :3] > 0)
  fit = distances.zest_fit(tiny_mlp.apply_fn, params, {}, refs,
                           jax.random.PRNGKey(1), grid=2, num_perturbations=12)
  sig = np.asarray(distances.zest_signatures(fit), np.float64)
  ref = ref_distances(sig, metric)
  np.testing.assert_allclose(d[3, :3], ref[3, :3], rtol=1e-3)


def test_zest_bad_options_raise(tiny_mlp):
  apply_fn = tiny_mlp.apply_fn
  params = tiny_mlp.population(2)
  refs = tiny_mlp.images(3)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ConfigError, match="num_perturbations"):
    distances.zest_fit(apply_fn, params, {}, refs, key, grid=4,
                       num_perturbations=10)
  with pytest.raises(ConfigError, match="num_references"):
    distances.zest_fit(apply_fn, params, {}, refs, key, num_references=9)
  with pytest.raises(ConfigError, match="fill"):
    distances.zest_fit(apply_fn, params, {}, refs, key, fill="noise")
  with pytest.raises(ConfigError, match="metric"):
    distances.zest_distances(apply_fn, params, {}, refs, key, metric="kl")


# --------------------------------------------------------------------------
# Zest on token sequences: token masking as the perturbation.


def _bag_of_embeddings(params, model_state, tokens):
  """A tiny text model: mean of the token embeddings (pad id 0 counts as a
  token with its own embedding), then a linear layer."""
  del model_state
  h = jnp.mean(params["emb"][tokens], axis=1)
  return h @ params["w"], h


def _text_population(n, vocab=50, dim=8, classes=3, seed=0):
  rng = np.random.default_rng(seed)
  base = {"emb": rng.normal(size=(vocab, dim)).astype(np.float32),
          "w": rng.normal(size=(dim, classes)).astype(np.float32)}
  params = jax.tree_util.tree_map(
      lambda a: jnp.asarray(np.repeat(a[None], n, 0)), base)
  return params, {}


def test_zest_masks_token_spans_and_fits_lime_exactly():
  params, state = _text_population(3)
  params = jax.tree_util.tree_map(lambda a: a.at[2].multiply(1.5), params)
  rng = np.random.default_rng(1)
  refs = jnp.asarray(rng.integers(2, 50, size=(2, 16)), jnp.int32)
  fit = distances.zest_fit(_bag_of_embeddings, params, state, refs,
                           jax.random.key(0), grid=2, num_perturbations=12,
                           fill=1)
  design = np.asarray(fit.design)                    # [R, S, 1 + 4]
  assert design.shape == (2, 12, 5)
  for r in range(2):
    for s in range(12):
      keep = np.repeat(design[r, s, 1:].astype(bool), 4)   # 4 spans of 4
      tokens = np.where(keep, np.asarray(refs[r]), 1)      # masked -> unk
      for i in range(3):
        one = jax.tree_util.tree_map(lambda a: a[i], params)
        logits, _ = _bag_of_embeddings(one, {}, jnp.asarray(tokens[None]))
        np.testing.assert_allclose(fit.outputs[i, r, s],
                                   jax.nn.softmax(logits[0]), rtol=1e-5,
                                   atol=1e-7)
    for i in range(3):
      coef, *_ = np.linalg.lstsq(design[r].astype(np.float64),
                                 np.asarray(fit.outputs[i, r], np.float64),
                                 rcond=None)
      np.testing.assert_allclose(fit.coefficients[i, r], coef, atol=2e-5)
  d = np.asarray(distances.zest_distances(_bag_of_embeddings, params, state,
                                          refs, jax.random.key(0), grid=2,
                                          num_perturbations=12))
  assert d[0, 1] == 0.0 and d[0, 2] > 0 and d[1, 2] > 0


@pytest.mark.parametrize("kwargs, field", [
    (dict(grid=5), "grid"),                 # 25 spans > 16 tokens
    (dict(fill="mean"), "fill"),
    (dict(fill=-1), "fill"),
])
def test_zest_on_tokens_rejects_bad_options(kwargs, field):
  params, state = _text_population(2)
  refs = jnp.zeros((2, 16), jnp.int32)
  with pytest.raises(ConfigError, match=field):
    distances.zest_fit(_bag_of_embeddings, params, state, refs,
                       jax.random.key(0), **kwargs)
