"""Benign divergence: why honest replicas of one sub-run are not bit-identical.

Real providers run the same sub-run on different hardware and software stacks:
different reduction orders, kernels, and precisions. If the simulated benign
replicas computed exactly the same bits, any deviation would be detectable and
every detection result would be trivially perfect. jaxrep models the divergence
as per-provider data (a `Divergence` pytree with a leading provider axis), so a
mixed population still trains in one vmapped computation:

* `permute` (reduction order, DEFAULT ON): the provider processes the examples
  of each batch in its own random order. The gradient is the same mathematical
  sum, but float32 addition is not associative, so the bits differ. Nothing is
  added: the divergence is genuine float32 rounding.
* `grad_noise` (relative gradient noise, default 0): each gradient element is
  multiplied by (1 + sigma * N(0, 1)), i.e. a relative error of scale sigma, the
  shape of a rounding error. Sweep it to model noisier stacks
  (e.g. non-deterministic atomics, different cuDNN algorithms).
* `bf16` (mixed precision, default 0 % of providers): the provider rounds the
  operands of every matmul/convolution to bfloat16 (float32 accumulation), as
  TPUs/GPUs do with bf16 compute.

The default is `DivergenceConfig()`: reduction-order permutation for every
provider and nothing else, so benign distances are small but never zero.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import require


class Divergence(NamedTuple):
  """Per-provider divergence parameters; every field has shape [n]."""
  permute: jax.Array      # bool: shuffle examples inside each batch
  grad_noise: jax.Array   # float32: relative gradient noise scale
  bf16: jax.Array         # bool: round matmul operands to bfloat16


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
  """Population-level description of benign divergence.

  Attributes:
    permute: every provider uses its own per-batch example order.
    grad_noise: relative gradient noise scale (>= 0) for every provider.
    bf16_fraction: share of providers computing matmuls in bfloat16, in [0, 1].
  """
  permute: bool = True
  grad_noise: float = 0.0
  bf16_fraction: float = 0.0

  def validate(self) -> "DivergenceConfig":
    require(isinstance(self.permute, (bool, np.bool_)), "divergence.permute",
            f"must be a bool, got {self.permute!r}")
    require(math.isfinite(self.grad_noise) and 0.0 <= self.grad_noise < 1.0,
            "divergence.grad_noise",
            f"must be a finite relative scale in [0, 1), got {self.grad_noise}")
    require(math.isfinite(self.bf16_fraction)
            and 0.0 <= self.bf16_fraction <= 1.0,
            "divergence.bf16_fraction",
            f"must be in [0, 1], got {self.bf16_fraction}")
    return self

  @property
  def is_zero(self) -> bool:
    return (not self.permute and self.grad_noise == 0.0
            and self.bf16_fraction == 0.0)


NONE = DivergenceConfig(permute=False, grad_noise=0.0, bf16_fraction=0.0)


def make_divergence(config: DivergenceConfig, n: int,
                    seed: int = 0) -> Divergence:
  """Builds the per-provider divergence arrays for a population of n.

  The bf16 providers are a deterministic random subset (from `seed`) of size
  round(bf16_fraction * n).
  """
  config.validate()
  num_bf16 = int(round(config.bf16_fraction * n))
  order = rng_lib.stacks(seed).permutation(n)
  bf16 = np.zeros(n, bool)
  bf16[order[:num_bf16]] = True
  return Divergence(
      permute=jnp.full((n,), bool(config.permute)),
      grad_noise=jnp.full((n,), config.grad_noise, jnp.float32),
      bf16=jnp.asarray(bf16))


def zeros(n: int) -> Divergence:
  """No divergence at all: every replica computes the same bits."""
  return make_divergence(NONE, n)


def permute_batch(key, enabled, x, y):
  """Reorders the batch with a random permutation where `enabled`."""
  b = y.shape[0]
  perm = jnp.where(enabled, jax.random.permutation(key, b), jnp.arange(b))
  return x[perm], y[perm]


def perturb_grads(key, sigma, grads):
  """g -> g * (1 + sigma * eps), eps ~ N(0, 1), independently per element."""
  leaves, treedef = jax.tree_util.tree_flatten(grads)
  keys = jax.random.split(key, len(leaves))
  noisy = [g * (1.0 + sigma * jax.random.normal(k, g.shape, g.dtype))
           for g, k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, noisy)
