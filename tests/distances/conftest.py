"""Fixtures of the distance tests: exact float64 references, RTTD-like
populations, and a tiny MLP population for the function-space metrics."""

import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.spatial.distance import cdist

SCIPY = {"l2": "euclidean", "l1": "cityblock", "linf": "chebyshev"}


def _ref_distances(x, metric):
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


def _max_rel_err(got, ref):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  mask = ref > 0
  assert np.all(got[~mask] == 0)
  if not mask.any():
    return 0.0
  return float(np.max(np.abs(got[mask] - ref[mask]) / ref[mask]))


def _check_matrix(d):
  d = np.asarray(d)
  assert d.shape[0] == d.shape[1]
  np.testing.assert_array_equal(d, d.T)
  np.testing.assert_array_equal(np.diag(d), 0)
  assert np.all(d >= 0)


def _rttd_population(rng, n, p, spread=1e-6, tight_attackers=False):
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


@pytest.fixture(scope="session")
def ref_distances():
  """`ref_distances(x, metric)`: exact float64 [n, n] matrix."""
  return _ref_distances


@pytest.fixture(scope="session")
def max_rel_err():
  """`max_rel_err(got, ref)`: largest relative error on ref's non-zeros
  (got must be exactly zero where ref is)."""
  return _max_rel_err


@pytest.fixture(scope="session")
def check_matrix():
  """`check_matrix(d)`: square, exactly symmetric, zero diagonal, >= 0."""
  return _check_matrix


@pytest.fixture(scope="session")
def rttd_population():
  """`rttd_population(rng, n, p, spread, tight_attackers)`: float32 rows in
  the RTTD regime (benign replicas within `spread` of each other)."""
  return _rttd_population


class TinyMLP(nn.Module):
  """Flatten -> Dense(16) -> tanh (features) -> Dense(classes)."""
  classes: int = 5

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(16)(x.reshape(x.shape[0], -1)))
    return nn.Dense(self.classes)(h), h


def _mlp_params(seed):
  """TinyMLP parameters for 8 x 8 inputs, drawn with numpy (no compile)."""
  rng = np.random.default_rng(seed)
  dense = lambda i, o: {"kernel": (rng.normal(size=(i, o)) / np.sqrt(i))
                        .astype(np.float32),
                        "bias": (0.1 * rng.normal(size=(o,))).astype(
                            np.float32)}
  return {"Dense_0": dense(64, 16), "Dense_1": dense(16, TinyMLP.classes)}


@pytest.fixture(scope="session")
def tiny_mlp():
  """A tiny MLP on 8 x 8 images:

  apply_fn(params, model_state, x) -> (logits [B, 5], features [B, 16]);
  population(n, seed=0, different=()): n copies of one model, providers in
    `different` with other weights;
  images(n, seed=0): [n, 8, 8, 1] inputs.
  """
  model = TinyMLP()

  def apply_fn(params, model_state, x):
    del model_state
    return model.apply({"params": params}, x)

  def population(n, seed=0, different=()):
    base, other = _mlp_params(seed), _mlp_params(seed + 100)
    pick = np.asarray([i in different for i in range(n)])
    stack = lambda b, o: jnp.asarray(
        np.where(pick.reshape((n,) + (1,) * b.ndim), o[None], b[None]))
    return jax.tree_util.tree_map(stack, base, other)

  def images(n, seed=0):
    return jax.random.uniform(jax.random.PRNGKey(seed), (n, 8, 8, 1))

  return types.SimpleNamespace(apply_fn=apply_fn, population=population,
                               images=images)
