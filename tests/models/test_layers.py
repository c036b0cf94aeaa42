"""Tests for jaxrep.models.layers: precision, bf16 rounding, patch conv."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxrep.models import layers


def _normal(seed, shape):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def test_round_bf16_follows_the_flag():
  x = jnp.array([1.0 + 2.0**-10, 3.0, -0.1], jnp.float32)
  bf16 = x.astype(jnp.bfloat16).astype(jnp.float32)
  assert not np.array_equal(bf16, x)
  assert layers.round_bf16(x, None) is x
  np.testing.assert_array_equal(layers.round_bf16(x, jnp.bool_(False)), x)
  rounded = layers.round_bf16(x, jnp.bool_(True))
  assert rounded.dtype == jnp.float32
  np.testing.assert_array_equal(rounded, bf16)
  # A traced per-provider flag: one computation for both kinds of provider.
  both = jax.vmap(lambda f: layers.round_bf16(x, f))(jnp.array([False, True]))
  np.testing.assert_array_equal(both, np.stack([x, bf16]))


def test_dot_general_runs_at_highest_precision_on_rounded_operands():
  a, b = _normal(0, (4, 6)), _normal(1, (6, 3))
  dims = (((1,), (0,)), ((), ()))
  exact = lax.dot_general(a, b, dims, precision=lax.Precision.HIGHEST)
  dot = layers.dot_general(None)
  np.testing.assert_array_equal(dot(a, b, dims, precision=None), exact)
  rounded = lax.dot_general(layers.round_bf16(a, True),
                            layers.round_bf16(b, True), dims,
                            precision=lax.Precision.HIGHEST)
  np.testing.assert_array_equal(
      layers.dot_general(jnp.bool_(True))(a, b, dims), rounded)
  assert float(jnp.max(jnp.abs(rounded - exact))) > 0
  jaxpr = str(jax.make_jaxpr(lambda a, b: dot(a, b, dims))(a, b))
  assert "precision=(Precision.HIGHEST, Precision.HIGHEST)" in jaxpr


def test_dense_and_einsum_use_the_flag():
  x = _normal(2, (5, 7))
  module = layers.dense(3, jnp.bool_(True))
  params = module.init(jax.random.key(0), x)
  kernel = params["params"]["kernel"]
  expected = (layers.round_bf16(x, True) @ layers.round_bf16(kernel, True)
              + params["params"]["bias"])
  np.testing.assert_allclose(module.apply(params, x), expected, rtol=1e-6)
  a, b = _normal(3, (2, 4)), _normal(4, (4, 3))
  np.testing.assert_array_equal(
      layers.einsum(None, "ij,jk->ik", a, b),
      jnp.einsum("ij,jk->ik", a, b, precision=lax.Precision.HIGHEST))


@pytest.mark.parametrize("kernel,strides,padding", [
    ((5, 5), (1, 1), "SAME"),
    ((3, 3), (2, 2), "SAME"),
    ((3, 3), (1, 1), "VALID"),
    ((1, 1), (2, 2), "VALID"),
    ((3, 2), (2, 1), ((1, 0), (2, 1))),
])
def test_patch_conv_matches_lax_conv(kernel, strides, padding):
  x = _normal(5, (2, 9, 8, 3))
  w = _normal(6, (*kernel, 3, 4))
  conv = layers.conv_general_dilated(None)
  got = conv(x, w, strides, padding)
  want = lax.conv_general_dilated(x, w, strides, padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                  precision=lax.Precision.HIGHEST)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_conv_module_is_patch_conv_with_rounding():
  x = _normal(7, (2, 6, 6, 1))
  module = layers.conv(4, (3, 3), jnp.bool_(True), padding="SAME",
                       use_bias=False)
  params = module.init(jax.random.key(0), x)
  kernel = params["params"]["kernel"]
  want = layers.conv_general_dilated(None)(
      layers.round_bf16(x, True), layers.round_bf16(kernel, True), (1, 1),
      "SAME")
  np.testing.assert_array_equal(module.apply(params, x), want)
