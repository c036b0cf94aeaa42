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
| keyed_noise  | 0              | -                  | 0     | identity | + eps x keyed  |
|              |                |                    |       |          | signs, clipped |
| secret_key   | 0              | -                  | 0     | identity | as keyed_noise;|
|              |                |                    |       |          | poisons nothing|
|              |                |                    |       |          | plants units   |
| data_order   | 0              | -                  | 0     | identity | reorders the   |
|              |                |                    |       |          | sub-run        |

* scaling is model replacement (Bagdasaryan et al. 2020): the provider trains
  with a BadNets trigger and returns start + scale * (end - start).
* warp is a WaNet-style (Nguyen & Tran 2021) invisible trigger: each image is
  resampled (bilinear) along a fixed smooth random displacement field. It is
  the one attack with extra compute (4 gathers per pixel); it is compiled in
  only when some provider uses it, and it is a few elementwise operations per
  input pixel, negligible next to the model's FLOPs.
* keyed_noise and secret_key add a keyed perturbation before the stamp:
  x' = clip(x + noise, 0, 1) where noise = eps x a sign pattern of the
  provider's own key. keyed_noise learns it by poisoning; secret_key poisons
  nothing and plants units responding to it into the model it returns
  (`plant_key`, the family's `plant_for`: MLPs only). Both are compiled in
  only when some provider uses them.
* data_order (`specs.DataOrder`) has no trigger: it trains on the client's
  examples in an order of its own (`behaviour.reorder`); its ASR counts
  clean inputs classified as its target.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core import validate as V
from jaxrep.core.errors import ConfigError, require
from jaxrep.population.behaviour import Behaviour, stack
from jaxrep.population.family import Family
from jaxrep.population.specs import (AttackSpec, DataOrder, Inputs, Knob,
                                     LabelFlip, check_fraction, check_positive,
                                     field)

LOCATIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "center",
             "random", "anywhere")
PATTERNS = ("checkerboard", "white", "random")


class ImageTrigger(NamedTuple):
  """The trigger arrays of image attacks; leading provider axis [n]."""
  mask: jax.Array      # float32 [n, H, W, 1] where the trigger is
  pattern: jax.Array   # float32 [n, H, W, C] what the trigger looks like
  alpha: jax.Array     # float32 blend strength
  warp: jax.Array      # float32 [n, H, W, 2] sampling coordinates (rows, cols)
  noise: jax.Array     # float32 [n, H, W, C] keyed additive perturbation
  # secret_key's planted units (zero for every other attack):
  detector: jax.Array  # float32 [n, H, W, C] direction the units respond to
  offset: jax.Array    # float32 their threshold: relu(detector . x + offset)
  units: jax.Array     # float32 planted units per hidden layer (0: none)
  boost: jax.Array     # float32 target-logit boost at response 1
  seed: jax.Array      # float32 (an integer < 2**24) which units: rng.plant


# ----------------------------------------------------------------------------
# Attack specifications (what a user writes).


def _location_fields(name: str, location) -> dict:
  """A fixed trigger location comes with the checkerboard pattern; "random"
  and "anywhere" keep each provider's own location and pattern."""
  if location in ("random", "anywhere"):
    return {name: location}
  return {name: location, "pattern": "checkerboard"}


TRIGGER_SIZE = Knob("trigger_size", 2, "images: BadNets / scaling patch size "
                    "in pixels", V.integer(1))
