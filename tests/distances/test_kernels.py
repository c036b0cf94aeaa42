"""Tests of jaxrep.distances.kernels against exact float64 numpy / scipy references."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy.spatial.distance import cdist

from jaxrep.distances import kernels as distances
from jaxrep.core.errors import ConfigError

SCIPY = {"l2": "euclidean", "l1": "cityblock", "linf": "chebyshev"}
HYP = settings(max_examples=20, deadline=None, derandomize=True)
# Few distinct shapes: every new shape is a new compile (seconds on a CPU),
# while values (seeds, scales, spreads) vary freely.
ORDINARY_SHAPES = st.sampled_from([(1, 1), (7, 33), (12, 300)])
RTTD_SHAPES = st.sampled_from([(5, 64), (24, 400)])


# --------------------------------------------------------------------------
# Exact float64 references.


def ref_distances(x, metric):
  """Exact float64 reference on the (float32) input converted to float64."""
  x = np.asarray(x, np.float64)
  if metric == "cosine":
    # 1 - cos = |u - v|^2 / 2 on normalized rows: exact to ~1e-16 absolute,
    # unlike scipy's 1 - u.v / (|u||v|), which loses ~1e-4 relative at the
    # 1e-12 cosine distances of benign replicas.
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    d = 0.5 * ((u[:, None, :] - u[None, :, :]) ** 2).sum(-1)
  else:
    d = cdist(x, x, SCIPY[metric])
  np.fill_diagonal(d, 0)
  return d


def max_rel_err(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  mask = ref > 0
  assert np.all(got[~mask] == 0)
  if not mask.any():
    return 0.0
  return float(np.max(np.abs(got[mask] - ref[mask]) / ref[mask]))


def check_matrix(d):
  d = np.asarray(d)
  assert d.shape[0] == d.shape[1]
  np.testing.assert_array_equal(d, d.T)
  np.testing.assert_array_equal(np.diag(d), 0)
  assert np.all(d >= 0)


def rttd_population(rng, n, p, spread=1e-6, tight_attackers=False):
  """Benign rows = base + spread*|base| noise; half the rows far away."""
  base = rng.normal(size=p)
  scale = np.linalg.norm(base) / np.sqrt(p)
  nb = n // 2
  x = np.empty((n, p))
  x[:nb] = base + spread * scale * rng.normal(size=(nb, p))
  if tight_attackers:   # colluders: the same attack, benign-like spread
    off = scale * rng.normal(size=p)
    x[nb:] = base + off + spread * scale * rng.normal(size=(n - nb, p))
  else:                 # each attacker elsewhere (distance ~ norm)
    x[nb:] = base + scale * rng.normal(size=(n - nb, p))
  return x[rng.permutation(n)].astype(np.float32)


# --------------------------------------------------------------------------
# Parameter-space kernels.


@pytest.mark.parametrize("metric", distances.METRICS)
@HYP
@given(shape=ORDINARY_SHAPES, seed=st.integers(0, 10**6),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_ordinary_regime_matches_float64(metric, shape, seed, scale):
  n, p = shape
  x = (np.random.default_rng(seed).normal(size=(n, p)) * scale).astype(
      np.float32)
  d = distances.pairwise_distances(jnp.asarray(x), metric)
  check_matrix(d)
  assert max_rel_err(d, ref_distances(x, metric)) <= 1e-4


@pytest.mark.parametrize("metric", distances.METRICS)
@HYP
@given(shape=RTTD_SHAPES, seed=st.integers(0, 10**6),
       spread=st.sampled_from([1e-7, 1e-6, 1e-5]), tight=st.booleans())
def test_rttd_regime_matches_float64(metric, shape, seed, spread, tight):
  n, p = shape
  x = rttd_population(np.random.default_rng(seed), n, p, spread, tight)
  d = distances.pairwise_distances(jnp.asarray(x), metric)
  check_matrix(d)
  assert max_rel_err(d, ref_distances(x, metric)) <= 1e-4


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("tight", [False, True])
def test_realistic_rttd_case(metric, tight):
  """n=48, P=6000 float32, benign spread 1e-6 of the norm, half malicious."""
  x = rttd_population(np.random.default_rng(1), 48, 6000, 1e-6, tight)
  ref = ref_distances(x, metric)
  d = np.asarray(distances.pairwise_distances(jnp.asarray(x), metric))
  check_matrix(d)
  err = max_rel_err(d, ref)
  assert err <= 1e-4, err
  # Benign distances are tiny next to the norms, so the regime is real.
  norms = np.linalg.norm(x, axis=1)
  off = ref[ref > 0]
  if metric == "l2":
    assert off.min() / norms.max() < 1e-5


def test_plain_gram_fails_in_rttd_regime():
  """The reference test can fail: an uncentred Gram product is far off."""
  x = rttd_population(np.random.default_rng(2), 16, 2000)
  xj = jnp.asarray(x)
  sq = jnp.sum(xj * xj, 1)
  g = jnp.dot(xj, xj.T, precision=jax.lax.Precision.HIGHEST)
  naive = np.sqrt(np.maximum(np.asarray(sq[:, None] + sq[None] - 2 * g), 0))
  np.fill_diagonal(naive, 0)
  assert max_rel_err(naive, ref_distances(x, "l2")) > 1e-2


def test_fixup_is_needed_for_tight_far_cluster():
  """Centring on a benign row leaves colluders unresolved without fix-up."""
  x = rttd_population(np.random.default_rng(3), 16, 3000, tight_attackers=True)
  ref = ref_distances(x, "l2")
  good = distances.pairwise_distances(jnp.asarray(x), "l2")
  bad = distances.pairwise_distances(jnp.asarray(x), "l2", fixup_tol=0.0)
  assert max_rel_err(good, ref) <= 1e-4
  assert max_rel_err(bad, ref) > 1e-3


@pytest.mark.parametrize("metric", distances.METRICS)
def test_tiled_chunked_equals_untiled(metric):
  x = rttd_population(np.random.default_rng(4), 13, 257, tight_attackers=True)
  big = distances.pairwise_distances(jnp.asarray(x), metric)
  small = distances.pairwise_distances(jnp.asarray(x), metric, block_size=3,
                                       chunk_size=7)
  np.testing.assert_allclose(np.asarray(small), np.asarray(big), rtol=2e-5,
                             atol=0)
  assert max_rel_err(small, ref_distances(x, metric)) <= 1e-4


@pytest.mark.parametrize("metric", distances.METRICS)
def test_pytree_equals_flat(metric):
  rng = np.random.default_rng(5)
  n = 9
  tree = {"w": rng.normal(size=(n, 7, 5)).astype(np.float32),
          "b": rng.normal(size=(n, 5)).astype(np.float32),
          "s": [rng.normal(size=(n,)).astype(np.float32)]}
  flat = np.concatenate([l.reshape(n, -1)
                         for l in jax.tree_util.tree_leaves(tree)], 1)
  d_tree = distances.pairwise_distances(tree, metric, chunk_size=16)
  d_flat = distances.pairwise_distances(jnp.asarray(flat), metric)
  np.testing.assert_allclose(np.asarray(d_tree), np.asarray(d_flat),
                             rtol=1e-5)
  assert max_rel_err(d_tree, ref_distances(flat, metric)) <= 1e-4


@pytest.mark.parametrize("metric", distances.METRICS)
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_provider_is_isolated(metric, bad_value):
  x = rttd_population(np.random.default_rng(6), 10, 200)
  clean = np.asarray(distances.pairwise_distances(jnp.asarray(x), metric))
  x[3, 17] = bad_value
  x[7] = bad_value
  d = np.asarray(distances.pairwise_distances(jnp.asarray(x), metric,
                                              centre=None))
  ok = np.array([i not in (3, 7) for i in range(10)])
  assert np.all(np.isinf(d[3, [i for i in range(10) if i != 3]]))
  assert np.all(np.isinf(d[:, 7][np.arange(10) != 7]))
  assert d[3, 3] == 0 and d[7, 7] == 0
  np.testing.assert_allclose(d[np.ix_(ok, ok)], clean[np.ix_(ok, ok)],
                             rtol=1e-5)


def test_nonfinite_centre_row_is_isolated():
  x = rttd_population(np.random.default_rng(7), 8, 100)
  x[0, 5] = np.nan
  d = np.asarray(distances.pairwise_distances(jnp.asarray(x), "l2",
                                              centre=0))
  ref = ref_distances(np.nan_to_num(x), "l2")
  assert np.all(np.isinf(d[0, 1:]))
  assert max_rel_err(d[1:, 1:], ref[1:, 1:]) <= 1e-4


def test_one_compile_per_shape():
  x = jnp.ones((6, 40))
  fn = distances._pairwise_jit
  distances.pairwise_distances(x, "l2", chunk_size=19)
  before = fn._cache_size()
  for k in range(3):
    distances.pairwise_distances(x + k, "l2", chunk_size=19)
  assert fn._cache_size() == before


def test_bad_input_raises_config_error():
  with pytest.raises(ConfigError, match="metric"):
    distances.pairwise_distances(jnp.ones((3, 4)), "l3")
  with pytest.raises(ConfigError, match="leading provider axis"):
    distances.pairwise_distances({"a": jnp.ones((3, 4)),
                                  "b": jnp.ones((4, 4))})
  with pytest.raises(ConfigError, match="block_size"):
    distances.pairwise_distances(jnp.ones((3, 4)), block_size=0)
  with pytest.raises(ConfigError, match="x"):
    distances.pairwise_distances({})
  with pytest.raises(ConfigError, match="start_params"):
    distances.updates({"w": jnp.ones((3,))}, {"w": jnp.ones((2, 4))})


def test_updates_broadcasts_start():
  start = {"w": jnp.arange(3.0)}
  end = {"w": jnp.arange(6.0).reshape(2, 3)}
  np.testing.assert_array_equal(distances.updates(start, end)["w"],
                                [[0, 0, 0], [3, 3, 3]])
  np.testing.assert_array_equal(distances.updates(end, end)["w"],
                                np.zeros((2, 3)))


# --------------------------------------------------------------------------
# Model-based metrics.


class TinyMLP(nn.Module):
  """Flatten -> Dense(16) -> tanh (features) -> Dense(classes)."""
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.classes)(h), h


MODEL = TinyMLP()


def apply_fn(params, model_state, x):
  del model_state
  return MODEL.apply({"params": params}, x)


@functools.lru_cache(maxsize=None)
def init_params(seed):
  """TinyMLP parameters drawn with numpy (no init compile)."""
  rng = np.random.default_rng(seed)
  dense = lambda i, o: {"kernel": (rng.normal(size=(i, o)) / np.sqrt(i))
                        .astype(np.float32),
                        "bias": (0.1 * rng.normal(size=(o,))).astype(
                            np.float32)}
  return {"Dense_0": dense(64, 16), "Dense_1": dense(16, MODEL.classes)}


def population(n, seed=0, different=()):
  """n copies of one MLP; providers in `different` get other weights."""
  base, other = init_params(seed), init_params(seed + 100)
  pick = np.asarray([i in different for i in range(n)])

  def stack(b, o):
    return jnp.asarray(np.where(pick.reshape((n,) + (1,) * b.ndim), o[None],
                                b[None]))

  return jax.tree_util.tree_map(stack, base, other)


def images(n, seed=0):
  return jax.random.uniform(jax.random.PRNGKey(seed), (n, 8, 8, 1))


def np_linear_cka(a, b):
  a = a - a.mean(0)
  b = b - b.mean(0)
  hsic = np.linalg.norm(a.T @ b) ** 2
  return hsic / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))


def test_output_distances_match_numpy():
  params = population(4, different=(2,))
  probe = images(10)
  for space in distances.OUTPUT_SPACES:
    d = np.asarray(distances.output_distances(apply_fn, params, {}, probe,
                                              space=space))
    check_matrix(d)
    logits, _ = jax.vmap(apply_fn, (0, None, None))(params, None, probe)
    z = np.asarray(logits, np.float64)
    if space == "probs":
      p = np.exp(z - z.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      ref = 0.5 * np.abs(p[:, None] - p[None]).sum(-1).mean(-1)
    else:
      ref = np.abs(z[:, None] - z[None]).mean((-1, -2))
    np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-7)
    assert d[0, 1] == 0 and d[0, 2] > 0


def test_cka_identical_is_zero_and_different_matches_numpy():
  params = population(5, different=(1, 4))
  probe = images(32, seed=1)
  d = np.asarray(distances.cka_distances(apply_fn, params, None, probe))
  check_matrix(d)
  assert d[0, 2] == 0 and d[2, 3] == 0 and d[1, 4] == 0
  _, feats = jax.vmap(apply_fn, (0, None, None))(params, None, probe)
  f = np.asarray(feats, np.float64)
  ref = 1 - np_linear_cka(f[0], f[1])
  assert ref > 1e-3
  np.testing.assert_allclose(d[0, 1], ref, rtol=1e-4)


def test_cka_rttd_regime_relative_accuracy():
  """Features differing by 1e-6 relative keep relative accuracy."""
  rng = np.random.default_rng(8)
  base = rng.normal(size=(40, 12))
  feats = np.stack([base + 1e-6 * rng.normal(size=base.shape)
                    for _ in range(5)]).astype(np.float32)
  fake_apply = lambda p, s, x: (x @ jnp.ones((12, 3)), p + 0 * x)
  d = np.asarray(distances.cka_distances(fake_apply, jnp.asarray(feats), {},
                                         jnp.zeros((40, 12))))
  f = feats.astype(np.float64)
  # Exact reference: cosine distance of flattened centred Gram matrices
  # built from float64 features.
  ks = []
  for fi in f:
    c = fi - fi.mean(0)
    k = (c @ c.T).ravel()
    ks.append(k / np.linalg.norm(k))
  ks = np.stack(ks)
  ref = 0.5 * ((ks[:, None] - ks[None]) ** 2).sum(-1)
  np.fill_diagonal(ref, 0)
  assert ref[ref > 0].max() < 1e-9
  assert max_rel_err(d, ref) <= 1e-3


def test_zest_fit_matches_lstsq():
  params = population(3, different=(2,))
  refs = images(6, seed=2)
  fit = distances.zest_fit(apply_fn, params, {}, refs, jax.random.PRNGKey(0),
                           grid=3, num_perturbations=20, num_references=4,
                           fill="mean")
  assert fit.coefficients.shape == (3, 4, 10, 5)
  for r in range(4):
    a = np.asarray(fit.design[r], np.float64)
    y = np.asarray(fit.outputs[1, r], np.float64)
    ref = np.linalg.lstsq(a, y, rcond=None)[0]
    np.testing.assert_allclose(np.asarray(fit.coefficients[1, r]), ref,
                               rtol=1e-3, atol=1e-5)
  sig = distances.zest_signatures(fit)
  assert sig.shape == (3, 4 * 9 * 5)


@pytest.mark.parametrize("metric", distances.METRICS)
def test_zest_identical_zero_different_larger(metric):
  params = population(4, different=(3,))
  refs = images(5, seed=3)
  d = np.asarray(distances.zest_distances(
      apply_fn, params, {}, refs, jax.random.PRNGKey(1), grid=2,
      num_perturbations=12, metric=metric))
  check_matrix(d)
  assert d[0, 1] == 0 and d[1, 2] == 0
  assert np.all(d[3, :3] > 0)
  fit = distances.zest_fit(apply_fn, params, {}, refs, jax.random.PRNGKey(1),
                           grid=2, num_perturbations=12)
  sig = np.asarray(distances.zest_signatures(fit), np.float64)
  ref = ref_distances(sig, metric)
  np.testing.assert_allclose(d[3, :3], ref[3, :3], rtol=1e-3)


def test_zest_bad_options_raise():
  params = population(2)
  refs = images(3)
  key = jax.random.PRNGKey(0)
  with pytest.raises(ConfigError, match="num_perturbations"):
    distances.zest_fit(apply_fn, params, {}, refs, key, grid=4,
                       num_perturbations=10)
  with pytest.raises(ConfigError, match="num_references"):
    distances.zest_fit(apply_fn, params, {}, refs, key, num_references=9)
  with pytest.raises(ConfigError, match="fill"):
    distances.zest_fit(apply_fn, params, {}, refs, key, fill="noise")
  with pytest.raises(ConfigError, match="space"):
    distances.output_distances(apply_fn, params, {}, refs, space="logprobs")


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
