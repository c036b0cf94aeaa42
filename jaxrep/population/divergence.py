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
* hardware profiles (`stacks`, default: float32 for everyone): each provider
  runs the numeric profile of one accelerator class, given as a number of
  explicit mantissa bits every matmul/convolution operand is rounded to
  (round to nearest even, float32 accumulation; see `jaxrep.models.layers`):

      fp32  23 bits  float32 (rounding is a no-op; its own reduction order)
      tf32  10 bits  TF32 matmuls, A100/H100-class GPUs' float32 default
      bf16   7 bits  bfloat16 autocast (TPUs, recent GPUs)

  `stacks="fp32:0.5,tf32:0.25,bf16:0.25"` gives the shares of providers. The
  bits are per-provider int32 data, so all profiles train in ONE compiled
  sub-run. `bf16_fraction=f` is the older shorthand for
  `stacks="bf16:f,fp32:1-f"` (with its own rounding, see `stack_counts`);
  giving both is an error.

Who runs which profile (`provider_stacks`): the seed's permutation of the
providers (`rng.stacks(seed)`) is cut into consecutive runs, one per profile in
the order the spec names them, of `stack_counts` providers each.

The default is `DivergenceConfig()`: reduction-order permutation for every
provider, all in float32, and nothing else, so benign distances are small but
never zero.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
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
  mantissa_bits: jax.Array  # int32: operand mantissa bits (23 = float32)


# Hardware profiles: name -> explicit mantissa bits of matmul operands.
PROFILES = {"fp32": 23, "tf32": 10, "bf16": 7}
FLOAT32 = "fp32"


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
  """Population-level description of benign divergence.

  Attributes:
    permute: every provider uses its own per-batch example order.
    grad_noise: relative gradient noise scale (>= 0) for every provider.
    bf16_fraction: share of providers computing matmuls in bfloat16, in
      [0, 1] (shorthand for stacks="bf16:f,fp32:1-f").
    stacks: shares of hardware profiles, e.g. "fp32:0.5,tf32:0.25,bf16:0.25"
      ("": everyone fp32, or bf16_fraction's share in bf16).
  """
  permute: bool = True
  grad_noise: float = 0.0
  bf16_fraction: float = 0.0
  stacks: str = ""

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
    parse_stacks(self)
    return self

  @property
  def is_zero(self) -> bool:
    return not self.permute and self.grad_noise == 0.0 and not needs_rounding(
        self)


NONE = DivergenceConfig(permute=False, grad_noise=0.0, bf16_fraction=0.0)

_EXAMPLE = "e.g. fp32:0.5,tf32:0.25,bf16:0.25"


def parse_stacks(config) -> tuple[tuple[str, Fraction], ...]:
  """The (profile, share) pairs of a divergence config, in spec order.

  Works on this module's `DivergenceConfig` and on the `divergence` section
  of `jaxrep.config.SimConfig`. Shares are read as exact fractions ("0.25",
  "1/3"), must be >= 0 and sum to exactly 1. "" maps to the shorthand
  bf16_fraction (bf16 first) or to fp32 for all; giving both is a
  ConfigError, as is an unknown profile or malformed text.
  """
  text = getattr(config, "stacks", "")
  fraction = float(getattr(config, "bf16_fraction", 0.0))
  require(isinstance(text, str), "stacks",
          f"must be a string like {_EXAMPLE[5:]}, got {text!r}")
  if not text.strip():
    f = Fraction(fraction)
    return (("bf16", f), (FLOAT32, 1 - f)) if f > 0 else ((FLOAT32,
                                                         Fraction(1)),)
  require(fraction == 0.0, "stacks",
          f"give either --stacks or --bf16_fraction (its shorthand), not "
          f"both (got stacks={text!r}, bf16_fraction={fraction})")
  pairs = []
  for item in text.split(","):
    name, sep, share = (part.strip() for part in item.partition(":"))
    require(bool(sep) and bool(name) and bool(share), "stacks",
            f"malformed item {item.strip()!r} in {text!r}; expected "
            f"profile:share, {_EXAMPLE}")
    require(name in PROFILES, "stacks",
            f"unknown profile {name!r}; choose from {', '.join(PROFILES)}")
    require(name not in dict(pairs), "stacks",
            f"profile {name!r} is given twice in {text!r}")
    try:
      value = Fraction(share)
    except (ValueError, ZeroDivisionError):
      require(False, "stacks", f"share {share!r} of {name} is not a number "
              f"({_EXAMPLE})")
    require(value >= 0, "stacks",
            f"share of {name} must be >= 0, got {share}")
    pairs.append((name, value))
  total = sum(v for _, v in pairs)
  require(total == 1, "stacks",
          f"shares must sum to 1, got {float(total):g} in {text!r}")
  return tuple(pairs)


def needs_rounding(config) -> bool:
  """Whether any profile of the config rounds operands (then the rounding
  is compiled into the sub-run; float32-only populations pay nothing)."""
  return any(share > 0 and PROFILES[name] < PROFILES[FLOAT32]
             for name, share in parse_stacks(config))


def stack_counts(config, n: int) -> dict[str, int]:
  """How many of n providers run each profile (spec order; they sum to n).

  --stacks: largest remainders (Hamilton): every profile gets
  floor(share * n), and the providers left over go one each to the profiles
  with the largest fractional parts, ties to the one named first.
  --bf16_fraction=f: round(f * n) providers in bf16 (half to even, the
  former rule, so existing results do not change), the others fp32.
  """
  pairs = parse_stacks(config)
  if not str(getattr(config, "stacks", "")).strip():
    num_bf16 = int(round(float(getattr(config, "bf16_fraction", 0.0)) * n))
    counts = {"bf16": num_bf16, FLOAT32: n - num_bf16}
    return {k: v for k, v in counts.items() if k in dict(pairs)}
  exact = [share * n for _, share in pairs]
  counts = [math.floor(e) for e in exact]
  left = n - sum(counts)
  by_remainder = sorted(range(len(pairs)),
                        key=lambda i: (-(exact[i] - counts[i]), i))
  for i in by_remainder[:left]:
    counts[i] += 1
  return {name: c for (name, _), c in zip(pairs, counts)}


def provider_stacks(config, n: int, seed: int = 0) -> list[str]:
  """The profile name of each of n providers (deterministic from `seed`):
  the seed's permutation of the providers cut into consecutive runs of
  `stack_counts`, in spec order."""
  order = rng_lib.stacks(seed).permutation(n)
  names = [FLOAT32] * n
  at = 0
  for name, count in stack_counts(config, n).items():
    for i in order[at:at + count]:
      names[int(i)] = name
    at += count
  return names


def make_divergence(config: DivergenceConfig, n: int,
                    seed: int = 0) -> Divergence:
  """Builds the per-provider divergence arrays for a population of n; each
  provider's operand precision is that of its profile in
  `provider_stacks(config, n, seed)`."""
  config.validate()
  bits = np.array([PROFILES[s] for s in provider_stacks(config, n, seed)],
                  np.int32)
  return Divergence(
      permute=jnp.full((n,), bool(config.permute)),
      grad_noise=jnp.full((n,), config.grad_noise, jnp.float32),
      mantissa_bits=jnp.asarray(bits))


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
