"""Flax (linen) models, chosen by name.

Every model maps images [B, H, W, C] to `(logits [B, classes], features [B, d])`,
where `features` are the penultimate activations (used by the CKA metric).

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
from jax import lax

from jaxrep.errors import ConfigError

PRECISION = lax.Precision.HIGHEST
MODELS = ("mlp", "cnn", "resnet20")


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


_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet20": ResNet20,
}


@dataclasses.dataclass(frozen=True)
class Model:
  """A named model with pure functions over (params, model_state).

  Attributes:
    name: one of MODELS.
    num_classes: number of output classes.
    input_shape: (H, W, C) of one example.
  """
  name: str
  num_classes: int
  input_shape: tuple[int, int, int]

  def module(self, bf16=None) -> nn.Module:
    return _REGISTRY[self.name](num_classes=self.num_classes, bf16=bf16)

  def init(self, key) -> tuple[Any, Any]:
    """Returns (params, model_state) of one freshly initialised model."""
    x = jnp.zeros((1, *self.input_shape), jnp.float32)
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


def get_model(name: str, num_classes: int,
              input_shape: Sequence[int]) -> Model:
  """Looks a model up by name; raises ConfigError for an unknown name."""
  if name not in _REGISTRY:
    raise ConfigError(f"model: unknown model {name!r}; choose one of "
                      f"{', '.join(MODELS)}")
  if num_classes < 2:
    raise ConfigError(f"num_classes: must be >= 2, got {num_classes}")
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ConfigError(f"input_shape: must be (H, W, C) with positive sizes, "
                      f"got {tuple(input_shape)}")
  return Model(name, int(num_classes), tuple(int(s) for s in input_shape))


def num_params(params) -> int:
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
