"""Parameter-space distances on one device against exact float64 references
(numpy / scipy), in the ordinary regime and in RTTD's (benign replicas about
1e-6 of the norm apart)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxrep import distances
from jaxrep.core.errors import ConfigError
from jaxrep.distances import parameter_space

HYP = settings(max_examples=20, deadline=None, derandomize=True)
# Few distinct shapes: every new shape is a new compile (seconds on a CPU),
# while values (seeds, scales, spreads) vary freely.
ORDINARY_SHAPES = st.sampled_from([(1, 1), (7, 33), (12, 300)])
RTTD_SHAPES = st.sampled_from([(5, 64), (24, 400)])


@pytest.mark.parametrize("metric", distances.PARAM_METRICS)
@HYP
@given(shape=ORDINARY_SHAPES, seed=st.integers(0, 10**6),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_ordinary_regime_matches_float64(metric, shape, seed, scale,
                                         ref_distances, max_rel_err,
                                         check_matrix):
  n, p = shape
  x = (np.random.default_rng(seed).normal(size=(n, p)) * scale).astype(
      np.float32)
  d = distances.pairwise_distances(jnp.asarray(x), metric)
  check_matrix(d)
  assert max_rel_err(d, ref_distances(x, metric)) <= 1e-4


@pytest.mark.parametrize("metric", distances.PARAM_METRICS)
@HYP
@given(shape=RTTD_SHAPES, seed=st.integers(0, 10**6),
       spread=st.sampled_from([1e-7, 1e-6, 1e-5]), tight=st.booleans())
def test_rttd_regime_matches_float64(metric, shape, seed, spread, tight,
                                     ref_distances, max_rel_err, check_matrix,
                                     rttd_population):
  n, p = shape
  x = rttd_population(np.random.default_rng(seed), n, p, spread, tight)
  d = distances.pairwise_distances(jnp.asarray(x), metric)
  check_matrix(d)
  assert max_rel_err(d, ref_distances(x, metric)) <= 1e-4


@pytest.mark.parametrize("metric", ["l2", "cosine"])
@pytest.mark.parametrize("tight", [False, True])
def test_realistic_rttd_case(metric, tight, ref_distances, max_rel_err,
                             check_matrix, rttd_population):
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


def test_plain_gram_fails_in_rttd_regime(ref_distances, max_rel_err,
                                         rttd_population):
  """The reference test can fail: an uncentred Gram product is far off."""
  x = rttd_population(np.random.default_rng(2), 16, 2000)
  xj = jnp.asarray(x)
  sq = jnp.sum(xj * xj, 1)
  g = jnp.dot(xj, xj.T, precision=jax.lax.Precision.HIGHEST)
  naive = np.sqrt(np.maximum(np.asarray(sq[:, None] + sq[None] - 2 * g), 0))
  np.fill_diagonal(naive, 0)
  assert max_rel_err(naive, ref_distances(x, "l2")) > 1e-2


def test_fixup_is_needed_for_tight_far_cluster(ref_distances, max_rel_err,
                                               rttd_population):
  """Centring on a benign row leaves colluders unresolved without fix-up."""
  x = rttd_population(np.random.default_rng(3), 16, 3000, tight_attackers=True)
  ref = ref_distances(x, "l2")
  good = distances.pairwise_distances(jnp.asarray(x), "l2")
  bad = distances.pairwise_distances(jnp.asarray(x), "l2", fixup_tol=0.0)
  assert max_rel_err(good, ref) <= 1e-4
  assert max_rel_err(bad, ref) > 1e-3


@pytest.mark.parametrize("metric", distances.PARAM_METRICS)
def test_tiled_chunked_equals_untiled(metric, ref_distances, max_rel_err,
                                      rttd_population):
  x = rttd_population(np.random.default_rng(4), 13, 257, tight_attackers=True)
  big = distances.pairwise_distances(jnp.asarray(x), metric)
  small = distances.pairwise_distances(jnp.asarray(x), metric, block_size=3,
                                       chunk_size=7)
  np.testing.assert_allclose(np.asarray(small), np.asarray(big), rtol=2e-5,
                             atol=0)
  assert max_rel_err(small, ref_distances(x, metric)) <= 1e-4


@pytest.mark.parametrize("metric", distances.PARAM_METRICS)
def test_pytree_equals_flat(metric, ref_distances, max_rel_err):
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


@pytest.mark.parametrize("metric", distances.PARAM_METRICS)
@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf])
def test_nonfinite_provider_is_isolated(metric, bad_value, rttd_population):
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


def test_nonfinite_centre_row_is_isolated(ref_distances, max_rel_err,
                                          rttd_population):
  x = rttd_population(np.random.default_rng(7), 8, 100)
  x[0, 5] = np.nan
  d = np.asarray(distances.pairwise_distances(jnp.asarray(x), "l2",
                                              centre=0))
  ref = ref_distances(np.nan_to_num(x), "l2")
  assert np.all(np.isinf(d[0, 1:]))
  assert max_rel_err(d[1:, 1:], ref[1:, 1:]) <= 1e-4


def test_one_compile_per_shape():
  x = jnp.ones((6, 40))
  fn = parameter_space._pairwise_jit
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


def test_resolution_is_eps32_times_the_median_rms_parameter():
  rng = np.random.default_rng(0)
  params = {"w": rng.normal(size=(5, 3, 4)).astype(np.float32),
            "b": rng.normal(size=(5, 4)).astype(np.float32)}
  flat = np.concatenate([params["w"].reshape(5, -1), params["b"]], axis=1)
  eps = np.finfo(np.float32).eps
  want = eps * np.median(np.sqrt((flat.astype(np.float64) ** 2).mean(1)))
  for metric in ("l2", "l1", "linf"):
    np.testing.assert_allclose(distances.resolution(metric, params), want,
                               rtol=1e-5)
  assert distances.resolution("cosine", params) == 0.0
  with pytest.raises(ConfigError, match="metric"):
    distances.resolution("nope", params)