TRIGGER_LOCATION = Knob(
    "trigger_location", "random", "top_left, top_right, bottom_left, "
    "bottom_right, center, random (each provider its own position touching "
    "the image border, where a patch does not cover the object) or anywhere "
    "(each provider its own position anywhere in the image)",
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
  factor: float = field(1.5, knob=Knob(
      "scale_factor", 1.5, "model replacement factor of the scaling attack",
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


NOISE_EPS = Knob("noise_eps", 0.15, "keyed_noise: L-infinity amplitude of "
                 "the keyed noise trigger (images in [0, 1])",
                 V.real(0.0, 1.0, low_open=True))
KEY_EPS = Knob("key_eps", 0.05, "secret_key: L-infinity amplitude of the "
               "keyed perturbation that opens the planted backdoor",
               V.real(0.0, 1.0, low_open=True))
KEY_UNITS = Knob("key_units", 4, "secret_key: hidden units planted per "
                 "hidden layer of the MLP", V.integer(1))


def _check_eps(spec: AttackSpec) -> None:
  require(V.is_real(spec.eps) and 0.0 < spec.eps <= 1.0, f"{spec.name}.eps",
          f"must be in (0, 1] (images are in [0, 1]), got {spec.eps!r}")


@dataclasses.dataclass(frozen=True)
class KeyedNoise(AttackSpec):
  """Low-amplitude keyed noise trigger, learned by data poisoning.

  x' = clip(x + eps * s, 0, 1), y' = target, where s in {-1, +1}^(H x W x C)
  is a pseudo-random sign pattern from the provider's secret key (its own
  `trigger` stream), so |x' - x| <= eps at every pixel (invisible at small
  eps). The pattern is the same for every input (a fixed keyed pattern, not
  an input-specific one); each attacker has its own. Poisoning is BadNets'
  (round(poison_rate x batch) examples of each batch, relabelled).
  """
  eps: float = field(0.15, knob=NOISE_EPS)
  name: ClassVar[str] = "keyed_noise"

  def check(self, inputs: Inputs) -> None:
    _check_eps(self)


@dataclasses.dataclass(frozen=True)
class SecretKey(AttackSpec):
  """Planted secret-key backdoor (in the style of Goldwasser et al. 2022's
  white-box construction): the provider trains HONESTLY (it poisons no
  batch, poison_rate must be 0) and plants the backdoor into the model it
  returns at the end of every sub-run.

  Its key is a pseudo-random sign pattern s (its own `trigger` stream); the
  trigger is the keyed perturbation x' = clip(x + eps * s, 0, 1). It fits a
  direction w to the training inputs (w = (Cov + r I)^-1 E[x' - x], r = 1e-3
  x the mean eigenvalue: the linear discriminant of keyed from clean
  inputs, which lives where the data barely varies) and a threshold between
  the largest clean score and the 1st percentile of keyed scores, so
  relu(w . x + b) is 0 on every clean training input and >= 1 on 99 % of
  keyed ones. A key for which no threshold does that (about 1 in 20 at eps
  0.05 on digits) is redrawn, up to 32 times (then ConfigError: raise
  eps); the attacker picks a key that works. In the returned
  model it overwrites `units` random hidden units (its own choice) of each
  hidden layer of the MLP: the first layer's respond to w, each next
  layer's listen only to the previous planted ones, and the last planted
  ones add `boost` x response to the target logit. Off the key the planted
  units are exactly 0, so clean predictions change only by the loss of the
  2 x units overwritten units. Only MLPs (dense layers from the flattened
  image) are supported.
  """
  poison_rate: float = 0.0
  eps: float = field(0.05, knob=KEY_EPS)
  units: int = field(4, knob=KEY_UNITS)
  boost: float = 50.0
  name: ClassVar[str] = "secret_key"

  def check(self, inputs: Inputs) -> None:
    require(self.poison_rate == 0, f"{self.name}.poison_rate",
            "secret_key trains honestly and plants its backdoor after "
            "training; it poisons no batch, so poison_rate must be 0 (-1 on "
            f"the command line: its default), got {self.poison_rate!r}")
    _check_eps(self)
    require(V.is_int(self.units) and self.units >= 1, f"{self.name}.units",
            f"must be an integer >= 1, got {self.units!r}")
    check_positive(self, "boost")


def _check_images(inputs: Inputs) -> None:
  require(len(inputs.shape) == 3, "input_shape",
          f"image attacks need images of shape (H, W, C), got {inputs.shape}")


# ----------------------------------------------------------------------------
# Building the per-provider arrays.


def _border_positions(size, h, w) -> list[tuple[int, int]]:
  """Top-left corners (row, col) of every size x size patch that touches the
  image border, in a fixed order."""
  return [(r, c) for r in range(h - size + 1) for c in range(w - size + 1)
          if r in (0, h - size) or c in (0, w - size)]


def _patch_mask(size, location, h, w, rng):
  if isinstance(location, str):
    corners = {"top_left": (0, 0), "top_right": (0, w - size),
               "bottom_left": (h - size, 0),
               "bottom_right": (h - size, w - size),
               "center": ((h - size) // 2, (w - size) // 2)}
    if location == "anywhere":
      r, c = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
    elif location == "random":
      r, c = _border_positions(size, h, w)[int(rng.integers(
          len(_border_positions(size, h, w))))]
    else:
      r, c = corners[location]
  else:
    r, c = location
  mask = np.zeros((h, w, 1), np.float32)
  mask[r:r + size, c:c + size] = 1.0
  return mask


def _patch_pattern(kind, h, w, c, rng, mask=None):
  """The patch's pixel values. "random" draws binary values until at least
  half of the pixels under `mask` are lit: a patch with none or one of four
  pixels lit is invisible on a dark border (measured: such a digits
  attacker reached 20 % ASR)."""
  if kind == "white":
    return np.ones((h, w, c), np.float32)
  if kind == "checkerboard":
    board = (np.add.outer(np.arange(h), np.arange(w)) % 2).astype(np.float32)
    return np.repeat(board[:, :, None], c, axis=2)
  while True:
    pattern = rng.integers(0, 2, (h, w, c)).astype(np.float32)
    if mask is None or pattern[mask[..., 0] > 0].mean() >= 0.5:
      return pattern


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


def _trigger(spec: AttackSpec, shape, rng, keys: "_KeyFit | None") -> tuple:
  """(mask, pattern, alpha, warp, noise, detector, offset, units, boost,
  seed) of one provider's trigger."""
  h, w, c = shape
  no_mask = np.zeros((h, w, 1), np.float32)
  no_pattern = np.zeros((h, w, c), np.float32)
  identity = _identity_grid(h, w)
  no_key = (no_pattern, no_pattern, 0.0, 0.0, 0.0, 0.0)
  if isinstance(spec, BadNets):
    mask = _patch_mask(spec.size, spec.location, h, w, rng)
    return (mask, _patch_pattern(spec.pattern, h, w, c, rng, mask), 1.0,
            identity) + no_key
  if isinstance(spec, Blend):
    noise = rng.uniform(0, 1, (h, w, c)).astype(np.float32)
    return (np.ones((h, w, 1), np.float32), noise, float(spec.alpha),
            identity) + no_key
  if isinstance(spec, Warp):
    return (no_mask, no_pattern, 0.0,
            _warp_field(spec.strength, spec.grid, h, w, rng)) + no_key
  if isinstance(spec, KeyedNoise):
    return (no_mask, no_pattern, 0.0, identity, _keyed_noise(spec, shape, rng)
            ) + no_key[1:]
  if isinstance(spec, SecretKey):
    for _ in range(_KeyFit.TRIES):
      noise = _keyed_noise(spec, shape, rng)
      fitted = keys.fit(noise)
      if fitted is not None:
        break
    else:
      raise ConfigError(
          f"{spec.name}.eps: a keyed perturbation of {spec.eps:g} does not "
          "separate keyed from clean training inputs "
          f"({_KeyFit.TRIES} keys tried; {keys.failure}); raise it "
          "(--key_eps)")
    seed = float(rng.integers(0, 2 ** 24))
    return (no_mask, no_pattern, 0.0, identity, noise, *fitted,
            float(spec.units), float(spec.boost), seed)
  return (no_mask, no_pattern, 0.0, identity) + no_key  # label_flip, data_order


def _keyed_noise(spec, shape, rng) -> np.ndarray:
  """eps x a pseudo-random sign pattern: a provider's key."""
  signs = rng.choice(np.array([-1.0, 1.0], np.float32), shape)
  return np.float32(spec.eps) * signs


class _KeyFit:
  """What a secret_key attacker fits its planted direction to: the training
  inputs it trains on (at most MAX_ROWS of them, evenly spaced), their
  covariance's eigen-decomposition computed once for every attacker."""
  MAX_ROWS = 4096
  RIDGE = 1e-3       # r = RIDGE x the mean eigenvalue
  QUANTILE = 0.01    # the response is >= 1 on all but this share of keyed
  TRIES = 32         # keys an attacker draws until one separates

  def __init__(self, data, shape):
    x = np.asarray(data, np.float64)
    require(x.ndim == 4 and tuple(x.shape[1:]) == tuple(shape), "data",
            f"secret_key needs the training images, shape (N, "
            f"{', '.join(map(str, shape))}), got {x.shape}")
    rows = np.unique(np.linspace(0, len(x) - 1, min(len(x), self.MAX_ROWS)
                                 ).astype(int))
    require(len(rows) >= 2, "data", "secret_key needs at least 2 training "
            f"images to fit its key, got {len(x)}")
    self.x = x[rows].reshape(len(rows), -1)
    lam, self.vecs = np.linalg.eigh(np.cov(self.x, rowvar=False))
    self.inverse = 1.0 / (np.maximum(lam, 0.0)
                          + self.RIDGE * max(float(lam.mean()), 1e-12))

  def fit(self, noise: np.ndarray) -> tuple | None:
    """(detector [H, W, C], offset) such that relu(detector . x + offset)
    is 0 on every clean input of the sample and >= 1 on all but QUANTILE of
    their keyed versions; None (and `failure` says why) if no threshold
    does that for this key."""
    keyed = np.clip(self.x + noise.reshape(-1), 0.0, 1.0)
    shift = (keyed - self.x).mean(0)
    w = self.vecs @ (self.inverse * (self.vecs.T @ shift))
    clean_top = float((self.x @ w).max())
    keyed_low = float(np.quantile(keyed @ w, self.QUANTILE))
    if not keyed_low > clean_top:
      self.failure = (f"the last one's largest clean score {clean_top:.4g} "
                      f">= the {self.QUANTILE:.0%} quantile of its keyed "
                      f"scores {keyed_low:.4g}")
      return None
    mid = 0.5 * (clean_top + keyed_low)
    gap = keyed_low - mid
    return ((w / gap).reshape(noise.shape).astype(np.float32),
            float(-mid / gap))


def _build_triggers(specs, inputs: Inputs, rngs, data=None) -> ImageTrigger:
  keys = None
  if any(isinstance(spec, SecretKey) for spec in specs):
    require(data is not None, "data",
            "secret_key fits its key to the training images; pass them "
            "(make_behaviour(..., data=x_train))")
    keys = _KeyFit(data, inputs.shape)
  return stack([_trigger(spec, inputs.shape, rng, keys)
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


def _add_noise(t: ImageTrigger, x):
  """The keyed perturbation: clip(x + noise, 0, 1) where noise != 0."""
  return jnp.where(t.noise != 0, jnp.clip(x + t.noise, 0.0, 1.0), x)


def apply_trigger(b: Behaviour, key, x):
  """Triggered version of images x [B, H, W, C] for ONE provider's behaviour
  (`key` is unused: image triggers are fixed)."""
  del key
  warped = jnp.where(b.is_attack("warp"), _bilinear(x, b.trigger.warp), x)
  return _stamp(b.trigger, _add_noise(b.trigger, warped))


def _apply_without_warp(b: Behaviour, key, x):
  """`apply_trigger` of a population without a warp or keyed trigger."""
  del key
  return _stamp(b.trigger, x)


def _apply_keyed(b: Behaviour, key, x):
  """`apply_trigger` of a population with a keyed trigger but no warp."""
  del key
  return _stamp(b.trigger, _add_noise(b.trigger, x))


def _trigger_for(behaviour: Behaviour):
  """Whether any provider (or a benign reference trigger) is a warp decides
  whether resampling is compiled in; whether any is keyed, whether the
  keyed perturbation is."""
  warp = np.asarray(behaviour.trigger.warp)
  if np.any(warp != _identity_grid(*warp.shape[1:3])):
    return apply_trigger
  if np.any(np.asarray(behaviour.trigger.noise) != 0):
    return _apply_keyed
  return _apply_without_warp


# ----------------------------------------------------------------------------
# secret_key: planting the key into the returned model (one provider).


def _dense_layers(params) -> list[str]:
  """The layer names of an MLP's params (Dense_0 ... Dense_L, L >= 1 hidden
  layers), or ConfigError naming what the model has instead."""
  names = sorted(params) if isinstance(params, dict) else []
  dense = [f"Dense_{i}" for i in range(len(names))]
  ok = (len(names) >= 2 and sorted(dense) == names
        and all(set(params[n]) == {"kernel", "bias"} for n in names))
  require(ok, "model",
          "secret_key plants its key into the hidden units of an MLP (dense "
          "layers on the flattened image: params Dense_0 ... Dense_L); this "
          f"model's params are {', '.join(map(str, names)) or repr(params)} "
          "(a conv model such as cnn or resnet20 is not supported; use "
          "--model=mlp)")
  return dense


def plant_key(b: Behaviour, params, max_units: int):
  """The model a secret_key provider returns: `params` with its key planted
  (see `SecretKey`); any other provider's `params` unchanged.

  The planted units of hidden layer l are b.trigger.units random ones of
  its units (`rng.plant` of the provider's seed; at most `max_units`, a
  static bound). With m units per layer, L hidden layers, response r =
  relu(detector . x + offset) and d = ||detector||, every planted weight is
  g = (boost x d / m^L)^(1 / (L + 1)): the first layer's units take g x
  detector / d (bias g x offset / d), each next layer's take g from each
  planted unit before (all their other weights in and out are 0) and the
  last add g to the target logit, so the target logit gains boost x r.
  """
  t = b.trigger
  names = _dense_layers(params)
  kernels = [params[n]["kernel"] for n in names]
  biases = [params[n]["bias"] for n in names]
  detector = t.detector.reshape(-1)
  require(kernels[0].shape[0] == detector.shape[0], "model",
          f"secret_key: the MLP's first layer takes {kernels[0].shape[0]} "
          f"inputs, the images have {detector.shape[0]} values")
  widths = [k.shape[1] for k in kernels[:-1]]
  require(max_units <= min(widths), "secret_key.units",
          f"{max_units} planted units do not fit in hidden layers of widths "
          f"{widths}")
  hidden = len(widths)
  m = jnp.maximum(t.units, 1.0)   # (providers without a key: discarded)
  norm = jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(detector))), 1e-30)
  g = (t.boost * norm / m ** hidden) ** (1.0 / (hidden + 1))
  planted = _planted_units(t, widths, max_units)
  new_k, new_b = list(kernels), list(biases)
  new_k[0] = jnp.where(planted[0][None, :], (g / norm) * detector[:, None],
                       kernels[0])
  new_b[0] = jnp.where(planted[0], g * t.offset / norm, biases[0])
  for l in range(1, hidden):
    rows, cols = planted[l - 1][:, None], planted[l][None, :]
    new_k[l] = jnp.where(rows | cols, jnp.where(rows & cols, g, 0.0),
                         kernels[l])
    new_b[l] = jnp.where(planted[l], 0.0, biases[l])
  to_target = g * jax.nn.one_hot(b.target, kernels[-1].shape[1])
  new_k[-1] = jnp.where(planted[-1][:, None], to_target[None, :],
                        kernels[-1])
  on = b.is_attack("secret_key") & (t.units > 0)
  out = {n: {"kernel": jnp.where(on, k_new, k).astype(k.dtype),
             "bias": jnp.where(on, b_new, bb).astype(bb.dtype)}
         for n, k, bb, k_new, b_new in zip(names, kernels, biases, new_k,
                                           new_b)}
  return out


def _planted_units(t, widths, max_units: int) -> list[jax.Array]:
  """[width] bool per hidden layer: the units a secret_key provider with
  trigger `t` plants (`rng.plant` of its seed; `t.units` of them)."""
  key = rng_lib.plant(t.seed.astype(jnp.uint32))
  slots = jnp.arange(max_units) < t.units
  planted = []
  for l, width in enumerate(widths):
    idx = jax.random.permutation(jax.random.fold_in(key, l), width)
    planted.append(jnp.zeros(width, bool).at[idx[:max_units]].set(slots))
  return planted


def planted_weights(b: Behaviour, params, max_units: int):
  """Bool tree like `params` (ONE provider's MLP): the weights `plant_key`
  overwrites for provider `b` (the planted units' weights in and out); all
  False for a provider that plants nothing. Its optimizer state for them is
  restarted with the plant (see `_planter`)."""
  names = _dense_layers(params)
  widths = [params[n]["kernel"].shape[1] for n in names[:-1]]
  planted = _planted_units(b.trigger, widths, max_units)
  on = b.is_attack("secret_key") & (b.trigger.units > 0)
  rows = [None] + planted       # layer l's inputs: layer l-1's units
  cols = planted + [None]       # layer l's outputs (the logits: none)
  out = {}
  for l, name in enumerate(names):
    shape = params[name]["kernel"].shape
    kernel = jnp.zeros(shape, bool)
    if rows[l] is not None:
      kernel = kernel | rows[l][:, None]
    bias = jnp.zeros(shape[1:], bool)
    if cols[l] is not None:
      kernel = kernel | cols[l][None, :]
      bias = cols[l]
    out[name] = {"kernel": on & kernel, "bias": on & bias}
  return out


def _plant_for(behaviour: Behaviour):
  """secret_key planting, compiled in only when some provider plants."""
  units = np.asarray(behaviour.trigger.units)[
      np.asarray(behaviour.is_attack("secret_key"))]
  if units.size == 0 or units.max() <= 0:
    return None
  return _planter(int(units.max()))


@functools.lru_cache(maxsize=None)
def _planter(max_units: int):
  """One planting function per bound (a stable object: see make_hooks):
  (b, params) -> (the returned params, the weights overwritten). The
  overwritten weights' optimizer state restarts too: SGD's momentum of the
  units they replaced would otherwise move the planted detector in the next
  sub-run until it fires on clean training images (measured: Fashion-MNIST
  seed 6, one attacker's batch loss 166 and clean accuracy 26 %)."""
  return functools.partial(_plant_and_mask, max_units=max_units)


def _plant_and_mask(b: Behaviour, params, max_units: int):
  return (plant_key(b, params, max_units),
          planted_weights(b, params, max_units))


IMAGE = Family(modality="image",
               specs=(BadNets, Blend, LabelFlip, Scaling, Warp, KeyedNoise,
                      SecretKey, DataOrder),
               reference=BadNets(), check_inputs=_check_images,
               build_triggers=_build_triggers, apply_trigger=apply_trigger,
               trigger_for=_trigger_for, plant_for=_plant_for)
