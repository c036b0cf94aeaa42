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


def _bit_patterns(count=200_000):
  """float32 values from random bit patterns (every exponent, subnormals,
  infinities and NaNs) plus the edge cases of rounding."""
  u = np.random.default_rng(0).integers(0, 2**32, count, dtype=np.uint64)
  edges = [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001,
           0x007FFFFF, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000,
           0x3F801000, 0x3F803000]
  u = np.concatenate([u.astype(np.uint32), np.array(edges, np.uint32)])
  return u.view(np.float32)


def test_round_mantissa_is_bitwise_the_cast_for_bf16_and_fp16():
  x = _bit_patterns()
  finite = ~np.isnan(x)
  bits = lambda a: np.asarray(a).view(np.uint32)
  rnd = jax.jit(layers.round_mantissa)
  bf16 = np.asarray(jnp.asarray(x).astype(jnp.bfloat16).astype(jnp.float32))
  np.testing.assert_array_equal(bits(rnd(x, 7))[finite], bits(bf16)[finite])
  assert np.isnan(np.asarray(rnd(x, 7))[~finite]).all()
  np.testing.assert_array_equal(bits(rnd(x, 23)), bits(x))   # no-op
  # 10 bits: float16's mantissa; equal to the float16 cast where float16's
  # exponent reaches (TF32 has float32's exponent, so no range limit).
  f16 = np.asarray(jnp.asarray(x).astype(jnp.float16).astype(jnp.float32))
  normal = finite & (np.abs(x) >= 2.0**-14) & (np.abs(x) <= 65504)
  np.testing.assert_array_equal(bits(rnd(x, 10))[normal], bits(f16)[normal])
  big = np.float32(1e30)
  assert float(rnd(big, 10)) != float(big) and np.isfinite(rnd(big, 10))


def test_round_mantissa_ties_to_even():
  one = 1.0
  ulp10 = 2.0**-10
  x = jnp.array([one + ulp10 / 2, one + 3 * ulp10 / 2, one + ulp10 / 2 + 2**-20,
                 -(one + ulp10 / 2)], jnp.float32)
  np.testing.assert_array_equal(
      layers.round_mantissa(x, 10),
      np.array([one, one + 2 * ulp10, one + ulp10, -one], np.float32))


def test_round_mantissa_traced_bits_and_bool_flag():
  x = _normal(8, (64,))
  both = jax.vmap(lambda b: layers.round_mantissa(x, b))(
      jnp.array([23, 10, 7], jnp.int32))
  np.testing.assert_array_equal(both[0], x)
  np.testing.assert_array_equal(both[2], layers.round_bf16(x, True))
  err10 = float(jnp.max(jnp.abs(both[1] - x) / jnp.abs(x)))
  assert 0 < err10 <= 2.0**-11 and err10 < float(
      jnp.max(jnp.abs(both[2] - x) / jnp.abs(x)))
  np.testing.assert_array_equal(layers.round_mantissa(x, jnp.bool_(True)),
                                layers.round_bf16(x, True))
  np.testing.assert_array_equal(layers.round_mantissa(x, jnp.bool_(False)), x)
  assert layers.round_mantissa(x, None) is x


def test_round_mantissa_gradient_rounds_the_cotangent_like_the_cast():
  x = _normal(9, (32,))
  ct = _normal(10, (32,))
  for b in (23, 10, 7):
    _, vjp = jax.vjp(lambda v: layers.round_mantissa(v, jnp.int32(b)), x)
    np.testing.assert_array_equal(vjp(ct)[0], layers.round_mantissa(ct, b))
  _, cast_vjp = jax.vjp(lambda v: layers.round_bf16(v, True), x)
  _, ours = jax.vjp(lambda v: layers.round_mantissa(v, 7), x)
  np.testing.assert_array_equal(ours(ct)[0], cast_vjp(ct)[0])


def test_dot_general_at_tf32_lies_between_float32_and_bf16():
  a, b = _normal(11, (16, 64)), _normal(12, (64, 8))
  dims = (((1,), (0,)), ((), ()))
  exact = np.asarray(a, np.float64) @ np.asarray(b, np.float64)
  err = {bits: float(np.max(np.abs(
      np.asarray(layers.dot_general(jnp.int32(bits))(a, b, dims)) - exact)))
         for bits in (23, 10, 7)}
  assert err[23] < err[10] < err[7]


@pytest.mark.parametrize("shape", [(3, 8, 8, 4), (2, 7, 9, 3), (2, 28, 28, 16)])
def test_max_pool_2x2_is_flax_max_pool_with_its_gradient(shape):
  """Same values and bitwise the same gradient as flax's max_pool (first
  maximum of a window in row-major order gets the gradient), ties included:
  the inputs are rounded to halves and ReLU'd, so windows tie often."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  x = jax.random.normal(jax.random.key(sum(shape)), shape)
  x = jax.nn.relu(jnp.round(x * 2) / 2)
  g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2,
                                            shape[2] // 2, shape[3]))
  ref = lambda x: nn.max_pool(x, (2, 2), strides=(2, 2))
  np.testing.assert_array_equal(layers.max_pool_2x2(x), ref(x))
  grad = lambda f: jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(f(x) * g))))
  ties = np.asarray(ref(x) == 0).mean()
  assert ties > 0.05                      # the case worth testing is there
  np.testing.assert_array_equal(grad(layers.max_pool_2x2)(x[None]),
                                grad(ref)(x[None]))
