"""The matmuls and convolutions every model is built from.

Two things are threaded through every matmul and convolution:

* precision: float32 matmuls run at `lax.Precision.HIGHEST`, set explicitly,
  because TPUs and recent GPUs otherwise compute float32 matmuls in bf16/TF32
  and would silently change the benign divergence we are simulating;
* `bits`: the provider's operand precision, a per-provider scalar (a traced
  value under vmap): the number of explicit mantissa bits every operand of a
  matmul/convolution is rounded to (round to nearest, ties to even) before a
  float32-accumulated product. 23 is float32 itself (no change), 10 is TF32
  (A100/H100-class GPUs' default for float32 matmuls), 7 is bfloat16 autocast.
  A bool is accepted as the older bf16 flag (True = 7 bits, False = 23).
  `None` compiles no rounding at all. The rounding is integer arithmetic on
  the float32 bit pattern, so providers of every precision share ONE
  compiled computation; `round_mantissa(x, 7)` is bitwise
  `x.astype(bfloat16).astype(float32)` (`round_bf16`), NaN aside (kept).

  Gradients: the cotangent of a rounded operand is rounded to the same bits
  (what JAX's autodiff of a bf16 cast does, so the 7-bit path is bitwise the
  former bf16 path, and what bf16 autocast does to weight and activation
  gradients). TF32 hardware instead rounds the operands of the backward
  matmuls and keeps their float32 outputs: an error of the same size per
  element, in a different place.

Convolutions are computed as patches x weights (`conv_general_dilated`), which
vmaps over per-provider weights into an ordinary batched matmul.
"""

from __future__ import annotations

import jax
import flax.linen as nn
import jax.numpy as jnp
from jax import lax

PRECISION = lax.Precision.HIGHEST
FLOAT32_BITS = 23   # explicit mantissa bits of float32: rounding is a no-op
BF16_BITS = 7


def round_bf16(x, flag):
  """Rounds `x` to bfloat16 (keeping float32 storage) where `flag` is true.

  The cast-based reference of `round_mantissa(x, 7)`."""
  if flag is None:
    return x
  return jnp.where(flag, x.astype(jnp.bfloat16).astype(x.dtype), x)


def _round_bits(x, bits):
  """float32 x rounded to `bits` explicit mantissa bits (ties to even)."""
  drop = jnp.uint32(FLOAT32_BITS) - bits.astype(jnp.uint32)
  one = jnp.uint32(1)
  u = lax.bitcast_convert_type(x, jnp.uint32)
  # Round half to even: add 2^(drop-1) - 1 plus the lowest kept bit, then
  # clear the dropped bits. A carry into the exponent is the correct
  # rounding up (to infinity past the largest finite value).
  lsb = (u >> drop) & one
  bias = jnp.where(drop > 0, (one << (drop - one)) - one + lsb, jnp.uint32(0))
  mask = ~((one << drop) - one)
  r = lax.bitcast_convert_type((u + bias) & mask, jnp.float32)
  return jnp.where(jnp.isnan(x), x, r)


@jax.custom_vjp
def _round(x, bits):
  return _round_bits(x, bits)


def _round_fwd(x, bits):
  return _round_bits(x, bits), bits


def _round_bwd(bits, ct):
  r = _round_bits(ct, bits)
  # -0 -> +0, as the select-and-add transpose of the former bf16 `where` did.
  return jnp.where(r == 0, jnp.zeros_like(r), r), None


_round.defvjp(_round_fwd, _round_bwd)


def mantissa_bits(bits):
  """The int32 mantissa bits of a precision argument (bool: bf16 flag)."""
  bits = jnp.asarray(bits)
  if bits.dtype == jnp.bool_:
    return jnp.where(bits, BF16_BITS, FLOAT32_BITS).astype(jnp.int32)
  return bits.astype(jnp.int32)


def round_mantissa(x, bits):
  """`x` (float32) with its operand precision applied: rounded to `bits`
  explicit mantissa bits, round to nearest even (see the module docstring).

  bits: None (no-op, nothing compiled), an int in [0, 23] or int32 scalar
  (23 = float32, 10 = TF32, 7 = bfloat16), or a bool (the bf16 flag).
  """
  if bits is None:
    return x
  return _round(x, mantissa_bits(bits))


