"""Flax (linen) models, chosen by name.

Every model maps a batch of inputs to `(logits [B, classes], features [B, d])`,
where `features` are the penultimate activations (used by the CKA metric).
Image models (IMAGE_MODELS) take float images [B, H, W, C]; text models
(TEXT_MODELS) take int32 token ids [B, L], right-padded with id 0 (`<pad>`),
and need the vocabulary size.

Two things are threaded through every matmul and convolution:

* precision: float32 matmuls run at `lax.Precision.HIGHEST`, set explicitly,
  because TPUs and recent GPUs otherwise compute float32 matmuls in bf16/TF32
  and would silently change the benign divergence we are simulating;
* `bf16`: a per-provider scalar flag (a traced value under vmap). Where it is
  true, the operands of every matmul/convolution are rounded to bfloat16 before
  the product, which is what bf16 hardware with float32 accumulation does. It is
  a `where` on the operands, so mixed-precision and full-precision providers
  share one compiled computation.

linen (not nnx) is used because a population is a pytree of parameters with a
leading provider axis and the training step is a pure function vmapped over it;
linen's `init`/`apply` is exactly that shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxrep.core.errors import ConfigError

PRECISION = lax.Precision.HIGHEST
IMAGE_MODELS = ("mlp", "cnn", "resnet20")
TEXT_MODELS = ("text_cnn", "text_transformer")
MODELS = IMAGE_MODELS + TEXT_MODELS
PAD_ID = 0


def _round_bf16(x, flag):
  """Rounds `x` to bfloat16 (keeping float32 storage) where `flag` is true."""
  if flag is None:
    return x
  return jnp.where(flag, x.astype(jnp.bfloat16).astype(x.dtype), x)


def _dot_general(flag):
  def dot_general(lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, **kwargs):
    del precision
    return lax.dot_general(_round_bf16(lhs, flag), _round_bf16(rhs, flag),
                           dimension_numbers, precision=PRECISION,
                           preferred_element_type=preferred_element_type,
                           **kwargs)
  return dot_general


def _conv_general_dilated(flag):
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
    lhs, rhs = _round_bf16(lhs, flag), _round_bf16(rhs, flag)
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


class MLP(nn.Module):
  """Fully connected network with ReLU."""
  num_classes: int
  hidden: Sequence[int] = (256, 256)
  bf16: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dot_general=_dot_general(self.bf16))(x))
    logits = nn.Dense(self.num_classes, dot_general=_dot_general(self.bf16))(x)
    return logits, x


class CNN(nn.Module):
  """LeNet-like CNN: two conv+pool stages and two hidden dense layers."""
  num_classes: int
  channels: Sequence[int] = (16, 32)
  hidden: Sequence[int] = (128, 64)
  bf16: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    conv = _conv_general_dilated(self.bf16)
    for ch in self.channels:
      x = nn.Conv(ch, (5, 5), padding="SAME", conv_general_dilated=conv)(x)
      x = nn.relu(x)
      if x.shape[1] >= 2 and x.shape[2] >= 2:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = x.reshape((x.shape[0], -1))
    for width in self.hidden:
      x = nn.relu(nn.Dense(width, dot_general=_dot_general(self.bf16))(x))
    logits = nn.Dense(self.num_classes, dot_general=_dot_general(self.bf16))(x)
    return logits, x


class _BasicBlock(nn.Module):
  channels: int
  stride: int
  bf16: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    conv = _conv_general_dilated(self.bf16)
    norm = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9)
    y = nn.Conv(self.channels, (3, 3), strides=self.stride, use_bias=False,
                conv_general_dilated=conv)(x)
    y = nn.relu(norm()(y))
    y = nn.Conv(self.channels, (3, 3), use_bias=False,
                conv_general_dilated=conv)(y)
    y = norm()(y)
    if x.shape != y.shape:
      x = nn.Conv(self.channels, (1, 1), strides=self.stride, use_bias=False,
                  conv_general_dilated=conv)(x)
      x = norm()(x)
    return nn.relu(x + y)


class ResNet20(nn.Module):
  """CIFAR-style ResNet-20 (He et al. 2016): 3 stages x 3 basic blocks.

  BatchNorm running statistics live in the `batch_stats` collection, which the
  population carries per provider as `model_state`.
  """
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3
  bf16: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    conv = _conv_general_dilated(self.bf16)
    x = nn.Conv(self.widths[0], (3, 3), use_bias=False,
                conv_general_dilated=conv)(x)
    x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9)(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(width, stride, self.bf16)(x, train)
    features = jnp.mean(x, axis=(1, 2))
    logits = nn.Dense(self.num_classes,
                      dot_general=_dot_general(self.bf16))(features)
    return logits, features


# ----------------------------------------------------------------------------
# Text classifiers over token ids [B, L] (id 0 = padding, right-padded).


def _einsum(flag, spec, a, b):
  """`jnp.einsum` at PRECISION with the bf16 operand rounding of `flag`."""
  return jnp.einsum(spec, _round_bf16(a, flag), _round_bf16(b, flag),
                    precision=PRECISION)


def _embed_tokens(tokens, vocab_size, dim):
  """Embeds ids [B, L] -> ([B, L, dim] with pad rows zeroed, mask [B, L]).

  A lookup (gather), not a one-hot matmul: exact in any precision, and its
  cost does not grow with the vocabulary.
  """
  mask = tokens != PAD_ID
  emb = nn.Embed(vocab_size, dim, name="embed")(tokens)
  return emb * mask[..., None].astype(emb.dtype), mask


def _windows(x, width):
  """Sliding windows [B, L, E] -> [B, L, width*E]; window t = x[t:t+width].

  The sequence is zero-padded at the end, so every position starts a window.
  """
  x = jnp.pad(x, ((0, 0), (0, width - 1), (0, 0)))
  length = x.shape[1] - width + 1
  return jnp.concatenate([x[:, i:i + length] for i in range(width)], axis=-1)


class TextCNN(nn.Module):
  """Kim (2014)-style text CNN.

  Embedding -> for each width w: 1-D convolution (w-grams, `filters`
  channels) + ReLU -> max-pool over the windows that start at a real token;
  features = the concatenated pooled vectors, logits = dense(features).

  Each convolution is windows [B, L, w*E] x kernel [w*E, filters]: one
  dot_general, which vmaps over providers into a batched matmul (a vmapped
  `lax.conv` would become a slow grouped convolution, see
  `_conv_general_dilated`). Windows are cut from one embedding tensor whose
  pad rows are zero, so the result does not depend on how much padding
  follows the text.
  """
  num_classes: int
  vocab_size: int
  embed_dim: int = 64
  widths: Sequence[int] = (3, 4, 5)
  filters: int = 64
  bf16: Any = None

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    x, mask = _embed_tokens(tokens, self.vocab_size, self.embed_dim)
    pooled = []
    for w in self.widths:
      h = nn.Dense(self.filters, dot_general=_dot_general(self.bf16),
                   name=f"conv{w}")(_windows(x, w))
      h = nn.relu(h)
      # After the ReLU every value is >= 0, so zeroing the windows that start
      # in the padding leaves the max over the real ones unchanged (and gives
      # 0, not -inf, for an empty text).
      pooled.append(jnp.max(jnp.where(mask[..., None], h, 0.0), axis=1))
    features = jnp.concatenate(pooled, axis=-1)
    logits = nn.Dense(self.num_classes, dot_general=_dot_general(self.bf16),
                      name="head")(features)
    return logits, features


class _EncoderBlock(nn.Module):
  """Pre-LN transformer encoder block with a key padding mask."""
  dim: int
  heads: int
  mlp_dim: int
  bf16: Any = None

  @nn.compact
  def __call__(self, x, mask):
    b, l, d = x.shape
    dh = d // self.heads
    dense = lambda n, name: nn.Dense(n, dot_general=_dot_general(self.bf16),
                                     name=name)
    h = nn.LayerNorm(name="ln_attn")(x)
    qkv = dense(3 * d, "qkv")(h).reshape(b, l, 3, self.heads, dh)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = _einsum(self.bf16, "bqhd,bkhd->bhqk", q, k) / jnp.sqrt(
        jnp.float32(dh))
    # Finite, not -inf: an all-padding text then attends uniformly, not NaN.
    scores = jnp.where(mask[:, None, None, :], scores, -1e9)
    attn = jax.nn.softmax(scores, axis=-1)
    out = _einsum(self.bf16, "bhqk,bkhd->bqhd", attn, v).reshape(b, l, d)
    x = x + dense(d, "attn_out")(out)
    h = nn.LayerNorm(name="ln_mlp")(x)
    h = dense(d, "mlp_out")(nn.gelu(dense(self.mlp_dim, "mlp_in")(h)))
    return x + h


class TextTransformer(nn.Module):
  """Small pre-LN transformer encoder classifier.

  Token + learned positional embedding -> `depth` encoder blocks (padding
  keys masked out) -> final LayerNorm -> mean over the non-pad tokens
  (features) -> dense (logits).
  """
  num_classes: int
  vocab_size: int
  max_len: int = 64
  dim: int = 64
  depth: int = 2
  heads: int = 4
  mlp_dim: int = 128
  bf16: Any = None

  @nn.compact
  def __call__(self, tokens, train: bool = False):
    del train
    x, mask = _embed_tokens(tokens, self.vocab_size, self.dim)
    pos = self.param("pos_embed", nn.initializers.normal(0.02),
                     (self.max_len, self.dim))
    x = x + pos[:tokens.shape[1]]
    for i in range(self.depth):
      x = _EncoderBlock(self.dim, self.heads, self.mlp_dim, self.bf16,
                        name=f"block{i}")(x, mask)
    x = nn.LayerNorm(name="ln_final")(x)
    m = mask[..., None].astype(x.dtype)
    features = jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
    logits = nn.Dense(self.num_classes, dot_general=_dot_general(self.bf16),
                      name="head")(features)
    return logits, features


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet20": ResNet20,
    "text_cnn": TextCNN,
    "text_transformer": TextTransformer,
}


@dataclasses.dataclass(frozen=True)
class Model:
  """A named model with pure functions over (params, model_state).

  Attributes:
    name: one of MODELS.
    num_classes: number of output classes.
    input_shape: (H, W, C) of one image, or (L,) of one token sequence.
    vocab_size: vocabulary size of a text model (None for image models).
  """
  name: str
  num_classes: int
  input_shape: tuple[int, ...]
  vocab_size: int | None = None

  @property
  def is_text(self) -> bool:
    return self.name in TEXT_MODELS

  def module(self, bf16=None) -> nn.Module:
    if self.name == "text_transformer":
      return TextTransformer(num_classes=self.num_classes,
                             vocab_size=self.vocab_size,
                             max_len=self.input_shape[0], bf16=bf16)
    if self.is_text:
      return _REGISTRY[self.name](num_classes=self.num_classes,
                                  vocab_size=self.vocab_size, bf16=bf16)
    return _REGISTRY[self.name](num_classes=self.num_classes, bf16=bf16)

  def init(self, key) -> tuple[Any, Any]:
    """Returns (params, model_state) of one freshly initialised model."""
    dtype = jnp.int32 if self.is_text else jnp.float32
    x = jnp.zeros((1, *self.input_shape), dtype)
    variables = self.module().init(key, x, train=False)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return params, model_state

  def apply(self, params, model_state, x, *, train=False, bf16=None):
    """Returns ((logits, features), new_model_state) for one provider."""
    variables = {"params": params, **model_state}
    module = self.module(bf16)
    if train and model_state:
      out, updates = module.apply(variables, x, train=True,
                                  mutable=list(model_state))
      return out, {**model_state, **updates}
    return module.apply(variables, x, train=train), model_state

  def predict(self, params, model_state, x):
    """(logits, features) in inference mode: the signature the metrics use."""
    return self.apply(params, model_state, x, train=False)[0]


def get_model(name: str, num_classes: int, input_shape: Sequence[int],
              vocab_size: int | None = None) -> Model:
  """Looks a model up by name; raises ConfigError for unusable arguments.

  Args:
    name: one of MODELS.
    num_classes: number of output classes (>= 2).
    input_shape: (H, W, C) for IMAGE_MODELS, (L,) for TEXT_MODELS.
    vocab_size: number of token ids (>= 3: <pad>, <unk> and a word) for
      TEXT_MODELS; must be None for IMAGE_MODELS.
  """
  if name not in _REGISTRY:
    raise ConfigError(f"model: unknown model {name!r}; choose one of "
                      f"{', '.join(MODELS)}")
  if num_classes < 2:
    raise ConfigError(f"num_classes: must be >= 2, got {num_classes}")
  shape = tuple(input_shape)
  if name in TEXT_MODELS:
    if len(shape) != 1 or int(shape[0]) != shape[0] or shape[0] < 1:
      raise ConfigError(f"input_shape: text model {name!r} takes token "
                        f"sequences of shape (L,) with L >= 1, got {shape}; "
                        f"for images use one of {', '.join(IMAGE_MODELS)}")
    if (isinstance(vocab_size, bool)
        or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 3):
      raise ConfigError(f"vocab_size: text model {name!r} needs an integer "
                        f"vocabulary size >= 3 (<pad>, <unk> and at least "
                        f"one word), got {vocab_size!r}")
    return Model(name, int(num_classes), (int(shape[0]),), int(vocab_size))
  if len(shape) != 3 or min(shape) < 1:
    raise ConfigError(f"input_shape: image model {name!r} takes (H, W, C) "
                      f"with positive sizes, got {shape}; for token "
                      f"sequences use one of {', '.join(TEXT_MODELS)}")
  if vocab_size is not None:
    raise ConfigError(f"vocab_size: image model {name!r} takes no "
                      f"vocabulary, got {vocab_size!r}; for text use one of "
                      f"{', '.join(TEXT_MODELS)}")
  return Model(name, int(num_classes), tuple(int(s) for s in shape))


def num_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
