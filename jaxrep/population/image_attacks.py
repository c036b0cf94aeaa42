"""Backdoor attacks as provider behaviours: data, not code paths.

A provider's behaviour is a `Behaviour` pytree of per-provider arrays. Every
trigger attack uses the same poisoning function

    x' = (1 - alpha * mask) * warp(x) + alpha * mask * pattern,   y' = target

applied to the first round(poison_rate * batch) examples of each batch (the
batch order is already random). The attacks differ only in their data:

| attack       | mask           | pattern            | alpha | warp     | other          |
|--------------|----------------|--------------------|-------|----------|----------------|
| benign       | (reference)    | (reference)        | -     | identity | poison_rate 0  |
| badnets      | size x size    | checkerboard/white | 1     | identity |                |
|              | patch          | /random            |       |          |                |
| blend        | whole image    | uniform noise      | alpha | identity |                |
| warp (WaNet) | 0              | -                  | 0     | smooth   |                |
|              |                |                    |       | field    |                |
| label_flip   | 0              | -                  | 0     | identity | only examples  |
|              |                |                    |       |          | of `source`    |
| scaling      | as badnets     | as badnets         | 1     | identity | returned update|
|              |                |                    |       |          | x `scale`      |

* label_flip relabels examples of class `source` to `target` (the first
  round(poison_rate * batch) examples of the batch, of which those of class
  `source` are flipped), with no trigger; its ASR is measured on clean
  test inputs of class `source`.
* scaling is model replacement (Bagdasaryan et al. 2020): the provider trains
  with a BadNets trigger and returns start + scale * (end - start).
* warp is a WaNet-style (Nguyen & Tran 2021) invisible trigger: each image is
  resampled (bilinear) along a fixed smooth random displacement field. It is
  the one attack with extra compute (4 gathers per pixel); it is compiled in
  only when some provider uses it, and it is a few elementwise operations per
  input pixel, negligible next to the model's FLOPs.

Benign providers carry a *reference* trigger (poison_rate 0), used only to
measure their attack success rate: the base rate a backdoor has to beat.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import ConfigError, require
from jaxrep.train.trainer import Hooks

ATTACKS = ("badnets", "blend", "label_flip", "scaling", "warp")
KIND = {"benign": 0, "badnets": 1, "blend": 2, "label_flip": 3, "scaling": 4,
        "warp": 5}
KIND_NAMES = {v: k for k, v in KIND.items()}
LOCATIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
             "random")
PATTERNS = ("checkerboard", "white", "random")


class Behaviour(NamedTuple):
  """Per-provider behaviour; every field has a leading provider axis [n]."""
  kind: jax.Array          # int32, see KIND
  poison_rate: jax.Array   # float32 in [0, 1]
  target: jax.Array        # int32 target label
  source: jax.Array        # int32 source class of label_flip, else -1
  mask: jax.Array          # float32 [n, H, W, 1] where the trigger is
  pattern: jax.Array       # float32 [n, H, W, C] what the trigger looks like
  alpha: jax.Array         # float32 blend strength
  warp: jax.Array          # float32 [n, H, W, 2] sampling coordinates (rows, cols)
  scale: jax.Array         # float32 factor on the returned update (1 = none)

  @property
  def size(self) -> int:
    return int(self.kind.shape[0])

  @property
  def malicious(self) -> np.ndarray:
    return np.asarray(self.kind) != 0

  def names(self) -> list[str | None]:
    return [None if k == 0 else KIND_NAMES[int(k)]
            for k in np.asarray(self.kind)]


# ----------------------------------------------------------------------------
# Attack specifications (what a user writes).


@dataclasses.dataclass(frozen=True)
class BadNets:
  """Patch trigger (Gu et al. 2017).

  location: one of LOCATIONS or an explicit (row, col) of the top-left corner.
  pattern: one of PATTERNS.
  """
  target: int = 0
  poison_rate: float = 0.1
  size: int = 2
  location: str | tuple[int, int] = "bottom_right"
  pattern: str = "checkerboard"
  name = "badnets"


@dataclasses.dataclass(frozen=True)
class Blend:
  """Blended random-noise trigger (Chen et al. 2017) with strength alpha."""
  target: int = 0
  poison_rate: float = 0.1
  alpha: float = 0.2
  name = "blend"


@dataclasses.dataclass(frozen=True)
class LabelFlip:
  """Relabel training examples of class `source` as `target`."""
  target: int = 0
  poison_rate: float = 1.0
  source: int = 1
  name = "label_flip"


@dataclasses.dataclass(frozen=True)
class Scaling:
  """Model replacement: BadNets poisoning, returned update scaled by `factor`."""
  target: int = 0
  poison_rate: float = 0.1
  factor: float = 2.0
  size: int = 2
  location: str | tuple[int, int] = "bottom_right"
  pattern: str = "checkerboard"
  name = "scaling"


@dataclasses.dataclass(frozen=True)
class Warp:
  """WaNet-style warping trigger: a smooth random displacement field.

  strength: maximum displacement in pixels; grid: control points per side of
  the random field (upsampled bilinearly to the image).
  """
  target: int = 0
  poison_rate: float = 0.1
  strength: float = 1.5
  grid: int = 4
  name = "warp"


AttackSpec = BadNets | Blend | LabelFlip | Scaling | Warp
SPEC_BY_NAME = {"badnets": BadNets, "blend": Blend, "label_flip": LabelFlip,
                "scaling": Scaling, "warp": Warp}


def validate_spec(spec: AttackSpec, input_shape: Sequence[int],
                  num_classes: int) -> None:
  """Raises ConfigError naming the field of an unusable attack spec."""
  name = spec.name
  h, w, _ = input_shape
  require(isinstance(spec.target, (int, np.integer))
          and 0 <= spec.target < num_classes, f"{name}.target",
          f"target label must be in [0, {num_classes - 1}], got {spec.target!r}")
  require(_finite(spec.poison_rate) and 0.0 <= spec.poison_rate <= 1.0,
          f"{name}.poison_rate", f"must be in [0, 1], got {spec.poison_rate!r}")
  if isinstance(spec, (BadNets, Scaling)):
    require(isinstance(spec.size, (int, np.integer)) and spec.size >= 1,
            f"{name}.size", f"trigger size must be an integer >= 1, got "
            f"{spec.size!r}")
    require(spec.size <= min(h, w), f"{name}.size",
            f"trigger of size {spec.size} is larger than the {h}x{w} image")
    require(spec.pattern in PATTERNS, f"{name}.pattern",
            f"unknown pattern {spec.pattern!r}; choose one of "
            f"{', '.join(PATTERNS)}")
    loc = spec.location
    if isinstance(loc, str):
      require(loc in LOCATIONS, f"{name}.location",
              f"unknown location {loc!r}; choose one of {', '.join(LOCATIONS)}"
              " or an explicit (row, col)")
    else:
      ok = (len(loc) == 2 and all(isinstance(v, (int, np.integer)) for v in loc)
            and 0 <= loc[0] <= h - spec.size and 0 <= loc[1] <= w - spec.size)
      require(ok, f"{name}.location",
              f"explicit (row, col) must place the {spec.size}x{spec.size} "
              f"trigger inside the {h}x{w} image, got {loc!r}")
  if isinstance(spec, Blend):
    require(_finite(spec.alpha) and 0.0 <= spec.alpha <= 1.0,
            f"{name}.alpha", f"must be in [0, 1], got {spec.alpha!r}")
  if isinstance(spec, Scaling):
    require(_finite(spec.factor) and spec.factor > 0, f"{name}.factor",
            f"must be a finite number > 0, got {spec.factor!r}")
  if isinstance(spec, LabelFlip):
    require(isinstance(spec.source, (int, np.integer))
            and 0 <= spec.source < num_classes, f"{name}.source",
            f"source label must be in [0, {num_classes - 1}], got "
            f"{spec.source!r}")
    require(spec.source != spec.target, f"{name}.source",
            f"source and target must differ, both are {spec.source}")
  if isinstance(spec, Warp):
    require(_finite(spec.strength) and 0 < spec.strength <= max(h, w) / 2,
            f"{name}.strength",
            f"must be in (0, {max(h, w) / 2}] pixels, got {spec.strength!r}")
    require(isinstance(spec.grid, (int, np.integer)) and 2 <= spec.grid <= max(h, w),
            f"{name}.grid", f"must be an integer in [2, {max(h, w)}], got "
            f"{spec.grid!r}")


def _finite(v) -> bool:
  return isinstance(v, (int, float, np.floating, np.integer)) and math.isfinite(v)


# ----------------------------------------------------------------------------
# Building the per-provider arrays.


def _patch_mask(size, location, h, w, rng):
  if isinstance(location, str):
    corners = {"top_left": (0, 0), "top_right": (0, w - size),
               "bottom_left": (h - size, 0),
               "bottom_right": (h - size, w - size),
               "center": ((h - size) // 2, (w - size) // 2)}
    if location == "random":
      r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    else:
      r, c = corners[location]
  else:
    r, c = location
  mask = np.zeros((h, w, 1), np.float32)
  mask[r:r + size, c:c + size] = 1.0
  return mask


def _patch_pattern(kind, h, w, c, rng):
  if kind == "white":
    return np.ones((h, w, c), np.float32)
  if kind == "checkerboard":
    board = (np.add.outer(np.arange(h), np.arange(w)) % 2).astype(np.float32)
    return np.repeat(board[:, :, None], c, axis=2)
  return rng.integers(0, 2, (h, w, c)).astype(np.float32)


def _identity_grid(h, w):
  rows, cols = np.meshgrid(np.arange(h, dtype=np.float32),
                           np.arange(w, dtype=np.float32), indexing="ij")
  return np.stack([rows, cols], -1)


def _warp_field(strength, grid, h, w, rng):
  """Identity grid plus a smooth random displacement of at most `strength`."""
  ctrl = rng.uniform(-1, 1, (grid, grid, 2))
  ctrl /= np.abs(ctrl).mean()
  # Bilinear upsampling of the control grid to h x w.
  ys, xs = np.linspace(0, grid - 1, h), np.linspace(0, grid - 1, w)
  y0 = np.clip(np.floor(ys).astype(int), 0, grid - 2)
  x0 = np.clip(np.floor(xs).astype(int), 0, grid - 2)
  fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
  c = ctrl
  field = ((1 - fy) * (1 - fx) * c[y0][:, x0] + (1 - fy) * fx * c[y0][:, x0 + 1]
           + fy * (1 - fx) * c[y0 + 1][:, x0] + fy * fx * c[y0 + 1][:, x0 + 1])
  field = strength * field / np.abs(field).max()
  coords = _identity_grid(h, w) + field
  coords[..., 0] = np.clip(coords[..., 0], 0, h - 1)
  coords[..., 1] = np.clip(coords[..., 1], 0, w - 1)
  return coords.astype(np.float32)


def _one(spec: AttackSpec | None, reference: AttackSpec, input_shape, rng):
  """Arrays of one provider; a benign one carries the reference trigger."""
  h, w, c = input_shape
  active = spec is not None
  spec_ = spec if active else reference
  mask = np.zeros((h, w, 1), np.float32)
  pattern = np.zeros((h, w, c), np.float32)
  alpha, scale, source = 0.0, 1.0, -1
  warp = _identity_grid(h, w)
  if isinstance(spec_, (BadNets, Scaling)):
    mask = _patch_mask(spec_.size, spec_.location, h, w, rng)
    pattern = _patch_pattern(spec_.pattern, h, w, c, rng)
    alpha = 1.0
    if isinstance(spec_, Scaling) and active:
      scale = float(spec_.factor)
  elif isinstance(spec_, Blend):
    mask = np.ones((h, w, 1), np.float32)
    pattern = rng.uniform(0, 1, (h, w, c)).astype(np.float32)
    alpha = float(spec_.alpha)
  elif isinstance(spec_, Warp):
    warp = _warp_field(spec_.strength, spec_.grid, h, w, rng)
  elif isinstance(spec_, LabelFlip):
    source = int(spec_.source)
  return dict(kind=KIND[spec.name] if active else 0,
              poison_rate=float(spec.poison_rate) if active else 0.0,
              target=int(spec_.target), source=source, mask=mask,
              pattern=pattern, alpha=alpha, warp=warp, scale=scale)


def make_behaviour(specs: Sequence[AttackSpec | None], input_shape,
                   num_classes: int, *, seed: int = 0,
                   reference: AttackSpec | None = None) -> Behaviour:
  """Stacks per-provider attack specs (None = benign) into a Behaviour.

  Random parts of a trigger (random patterns and locations, blend noise, warp
  fields) come from numpy streams seeded by (seed, provider index), so each
  provider has its own trigger and the result is reproducible.

  Args:
    specs: one entry per provider.
    input_shape: (H, W, C).
    num_classes: for validating targets.
    seed: seed of the random trigger parts.
    reference: trigger used to measure benign providers' attack success rate
      (default: the first malicious provider's spec, else BadNets()).
  """
  require(len(specs) >= 1, "providers", "need at least one provider")
  h, w, c = (int(s) for s in input_shape)
  for spec in specs:
    if spec is not None:
      if not isinstance(spec, tuple(SPEC_BY_NAME.values())):
        raise ConfigError(f"attack: unknown attack spec {spec!r}; use one of "
                          f"{', '.join(ATTACKS)}")
      validate_spec(spec, (h, w, c), num_classes)
  if reference is None:
    reference = next((s for s in specs if s is not None), BadNets())
  validate_spec(reference, (h, w, c), num_classes)
  rows = [_one(spec, reference, (h, w, c), rng_lib.trigger(seed, i))
          for i, spec in enumerate(specs)]
  stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  dtypes = dict(kind=jnp.int32, target=jnp.int32, source=jnp.int32)
  return Behaviour(**{k: jnp.asarray(v, dtypes.get(k, jnp.float32))
                      for k, v in stacked.items()})


def benign(n: int, input_shape, num_classes: int, **kwargs) -> Behaviour:
  return make_behaviour([None] * n, input_shape, num_classes, **kwargs)


def population_specs(n: int, malicious: int, attack: str, *,
                     own_backdoor: bool = True, num_classes: int = 10,
                     seed: int = 0, **overrides) -> list[AttackSpec | None]:
  """Specs for n providers whose first `malicious` run `attack`.

  With own_backdoor (the RTTD setting: every malicious provider inserts its
  own backdoor), each malicious provider gets its own random target label and,
  for patch triggers, its own random location and pattern; `overrides` fix
  any field for all of them.
  """
  require(isinstance(n, (int, np.integer)) and n >= 1, "providers",
          f"must be an integer >= 1, got {n!r}")
  require(isinstance(malicious, (int, np.integer)) and 0 <= malicious <= n,
          "malicious", f"must be in [0, providers={n}], got {malicious!r}")
  require(attack in SPEC_BY_NAME, "attack",
          f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
  cls = SPEC_BY_NAME[attack]
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = set(overrides) - fields
  require(not unknown, "attack", f"{attack} has no field(s) "
          f"{', '.join(sorted(unknown))}; it has {', '.join(sorted(fields))}")
  rng = rng_lib.attack_draws(seed)
  specs: list[AttackSpec | None] = []
  for _ in range(malicious):
    kw = {}
    if own_backdoor:
      kw["target"] = int(rng.integers(num_classes))
      if "location" in fields:
        kw["location"] = "random"
        kw["pattern"] = "random"
      if "source" in fields:
        src = int(rng.integers(num_classes - 1))
        kw["source"] = src + (src >= kw["target"])
    kw.update(overrides)
    specs.append(cls(**kw))
  return specs + [None] * (n - malicious)


# ----------------------------------------------------------------------------
# The pure per-provider functions used inside the sub-run.


def _bilinear(x, coords):
  """Samples x [B, H, W, C] at float coordinates [H, W, 2] (bilinear)."""
  h, w = x.shape[1], x.shape[2]
  r, c = coords[..., 0], coords[..., 1]
  r0 = jnp.clip(jnp.floor(r), 0, h - 1).astype(jnp.int32)
  c0 = jnp.clip(jnp.floor(c), 0, w - 1).astype(jnp.int32)
  r1, c1 = jnp.minimum(r0 + 1, h - 1), jnp.minimum(c0 + 1, w - 1)
  fr, fc = (r - r0)[..., None], (c - c0)[..., None]
  g = lambda rr, cc: x[:, rr, cc, :]
  return ((1 - fr) * (1 - fc) * g(r0, c0) + (1 - fr) * fc * g(r0, c1)
          + fr * (1 - fc) * g(r1, c0) + fr * fc * g(r1, c1))


def apply_trigger(b: Behaviour, x, *, use_warp: bool = True):
  """Triggered version of images x [B, H, W, C] for ONE provider's behaviour."""
  if use_warp:
    x = jnp.where(b.kind == KIND["warp"], _bilinear(x, b.warp), x)
  m = b.alpha * b.mask
  return (1.0 - m) * x + m * b.pattern


def poison_batch(b: Behaviour, key, x, y, *, use_warp: bool = True):
  """Poisons the first round(poison_rate * B) examples of the batch."""
  del key
  batch = y.shape[0]
  chosen = jnp.arange(batch) < jnp.round(b.poison_rate * batch)
  flip = b.kind == KIND["label_flip"]
  poisoned_x = jnp.where(flip, x, apply_trigger(b, x, use_warp=use_warp))
  relabel = chosen & jnp.where(flip, y == b.source, True)
  x = jnp.where(relabel[:, None, None, None], poisoned_x, x)
  y = jnp.where(relabel, b.target, y)
  return x, y


def finalize(b: Behaviour, start_params, end_params):
  """Model replacement: return start + scale * (end - start)."""
  return jax.tree_util.tree_map(lambda s, e: s + b.scale * (e - s),
                                start_params, end_params)


def _uses_warp(behaviour: Behaviour) -> bool:
  """Whether any provider (or a benign reference trigger) is a warp."""
  identity = _identity_grid(*behaviour.warp.shape[1:3])
  return bool(np.any(np.asarray(behaviour.warp) != identity))


def make_hooks(behaviour: Behaviour) -> Hooks:
  """Hooks for `train.make_trainer`, compiling in only what is used."""
  use_warp = _uses_warp(behaviour)
  use_scale = bool(np.any(np.asarray(behaviour.scale) != 1.0))
  return Hooks(
      poison_batch=lambda b, k, x, y: poison_batch(b, k, x, y,
                                                   use_warp=use_warp),
      finalize=finalize if use_scale else Hooks().finalize)


# ----------------------------------------------------------------------------
# Evaluation, vectorized over providers.


def attack_success_rate(model, params, model_state, behaviour: Behaviour,
                        x_test, y_test, *, batch_size: int = 1000) -> np.ndarray:
  """ASR of every provider's model for the provider's own trigger: [n].

  Trigger attacks: share of triggered test inputs whose true class is not the
  target that the model classifies as the target. label_flip: share of clean
  test inputs of class `source` classified as the target. Benign providers are
  measured with their reference trigger (the base rate).
  """
  x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
  hits = jnp.zeros(behaviour.size)
  counts = jnp.zeros(behaviour.size)
  use_warp = _uses_warp(behaviour)
  for start in range(0, x_test.shape[0], batch_size):
    h, c = _asr_counts(model, use_warp, params, model_state, behaviour,
                       x_test[start:start + batch_size],
                       y_test[start:start + batch_size])
    hits, counts = hits + h, counts + c
  return np.asarray(hits / jnp.maximum(counts, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _asr_counts(model, use_warp, params, model_state, behaviour, x, y):
  def one(p, s, b):
    flip = b.kind == KIND["label_flip"]
    eligible = jnp.where(flip, y == b.source, y != b.target)
    xt = jnp.where(flip, x, apply_trigger(b, x, use_warp=use_warp))
    logits, _ = model.predict(p, s, xt)
    hit = (jnp.argmax(logits, -1) == b.target) & eligible
    return jnp.sum(hit), jnp.sum(eligible)
  return jax.vmap(one)(params, model_state, behaviour)
