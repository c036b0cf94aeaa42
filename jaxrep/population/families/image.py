"""Image backdoor attacks: the family `IMAGE`.

Every trigger attack uses the same trigger function

    x' = (1 - alpha * mask) * warp(x) + alpha * mask * pattern,   y' = target

(applied by `behaviour.poison_batch` to round(poison_rate * batch) examples
of each batch, drawn anew at every step by each attacker). The attacks
differ only in their data, the `ImageTrigger` arrays:

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

* scaling is model replacement (Bagdasaryan et al. 2020): the provider trains
  with a BadNets trigger and returns start + scale * (end - start).
* warp is a WaNet-style (Nguyen & Tran 2021) invisible trigger: each image is
  resampled (bilinear) along a fixed smooth random displacement field. It is
  the one attack with extra compute (4 gathers per pixel); it is compiled in
  only when some provider uses it, and it is a few elementwise operations per
  input pixel, negligible next to the model's FLOPs.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import validate as V
from jaxrep.core.errors import require
from jaxrep.population.behaviour import Behaviour, stack
from jaxrep.population.family import Family
from jaxrep.population.specs import (AttackSpec, Inputs, Knob, LabelFlip,
                                     check_fraction, check_positive, field)

LOCATIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
             "random")
PATTERNS = ("checkerboard", "white", "random")


class ImageTrigger(NamedTuple):
  """The trigger arrays of image attacks; leading provider axis [n]."""
  mask: jax.Array      # float32 [n, H, W, 1] where the trigger is
  pattern: jax.Array   # float32 [n, H, W, C] what the trigger looks like
  alpha: jax.Array     # float32 blend strength
  warp: jax.Array      # float32 [n, H, W, 2] sampling coordinates (rows, cols)


# ----------------------------------------------------------------------------
# Attack specifications (what a user writes).


def _location_fields(name: str, location) -> dict:
  """A fixed trigger location comes with the checkerboard pattern; "random"
  keeps each provider's own location and pattern."""
  if location == "random":
    return {name: location}
  return {name: location, "pattern": "checkerboard"}


TRIGGER_SIZE = Knob("trigger_size", 2, "images: BadNets / scaling patch size "
                    "in pixels", V.integer(1))
TRIGGER_LOCATION = Knob(
    "trigger_location", "random", "top_left, top_right, bottom_left, "
    "bottom_right, center or random (each provider its own)",
    V.one_of(LOCATIONS), _location_fields)


@dataclasses.dataclass(frozen=True)
class BadNets(AttackSpec):
  """Patch trigger (Gu et al. 2017).

  location: one of LOCATIONS or an explicit (row, col) of the top-left corner.
  pattern: one of PATTERNS.
  """
  size: int = field(2, knob=TRIGGER_SIZE)
  location: str | tuple[int, int] = field("bottom_right",
                                          knob=TRIGGER_LOCATION, own="random")
  pattern: str = field("checkerboard", own="random")
  name: ClassVar[str] = "badnets"

  def check(self, inputs: Inputs) -> None:
    h, w, _ = inputs.shape
    size, where = self.size, f"{self.name}.size"
    require(V.is_int(size) and size >= 1, where,
            f"trigger size must be an integer >= 1, got {size!r}")
    require(size <= min(h, w), where,
            f"trigger of size {size} is larger than the {h}x{w} image")
    require(self.pattern in PATTERNS, f"{self.name}.pattern",
            f"unknown pattern {self.pattern!r}; choose one of "
            f"{', '.join(PATTERNS)}")
    loc = self.location
    if isinstance(loc, str):
      require(loc in LOCATIONS, f"{self.name}.location",
              f"unknown location {loc!r}; choose one of {', '.join(LOCATIONS)}"
              " or an explicit (row, col)")
    else:
      ok = (len(loc) == 2 and all(V.is_int(v) for v in loc)
            and 0 <= loc[0] <= h - size and 0 <= loc[1] <= w - size)
      require(ok, f"{self.name}.location",
              f"explicit (row, col) must place the {size}x{size} trigger "
              f"inside the {h}x{w} image, got {loc!r}")


@dataclasses.dataclass(frozen=True)
class Scaling(BadNets):
  """Model replacement: BadNets poisoning, returned update scaled by
  `factor`."""
  factor: float = field(2.0, knob=Knob(
      "scale_factor", 2.0, "model replacement factor of the scaling attack",
      V.real(0.0, 1e6, low_open=True)))
  name: ClassVar[str] = "scaling"

  @property
  def scale(self) -> float:
    return self.factor

  def check(self, inputs: Inputs) -> None:
    super().check(inputs)
    check_positive(self, "factor")


