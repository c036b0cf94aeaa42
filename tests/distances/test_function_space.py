"""Function-space distances (output space, CKA) against numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import distances
from jaxrep.core.errors import ConfigError


def np_linear_cka(a, b):
  a = a - a.mean(0)
  b = b - b.mean(0)
  hsic = np.linalg.norm(a.T @ b) ** 2
  return hsic / (np.linalg.norm(a.T @ a) * np.linalg.norm(b.T @ b))


def test_output_distances_match_numpy(check_matrix, tiny_mlp):
  apply_fn = tiny_mlp.apply_fn
  params = tiny_mlp.population(4, different=(2,))
  probe = tiny_mlp.images(10)
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
  with pytest.raises(ConfigError, match="space"):
    distances.output_distances(apply_fn, params, {}, probe, space="logprobs")


def test_cka_identical_is_zero_and_different_matches_numpy(check_matrix,
                                                           tiny_mlp):
  apply_fn = tiny_mlp.apply_fn
  params = tiny_mlp.population(5, different=(1, 4))
  probe = tiny_mlp.images(32, seed=1)
  d = np.asarray(distances.cka_distances(apply_fn, params, None, probe))
  check_matrix(d)
  assert d[0, 2] == 0 and d[2, 3] == 0 and d[1, 4] == 0
  _, feats = jax.vmap(apply_fn, (0, None, None))(params, None, probe)
  f = np.asarray(feats, np.float64)
  ref = 1 - np_linear_cka(f[0], f[1])
  assert ref > 1e-3
  np.testing.assert_allclose(d[0, 1], ref, rtol=1e-4)


def test_cka_rttd_regime_relative_accuracy(max_rel_err):
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
