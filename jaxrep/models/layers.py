"""The matmuls and convolutions every model is built from.

Two things are threaded through every matmul and convolution:

* precision: float32 matmuls run at `lax.Precision.HIGHEST`, set explicitly,
  because TPUs and recent GPUs otherwise compute float32 matmuls in bf16/TF32
  and would silently change the benign divergence we are simulating;
* `bf16`: a per-provider scalar flag (a traced value under vmap). Where it is
  true, the operands of every matmul/convolution are rounded to bfloat16 before
  the product, which is what bf16 hardware with float32 accumulation does. It is
  a `where` on the operands, so mixed-precision and full-precision providers
  share one compiled computation.

Convolutions are computed as patches x weights (`conv_general_dilated`), which
vmaps over per-provider weights into an ordinary batched matmul.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

PRECISION = lax.Precision.HIGHEST


def round_bf16(x, flag):
  """Rounds `x` to bfloat16 (keeping float32 storage) where `flag` is true."""
  if flag is None:
    return x
  return jnp.where(flag, x.astype(jnp.bfloat16).astype(x.dtype), x)


def dot_general(flag):
  """`lax.dot_general` at PRECISION on operands rounded by `round_bf16`, for
  flax's `dot_general` argument."""
  def dot(lhs, rhs, dimension_numbers, precision=None,
          preferred_element_type=None, **kwargs):
    del precision
    return lax.dot_general(round_bf16(lhs, flag), round_bf16(rhs, flag),
                           dimension_numbers, precision=PRECISION,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  return dot


def dense(features: int, flag, name: str | None = None) -> nn.Dense:
  """`nn.Dense` whose matmul is `dot_general(flag)`."""
  return nn.Dense(features, dot_general=dot_general(flag), name=name)


def einsum(flag, spec, a, b):
  """`jnp.einsum` at PRECISION with the bf16 operand rounding of `flag`."""
  return jnp.einsum(spec, round_bf16(a, flag), round_bf16(b, flag),
                    precision=PRECISION)


def conv_general_dilated(flag):
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
    lhs, rhs = round_bf16(lhs, flag), round_bf16(rhs, flag)
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


def conv(features: int, kernel_size, flag, **kwargs) -> nn.Conv:
  """`nn.Conv` computed by `conv_general_dilated(flag)`."""
  return nn.Conv(features, kernel_size,
                 conv_general_dilated=conv_general_dilated(flag), **kwargs)
