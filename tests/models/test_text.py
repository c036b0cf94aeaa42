"""Tests for jaxrep.models.text: TextCNN and TextTransformer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep.data import PAD
from jaxrep.models import text

V, C = 40, 3


def _tokens(seed, rows, length, max_real):
  """Random texts of 1..max_real word ids (>= 2), right-padded with PAD."""
  rng = np.random.default_rng(seed)
  x = np.full((rows, length), PAD, np.int32)
  for i, n in enumerate(rng.integers(1, max_real + 1, rows)):
    x[i, :n] = rng.integers(2, V, n)
  return x


@pytest.mark.parametrize("cls,kwargs", [
    (text.TextCNN, {}), (text.TextTransformer, {"max_len": 24})])
def test_outputs_ignore_trailing_padding(cls, kwargs):
  module = cls(num_classes=C, vocab_size=V, **kwargs)
  x = _tokens(0, 6, 16, 12)
  padded = np.pad(x, ((0, 0), (0, 8)))
  variables = jax.jit(module.init)(jax.random.key(0), jnp.asarray(padded))
  apply = jax.jit(module.apply)
  logits, features = apply(variables, jnp.asarray(x))
  logits_p, features_p = apply(variables, jnp.asarray(padded))
  assert logits.shape == (6, C) and features.shape[0] == 6
  np.testing.assert_allclose(logits, logits_p, atol=1e-5)
  np.testing.assert_allclose(features, features_p, atol=1e-5)
  empty = apply(variables, jnp.zeros((6, 16), jnp.int32))[0]
  assert np.all(np.isfinite(np.asarray(empty)))


def test_transformer_parameter_names():
  module = text.TextTransformer(num_classes=C, vocab_size=V, max_len=8,
                                depth=2)
  params = module.init(jax.random.key(0), jnp.ones((1, 8), jnp.int32))
  params = params["params"]
  assert set(params) == {"embed", "pos_embed", "block0", "block1",
                         "ln_final", "head"}
  assert set(params["block0"]) == {"ln_attn", "qkv", "attn_out", "ln_mlp",
                                   "mlp_in", "mlp_out"}