def dot_general(bits):
  """`lax.dot_general` at PRECISION on operands rounded by `round_mantissa`,
  for flax's `dot_general` argument."""
  def dot(lhs, rhs, dimension_numbers, precision=None,
          preferred_element_type=None, **kwargs):
    del precision
    return lax.dot_general(round_mantissa(lhs, bits),
                           round_mantissa(rhs, bits),
                           dimension_numbers, precision=PRECISION,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  return dot


def dense(features: int, bits, name: str | None = None) -> nn.Dense:
  """`nn.Dense` whose matmul is `dot_general(bits)`."""
  return nn.Dense(features, dot_general=dot_general(bits), name=name)


def einsum(bits, spec, a, b):
  """`jnp.einsum` at PRECISION with the operand rounding of `bits`."""
  return jnp.einsum(spec, round_mantissa(a, bits), round_mantissa(b, bits),
                    precision=PRECISION)


def conv_general_dilated(bits):
  """A convolution computed as patches x weights (im2col), for flax's Conv.

  Why not `lax.conv_general_dilated`: vmapped over per-provider weights it
  becomes a grouped convolution, and inside the sub-run's `lax.scan` XLA's CPU
  backend picks a slow layout for it; measured on the digits/Fashion CNN this
  was 14x slower per provider-step than patches x weights, which vmaps into an
  ordinary batched matmul. Supports what the models use: NHWC/HWIO, any
  strides and padding, no dilation, no feature groups.
  """
  def conv(lhs, rhs, window_strides, padding, lhs_dilation=None,
           rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
           precision=None, **kwargs):
    del precision, dimension_numbers, kwargs
    assert feature_group_count == 1
    assert all(d == 1 for d in (lhs_dilation or (1, 1)))
    assert all(d == 1 for d in (rhs_dilation or (1, 1)))
    lhs, rhs = round_mantissa(lhs, bits), round_mantissa(rhs, bits)
    kh, kw, cin, cout = rhs.shape
    sh, sw = window_strides
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], (kh, kw), window_strides,
                                    padding)
    (pt, pb), (pl, pr) = padding
    x = jnp.pad(lhs, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    cols = [x[:, i:i + (out_h - 1) * sh + 1:sh, j:j + (out_w - 1) * sw + 1:sw]
            for i in range(kh) for j in range(kw)]
    patches = jnp.concatenate(cols, axis=-1)          # [B, H', W', kh*kw*cin]
    return lax.dot_general(patches, rhs.reshape(kh * kw * cin, cout),
                           (((3,), (0,)), ((), ())), precision=PRECISION)
  return conv


def conv(features: int, kernel_size, bits, **kwargs) -> nn.Conv:
  """`nn.Conv` computed by `conv_general_dilated(bits)`."""
  return nn.Conv(features, kernel_size,
                 conv_general_dilated=conv_general_dilated(bits), **kwargs)


def _pool_windows(x):
  """The four elements of every 2x2 window of NHWC `x` (odd edges cropped),
  in row-major window order: (top-left, top-right, bottom-left,
  bottom-right), each [B, H//2, W//2, C]."""
  b, h, w, c = x.shape
  x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
  return x[:, :, 0, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 0], x[:, :, 1, :, 1]


@jax.custom_vjp
def max_pool_2x2(x):
  """2x2 max pooling with stride 2 (VALID), NHWC.

  The same values as `flax.linen.max_pool(x, (2, 2), strides=(2, 2))`, and
  the same gradient: all of a window's gradient goes to its first maximum in
  row-major order, as XLA's select-and-scatter does. Why not `nn.max_pool`:
  its gradient compiles to a variadic reduce-window that carries an int32
  index per dimension, the costliest op of the CNN's training step on
  XLA:CPU (BUILD_NOTES "Provider blocks"); here it is elementwise selects
  that fuse. NaNs are not propagated the way reduce-window does.
  """
  a, b, c, d = _pool_windows(x)
  return jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))


def _max_pool_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_bwd(x, g):
  a, b, c, d = _pool_windows(x)
  m = jnp.maximum(jnp.maximum(a, b), jnp.maximum(c, d))
  zero = jnp.zeros_like(g)
  take_a = a == m
  take_b = ~take_a & (b == m)
  take_c = ~take_a & ~take_b & (c == m)
  take_d = ~(take_a | take_b | take_c)
  parts = [jnp.where(t, g, zero) for t in (take_a, take_b, take_c, take_d)]
  bsz, h2, w2, ch = g.shape
  # [B, H/2, 2 (row), W/2, 2 (col), C] back to [B, H, W, C], then the
  # cropped odd edge gets zeros.
  top = jnp.stack(parts[:2], axis=3)                # [B, H/2, W/2, 2, C]
  bottom = jnp.stack(parts[2:], axis=3)
  grid = jnp.stack([top, bottom], axis=2)           # [B, H/2, 2, W/2, 2, C]
  dx = grid.reshape(bsz, 2 * h2, 2 * w2, ch)
  _, h, w, _ = x.shape
  dx = jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))
  return (dx,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)