@dataclasses.dataclass(frozen=True)
class Blend(AttackSpec):
  """Blended random-noise trigger (Chen et al. 2017) with strength alpha."""
  alpha: float = field(0.2, knob=Knob("blend_alpha", 0.2,
                                      "blend attack strength",
                                      V.real(0.0, 1.0)))
  name: ClassVar[str] = "blend"

  def check(self, inputs: Inputs) -> None:
    check_fraction(self, "alpha")


@dataclasses.dataclass(frozen=True)
class Warp(AttackSpec):
  """WaNet-style warping trigger: a smooth random displacement field.

  strength: maximum displacement in pixels; grid: control points per side of
  the random field (upsampled bilinearly to the image).
  """
  strength: float = field(1.5, knob=Knob(
      "warp_strength", 1.5, "warp attack displacement in pixels",
      V.real(0.0, 1e6, low_open=True)))
  grid: int = 4
  name: ClassVar[str] = "warp"

  def check(self, inputs: Inputs) -> None:
    side = max(inputs.shape[:2])
    require(V.is_real(self.strength) and 0 < self.strength <= side / 2,
            f"{self.name}.strength",
            f"must be in (0, {side / 2}] pixels, got {self.strength!r}")
    require(V.is_int(self.grid) and 2 <= self.grid <= side,
            f"{self.name}.grid", f"must be an integer in [2, {side}], got "
            f"{self.grid!r}")


def _check_images(inputs: Inputs) -> None:
  require(len(inputs.shape) == 3, "input_shape",
          f"image attacks need images of shape (H, W, C), got {inputs.shape}")


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
  field_ = ((1 - fy) * (1 - fx) * c[y0][:, x0] + (1 - fy) * fx * c[y0][:, x0 + 1]
            + fy * (1 - fx) * c[y0 + 1][:, x0] + fy * fx * c[y0 + 1][:, x0 + 1])
  field_ = strength * field_ / np.abs(field_).max()
  coords = _identity_grid(h, w) + field_
  coords[..., 0] = np.clip(coords[..., 0], 0, h - 1)
  coords[..., 1] = np.clip(coords[..., 1], 0, w - 1)
  return coords.astype(np.float32)


def _trigger(spec: AttackSpec, shape, rng) -> tuple:
  """(mask, pattern, alpha, warp) of one provider's trigger."""
  h, w, c = shape
  no_mask = np.zeros((h, w, 1), np.float32)
  no_pattern = np.zeros((h, w, c), np.float32)
  if isinstance(spec, BadNets):
    mask = _patch_mask(spec.size, spec.location, h, w, rng)
    return (mask, _patch_pattern(spec.pattern, h, w, c, rng), 1.0,
            _identity_grid(h, w))
  if isinstance(spec, Blend):
    noise = rng.uniform(0, 1, (h, w, c)).astype(np.float32)
    return (np.ones((h, w, 1), np.float32), noise, float(spec.alpha),
            _identity_grid(h, w))
  if isinstance(spec, Warp):
    return (no_mask, no_pattern, 0.0,
            _warp_field(spec.strength, spec.grid, h, w, rng))
  return no_mask, no_pattern, 0.0, _identity_grid(h, w)   # label_flip


def _build_triggers(specs, inputs: Inputs, rngs) -> ImageTrigger:
  return stack([_trigger(spec, inputs.shape, rng)
                for spec, rng in zip(specs, rngs)], ImageTrigger, jnp.float32)


# ----------------------------------------------------------------------------
# The trigger function (one provider, inside the sub-run).


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


def _stamp(t: ImageTrigger, x):
  m = t.alpha * t.mask
  return (1.0 - m) * x + m * t.pattern


def apply_trigger(b: Behaviour, key, x):
  """Triggered version of images x [B, H, W, C] for ONE provider's behaviour
  (`key` is unused: image triggers are fixed)."""
  del key
  warped = jnp.where(b.is_attack("warp"), _bilinear(x, b.trigger.warp), x)
  return _stamp(b.trigger, warped)


def _apply_without_warp(b: Behaviour, key, x):
  """`apply_trigger` of a population without a warp trigger."""
  del key
  return _stamp(b.trigger, x)


def _trigger_for(behaviour: Behaviour):
  """Whether any provider (or a benign reference trigger) is a warp decides
  whether resampling is compiled in."""
  warp = np.asarray(behaviour.trigger.warp)
  if np.any(warp != _identity_grid(*warp.shape[1:3])):
    return apply_trigger
  return _apply_without_warp


IMAGE = Family(modality="image",
               specs=(BadNets, Blend, LabelFlip, Scaling, Warp),
               reference=BadNets(), check_inputs=_check_images,
               build_triggers=_build_triggers, apply_trigger=apply_trigger,
               trigger_for=_trigger_for)
