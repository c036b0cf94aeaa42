"""Image classifiers over float images [B, H, W, C]: MLP, CNN and ResNet-20.

Each maps a batch to `(logits [B, classes], features [B, d])`, where
`features` are the penultimate activations, and takes the per-provider operand
`precision` (mantissa bits) of `jaxrep.models.layers`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from jaxrep.models.layers import conv, dense, max_pool_2x2


def _dense_head(x, hidden: Sequence[int], num_classes: int, precision):
  """Flattens `x`, applies ReLU dense layers of widths `hidden`, then the
  output layer; returns (logits, the last hidden activations)."""
  x = x.reshape((x.shape[0], -1))
  for width in hidden:
    x = nn.relu(dense(width, precision)(x))
  return dense(num_classes, precision)(x), x


class MLP(nn.Module):
  """Fully connected network with ReLU."""
  num_classes: int
  hidden: Sequence[int] = (256, 256)
  precision: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    return _dense_head(x, self.hidden, self.num_classes, self.precision)


class CNN(nn.Module):
  """LeNet-like CNN: two conv+pool stages and two hidden dense layers."""
  num_classes: int
  channels: Sequence[int] = (16, 32)
  hidden: Sequence[int] = (128, 64)
  precision: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    del train
    for ch in self.channels:
      x = nn.relu(conv(ch, (5, 5), self.precision, padding="SAME")(x))
      if x.shape[1] >= 2 and x.shape[2] >= 2:
        x = max_pool_2x2(x)
    return _dense_head(x, self.hidden, self.num_classes, self.precision)


def _batch_norm(train: bool) -> nn.BatchNorm:
  """BatchNorm with running statistics updated only in training."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9)


class _BasicBlock(nn.Module):
  channels: int
  stride: int
  precision: Any = None

  @nn.compact
  def __call__(self, x, train: bool):
    y = conv(self.channels, (3, 3), self.precision, strides=self.stride,
             use_bias=False)(x)
    y = nn.relu(_batch_norm(train)(y))
    y = conv(self.channels, (3, 3), self.precision, use_bias=False)(y)
    y = _batch_norm(train)(y)
    if x.shape != y.shape:
      x = conv(self.channels, (1, 1), self.precision, strides=self.stride,
               use_bias=False)(x)
      x = _batch_norm(train)(x)
    return nn.relu(x + y)


class ResNet20(nn.Module):
  """CIFAR-style ResNet-20 (He et al. 2016): 3 stages x 3 basic blocks.

  BatchNorm running statistics live in the `batch_stats` collection, which the
  population carries per provider as `model_state`.
  """
  num_classes: int
  widths: Sequence[int] = (16, 32, 64)
  blocks_per_stage: int = 3
  precision: Any = None

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = conv(self.widths[0], (3, 3), self.precision, use_bias=False)(x)
    x = nn.relu(_batch_norm(train)(x))
    for stage, width in enumerate(self.widths):
      for block in range(self.blocks_per_stage):
        stride = 2 if stage > 0 and block == 0 else 1
        x = _BasicBlock(width, stride, self.precision)(x, train)
    features = jnp.mean(x, axis=(1, 2))
    logits = dense(self.num_classes, self.precision)(features)
    return logits, features
