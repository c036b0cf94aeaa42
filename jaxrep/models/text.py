"""Text classifiers over int32 token ids [B, L], right-padded with `PAD`.

Each maps a batch to `(logits [B, classes], features [B, d])`, takes the
per-provider operand `precision` of `jaxrep.models.layers`, and gives the same result
whatever padding follows a text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrep.data.text import PAD
from jaxrep.models.layers import dense, einsum


def _windows(x, width):
  """Sliding windows [B, L, E] -> [B, L, width*E]; window t = x[t:t+width].

  The sequence is zero-padded at the end, so every position starts a window.
  """
  x = jnp.pad(x, ((0, 0), (0, width - 1), (0, 0)))
  length = x.shape[1] - width + 1
  return jnp.concatenate([x[:, i:i + length] for i in range(width)], axis=-1)


class _TextClassifier(nn.Module):
  """Embedding -> `encode` (each model's own) -> dense head.

  The embedding is a lookup (gather), not a one-hot matmul: exact in any
  precision, and its cost does not grow with the vocabulary. Rows of padding
  are zeroed, and `encode` gets the padding mask with them.
  """
  num_classes: int
  vocab_size: int
  embed_dim: int = 64
  precision: Any = None

  def encode(self, x, mask):
    """Features [B, d] of embedded tokens x [B, L, embed_dim], mask [B, L]."""
    raise NotImplementedError

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    mask = tokens != PAD
    emb = nn.Embed(self.vocab_size, self.embed_dim, name="embed")(tokens)
    features = self.encode(emb * mask[..., None].astype(emb.dtype), mask)
    logits = dense(self.num_classes, self.precision, "head")(features)
    return logits, features


class TextCNN(_TextClassifier):
  """Kim (2014)-style text CNN.

  Embedding -> for each width w: 1-D convolution (w-grams, `filters`
  channels) + ReLU -> max-pool over the windows that start at a real token;
  features = the concatenated pooled vectors, logits = dense(features).

  Each convolution is windows [B, L, w*E] x kernel [w*E, filters]: one
  dot_general, which vmaps over providers into a batched matmul (a vmapped
  `lax.conv` would become a slow grouped convolution, see
  `jaxrep.models.layers.conv_general_dilated`). Windows are cut from one
  embedding tensor whose pad rows are zero, so the result does not depend on
  how much padding follows the text.
  """
  widths: Sequence[int] = (3, 4, 5)
  filters: int = 64

  def encode(self, x, mask):
    pooled = []
    for w in self.widths:
      h = nn.relu(dense(self.filters, self.precision, f"conv{w}")(_windows(x, w)))
      # After the ReLU every value is >= 0, so zeroing the windows that start
      # in the padding leaves the max over the real ones unchanged (and gives
      # 0, not -inf, for an empty text).
      pooled.append(jnp.max(jnp.where(mask[..., None], h, 0.0), axis=1))
    return jnp.concatenate(pooled, axis=-1)


class _EncoderBlock(nn.Module):
  """Pre-LN transformer encoder block with a key padding mask."""
  dim: int
  heads: int
  mlp_dim: int
  precision: Any = None

  @nn.compact
  def __call__(self, x, mask):
    b, l, d = x.shape
    dh = d // self.heads
    h = nn.LayerNorm(name="ln_attn")(x)
    qkv = dense(3 * d, self.precision, "qkv")(h).reshape(b, l, 3, self.heads, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = einsum(self.precision, "bqhd,bkhd->bhqk", q, k) / jnp.sqrt(
        jnp.float32(dh))
    # Finite, not -inf: an all-padding text then attends uniformly, not NaN.
    scores = jnp.where(mask[:, None, None, :], scores, -1e9)
    attn = jax.nn.softmax(scores, axis=-1)
    out = einsum(self.precision, "bhqk,bkhd->bqhd", attn, v).reshape(b, l, d)
    x = x + dense(d, self.precision, "attn_out")(out)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = dense(self.mlp_dim, self.precision, "mlp_in")(h)
    return x + dense(d, self.precision, "mlp_out")(nn.gelu(h))


class TextTransformer(_TextClassifier):
  """Small pre-LN transformer encoder classifier.

  Token + learned positional embedding -> `depth` encoder blocks (padding
  keys masked out) -> final LayerNorm -> mean over the non-pad tokens
  (features) -> dense (logits). The model width is `embed_dim`.
  """
  max_len: int = 64
  depth: int = 2
  heads: int = 4
  mlp_dim: int = 128

  def encode(self, x, mask):
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (self.max_len, self.embed_dim))
    x = x + pos[:x.shape[1]]
    for i in range(self.depth):
      x = _EncoderBlock(self.embed_dim, self.heads, self.mlp_dim, self.precision,
                        name=f"block{i}")(x, mask)
    x = nn.LayerNorm(name="ln_final")(x)
    m = mask[..., None].astype(x.dtype)
    return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
