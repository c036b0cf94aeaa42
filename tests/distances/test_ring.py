"""The ring (providers split over 8 forced CPU devices, see conftest.py)
equals the single-device kernels and the float64 reference, moves provider
blocks only by collective-permute, and `model_distances` gives the same
matrix for every metric with and without a mesh."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import distances
from jaxrep.core.errors import ConfigError
from jaxrep.distances import numerics as nm
from jaxrep.distances import ring
from jaxrep.runtime import mesh as mesh_lib

N = 16

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS="
    "--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")


@pytest.fixture(scope="module")
def mesh():
  return mesh_lib.make_mesh(8)


@pytest.mark.parametrize("metric", distances.PARAM_METRICS)
@pytest.mark.parametrize("devices,block", [(8, 64), (4, 3)])
def test_ring_matches_unsharded_and_float64(metric, devices, block,
                                            rttd_population, ref_distances,
                                            check_matrix):
  x = rttd_population(np.random.default_rng(devices), N, 2000,
                      tight_attackers=devices == 4)
  tree = {"w": x[:, :1200].reshape(N, 30, 40), "b": x[:, 1200:]}
  d = np.asarray(distances.pairwise_distances(
      tree, metric, mesh=mesh_lib.make_mesh(devices), block_size=block))
  un = np.asarray(distances.pairwise_distances(tree, metric))
  check_matrix(d)
  np.testing.assert_allclose(d, ref_distances(x, metric), rtol=1e-4,
                             atol=1e-30)
  np.testing.assert_allclose(d, un, rtol=1e-4, atol=1e-30)


def test_ring_nonfinite_provider_is_inf_only_in_its_row(mesh, rttd_population,
                                                        ref_distances):
  x = rttd_population(np.random.default_rng(3), N, 2000)
  x[5, 7] = np.nan
  d = np.asarray(distances.pairwise_distances(x, "l2", mesh=mesh))
  others = np.delete(np.arange(N), 5)
  assert np.all(np.isinf(d[5, others])) and d[5, 5] == 0
  np.testing.assert_allclose(d[np.ix_(others, others)],
                             ref_distances(x[others], "l2"), rtol=1e-4)


def test_indivisible_population_is_a_config_error(mesh):
  with pytest.raises(ConfigError, match="x:"):
    distances.pairwise_distances(jnp.ones((12, 5)), "l2", mesh=mesh)


def test_ring_never_moves_the_population_except_by_permute(mesh):
  """Only the ring's collective-permute carries a provider block [n/d, P];
  the rest (centre row, tiles, per-row stats) is small."""
  n, p = 64, 4096
  x = mesh_lib.shard_provider_tree(jnp.ones((n, p)), mesh)
  sizes = nm.sizes(n // 8, 4, block_size=64, chunk_size=None,
                   max_bytes=64 * 2**20, centre_sample=256, fixup_tol=0.05)
  centre = mesh_lib.replicate_tree(np.int32(0), mesh)
  for metric in distances.PARAM_METRICS:
    fn = ring.ring_fn(mesh, metric, sizes, 1)
    ops = mesh_lib.collective_ops(fn.lower([x], centre).compile())
    block = (n // 8) * p * 4
    big = [op for op, size in ops if size >= block]
    assert big and all(op == "collective-permute" for op in big), ops
    small = [size for op, size in ops if op != "collective-permute"]
    assert max(small) <= max(p * 4, 4 * n * n), ops


@pytest.mark.parametrize("metric", distances.METRICS)
def test_model_distances_same_with_and_without_mesh(metric, mesh, tiny_mlp):
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map(
      lambda a: a + 1e-3 * rng.normal(size=a.shape).astype(np.float32),
      tiny_mlp.population(N, different=(13, 14, 15)))
  start = jax.tree_util.tree_map(lambda a: a[0], params)
  args = (metric, tiny_mlp.apply_fn, start, params, {},
          tiny_mlp.images(32), jax.random.key(7))
  got = distances.model_distances(*args, mesh=mesh)
  want = distances.model_distances(*args)
  assert got.dtype == want.dtype == np.float64
  assert np.all(want[13:, :13] > 0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12)


def test_model_distances_rejects_unknown_metric(tiny_mlp):
  with pytest.raises(ConfigError, match="metric"):
    distances.model_distances("kl", tiny_mlp.apply_fn, None, None, {}, None,
                              None)
