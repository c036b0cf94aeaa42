"""Model-inspection detectors: judge each returned model on its own.

These are the defences a client would use *instead of* replication: each is
given only what the client has (the providers' returned models and clean
data; no trigger, no attack kind) and returns a per-provider score and flag.
All of them are batched over providers: the per-provider (and per-class)
work is one jit-compiled program per model shape. Providers are vmapped in
blocks, as the trainer trains them (`jaxrep.train.trainer`): on CPU as many
at once as keep one block's traced temporaries within the trainer's cache
budget (one at a time for a CNN), on GPU/TPU all of them.

  neural_cleanse   trigger reverse-engineering in the style of Neural Cleanse
                   (Wang et al., S&P 2019): per class a minimal mask and
                   pattern that send clean inputs to the class; the MAD
                   anomaly index of the mask L1 norms; flagged above 2.
  max_margin       a data-free maximum-margin statistic in the style of MM-BD
                   (Wang et al., S&P 2024): per class the largest logit margin
                   reachable in the input box; the p-value of the largest
                   class's margin under a Gamma null fitted to the others;
                   flagged below 0.05.
  strip            an inference-time input filter in the style of STRIP (Gao
                   et al., ACSAC 2019): entropy of predictions on superimposed
                   inputs. From clean data alone it gives each provider's
                   filter (its detection boundary); the model-level score is
                   the model's confidence under superimposition, a statistic
                   of that model alone (see `strip`).
  strip_separation the report-only evaluation of the STRIP filter: AUROC of
                   its entropy between triggered and clean test inputs of one
                   provider's model (needs the triggered inputs, which a
                   client does not have).

Every result is an `Inspection` (scores, flags, the threshold and per-class
or per-input details as numpy arrays). A higher score is always more
suspicious. `flops_per_provider` counts what each detector costs the client
per returned model (by tracing; nothing runs).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from scipy import stats

from jaxrep.core import flops as flops_lib
from jaxrep.core.errors import require
from jaxrep.models import Model
from jaxrep.runtime import memory as memory_lib
from jaxrep.train import trainer as train_lib

# The consistency constant of the MAD for a normal distribution.
MAD_SCALE = 1.4826


class Inspection(NamedTuple):
  """A detector's verdict on n providers.

  Attributes:
    name: the detector ("neural_cleanse", "max_margin", "strip").
    scores: float [n]; higher is more suspicious.
    flags: bool [n], scores above `threshold`.
    threshold: the score above which a provider is flagged.
    details: detector-specific arrays with leading axis n (documented in
      each detector).
  """
  name: str
  scores: np.ndarray
  flags: np.ndarray
  threshold: float
  details: dict[str, np.ndarray]


# ----------------------------------------------------------------------------
# Providers in blocks.


def _per_provider(fn, block: int, provider_args: tuple):
  """fn(*one provider's slice of provider_args) for every provider (or
  every entry of any leading axis, e.g. a provider's classes): one vmap when
  `block` covers them all, else `lax.map` over blocks of `block` vmapped
  entries (the last block may be shorter)."""
  n = jax.tree_util.tree_leaves(provider_args)[0].shape[0]
  one = lambda args: fn(*args)
  if block >= n:
    return jax.vmap(one)(provider_args)
  return jax.lax.map(one, provider_args, batch_size=block)


def provider_block(fn, provider_args: tuple) -> int:
  """Providers per block for `_per_provider(fn, ., provider_args)` on the
  default backend: `trainer.auto_block` of the temporaries ONE provider's
  `fn` traces to (abstractly: nothing is computed)."""
  jaxpr = jax.make_jaxpr(fn)(*memory_lib.one_provider(provider_args))
  return train_lib.auto_block(memory_lib.jaxpr_bytes(jaxpr.jaxpr),
                              jax.default_backend())


# ----------------------------------------------------------------------------
# Checks.


def _positive(value, name: str, *, integer: bool = False) -> None:
  ok = isinstance(value, (int, float, np.integer, np.floating)) and \
      math.isfinite(value) and value > 0
  if integer:
    ok = ok and int(value) == value
  require(ok, name, f"must be a {'positive integer' if integer else 'finite number > 0'}, "
          f"got {value!r}")


def _check_model(model, params) -> int:
  """The number of providers of a population's params; checks the model."""
  require(isinstance(model, Model), "model",
          f"must be a jaxrep Model, got {type(model).__name__}")
  require(not model.is_text, "model",
          f"model inspection works on image models, got {model.name!r}")
  leaves = jax.tree_util.tree_leaves(params)
  require(len(leaves) > 0 and all(np.ndim(l) >= 1 for l in leaves), "params",
          "must be a population's params (every leaf with a leading "
          "provider axis)")
  n = int(np.shape(leaves[0])[0])
  require(all(np.shape(l)[0] == n for l in leaves), "params",
          "every leaf must have the same leading provider axis")
  return n


def _check_images(x, model: Model, name: str, min_count: int = 1):
  x = np.asarray(x)
  shape = tuple(model.input_shape)
  require(x.ndim == 1 + len(shape) and tuple(x.shape[1:]) == shape, name,
          f"must be images of shape [N, {', '.join(map(str, shape))}], "
          f"got {x.shape}")
  require(x.shape[0] >= min_count, name,
          f"needs at least {min_count} inputs, got {x.shape[0]}")
  require(np.issubdtype(x.dtype, np.floating) and np.all(np.isfinite(x)),
          name, "must be finite floating-point images")
  return jnp.asarray(x, jnp.float32)


def _check_classes(classes, num_classes: int):
  if classes is None:
    return jnp.arange(num_classes, dtype=jnp.int32)
  c = np.asarray(classes)
  require(c.ndim == 1 and c.size >= 3 and np.issubdtype(c.dtype, np.integer)
          and np.all((c >= 0) & (c < num_classes))
          and len(set(c.tolist())) == c.size, "classes",
          f"must be >= 3 distinct class ids in [0, {num_classes}), "
          f"got {classes!r}")
  return jnp.asarray(c, jnp.int32)


def mad_anomaly_index(values, axis: int = -1):
  """Neural Cleanse's anomaly index of the smallest value along `axis`:
  |min - median| / (1.4826 * MAD). A zero MAD gives +inf when the minimum
  differs from the median, else 0."""
  v = jnp.asarray(values)
  med = jnp.median(v, axis=axis, keepdims=True)
  mad = MAD_SCALE * jnp.median(jnp.abs(v - med), axis=axis)
  dev = jnp.abs(jnp.min(v, axis=axis) - jnp.squeeze(med, axis))
  return jnp.where(mad > 0, dev / jnp.where(mad > 0, mad, 1.0),
                   jnp.where(dev > 0, jnp.inf, 0.0))


# ----------------------------------------------------------------------------
# Neural Cleanse.


@dataclasses.dataclass(frozen=True)
class NeuralCleanseConfig:
  """Settings of `neural_cleanse`.

  Attributes:
    steps: Adam steps per class (a fixed budget; the paper instead adapts
      the L1 weight and stops early).
    learning_rate: Adam learning rate on the mask / pattern logits.
    l1_weight: lambda, the weight of L1(mask) in the loss (fixed; the paper
      adapts it from 1e-3 on 32x32 images). 0.03 was chosen on a calibration
      setting (digits MLP, seed 1: of 0.01 and 0.03 the one that separates
      that setting's two BadNets models from its benign one; BUILD_NOTES
      "Model inspection detectors").
    success: a mask counts once the reversed trigger sends at least this
      share of the clean inputs to the class; the norm kept is the smallest
      seen at such a step (the last mask's norm if none reaches it).
    threshold: flag above this anomaly index (the paper's 2).
  """
  steps: int = 300
  learning_rate: float = 0.1
  l1_weight: float = 0.03
  success: float = 0.95
  threshold: float = 2.0

  def validate(self) -> "NeuralCleanseConfig":
    _positive(self.steps, "steps", integer=True)
    _positive(self.learning_rate, "learning_rate")
    require(math.isfinite(self.l1_weight) and self.l1_weight >= 0,
            "l1_weight", f"must be finite and >= 0, got {self.l1_weight!r}")
    require(0 < self.success <= 1, "success",
            f"must be in (0, 1], got {self.success!r}")
    _positive(self.threshold, "threshold")
    return self


def _reverse_one(model: Model, cfg: NeuralCleanseConfig, params, model_state,
                 x, target, key):
  """Minimal (mask, pattern) sending x to `target` for ONE model: returns
  (kept mask L1 norm, last mask L1 norm, success rate of the last mask)."""
  h, w, c = x.shape[1:]
  k_mask, k_pattern = jax.random.split(key)
  theta = (jax.random.normal(k_mask, (h, w, 1)),
           jax.random.normal(k_pattern, (h, w, c)))
  tx = optax.adam(cfg.learning_rate)
  labels = jnp.full((x.shape[0],), target)

  def loss_fn(theta):
    mask, pattern = jax.nn.sigmoid(theta[0]), jax.nn.sigmoid(theta[1])
    stamped = (1.0 - mask) * x + mask * pattern
    logits, _ = model.predict(params, model_state, stamped)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    l1 = jnp.sum(mask)
    hit = jnp.mean(jnp.argmax(logits, -1) == target)
    return ce + cfg.l1_weight * l1, (l1, hit)

  def step(carry, _):
    theta, opt_state, best = carry
    (_, (l1, hit)), grads = jax.value_and_grad(loss_fn, has_aux=True)(theta)
    best = jnp.where((hit >= cfg.success) & (l1 < best), l1, best)
    updates, opt_state = tx.update(grads, opt_state)
    return (optax.apply_updates(theta, updates), opt_state, best), None

  (theta, _, best), _ = jax.lax.scan(
      step, (theta, tx.init(theta), jnp.inf), None, length=cfg.steps)
  _, (l1, hit) = loss_fn(theta)
  best = jnp.where((hit >= cfg.success) & (l1 < best), l1, best)
  return jnp.where(jnp.isfinite(best), best, l1), l1, hit


def _abstract(tree):
  return jax.tree_util.tree_map(
      lambda a: jax.ShapeDtypeStruct(jnp.shape(a), a.dtype), tree)


def class_block(model, cfg, params, model_state, x, classes, keys) -> int:
  """Classes reversed side by side for ONE provider (`params`, `model_state`
  without the provider axis; concrete or traced): `trainer.auto_block` of the
  temporaries one class's program traces to. On CPU that is 1 for the
  Fashion-MNIST CNN, whose 64-image step already fills the cache budget
  (the classes one after another took 0.72x the time of all ten vmapped,
  BUILD_NOTES "Model inspection detectors"), and every class for the digits
  MLP; on GPU/TPU every class."""
  one = lambda p, s, xx, c, k: _reverse_one(model, cfg, p, s, xx, c, k)
  jaxpr = jax.make_jaxpr(one)(*_abstract((params, model_state, x)),
                              *_abstract((classes[0], keys[0])))
  return train_lib.auto_block(memory_lib.jaxpr_bytes(jaxpr.jaxpr),
                              jax.default_backend())


def _reverse_provider(model, cfg, x, classes, keys, classes_per_block=0):
  """Every class of one provider: (params, model_state) -> per-class
  (kept norm, last norm, success), in blocks of `classes_per_block` classes
  (0: `class_block`'s)."""
  def fn(p, s):
    block = classes_per_block or class_block(model, cfg, p, s, x, classes,
                                             keys)
    one = lambda c, k: _reverse_one(model, cfg, p, s, x, c, k)
    return _per_provider(one, block, (classes, keys))
  return fn


@functools.partial(jax.jit, static_argnums=(0, 1, 7, 8))
def _reverse_all(model, cfg, params, model_state, x, classes, keys, block,
                 classes_per_block):
  norms, last, hit = _per_provider(
      _reverse_provider(model, cfg, x, classes, keys, classes_per_block),
      block, (params, model_state))
  return norms, last, hit, mad_anomaly_index(norms)


def neural_cleanse(model: Model, params, model_state, x_clean, key, *,
                   config: NeuralCleanseConfig = NeuralCleanseConfig(),
                   classes=None, class_block: int = 0) -> Inspection:
  """Trigger reverse-engineering (Neural Cleanse style) for every provider.

  For each provider and each class c, Adam minimises

      CE(f((1 - m) * x + m * p), c) + l1_weight * |m|_1

  over the clean inputs x (all of `x_clean`, one full batch per step), with
  mask m = sigmoid(a) [H, W, 1] and pattern p = sigmoid(b) [H, W, C] (the
  paper's tanh / 2 + 1/2 parametrisation), from a random start shared by all
  providers (so they are compared under the same randomness). A backdoor's
  target needs a much smaller mask than the other classes. The score is the
  MAD anomaly index of the smallest norm among the classes,
  |min - median| / (1.4826 * MAD); flagged above `config.threshold` (2).
  Classes are vmapped and providers vmapped in blocks: one compiled program
  per model shape.

  Args:
    model: the image model (all providers share its architecture).
    params, model_state: the population (leading provider axis n).
    x_clean: float [N, H, W, C] clean inputs (no labels needed).
    key: PRNG key of the random starts.
    config: a `NeuralCleanseConfig`.
    classes: the class ids to reverse (default all; >= 3 for a MAD).
    class_block: classes reversed side by side per provider (0: automatic,
      see `class_block`); changes only the speed and the rounding.

  Returns:
    `Inspection` with details "norms" [n, C] (kept mask L1 norm per class),
    "last_norms" [n, C], "success" [n, C] (share of x_clean the last mask
    sends to the class) and "classes" [C].
  """
  n = _check_model(model, params)
  config.validate()
  x = _check_images(x_clean, model, "x_clean")
  classes = _check_classes(classes, model.num_classes)
  keys = jax.random.split(key, classes.shape[0])
  if class_block:
    _positive(class_block, "class_block", integer=True)
    class_block = int(class_block)
  per_provider = _reverse_provider(model, config, x, classes, keys,
                                   class_block)
  block = provider_block(per_provider, (params, model_state))
  norms, last, hit, index = _reverse_all(model, config, params, model_state,
                                         x, classes, keys, block, class_block)
  scores = np.asarray(index, np.float64)
  assert scores.shape == (n,)
  return Inspection("neural_cleanse", scores, scores > config.threshold,
                    float(config.threshold),
                    {"norms": np.asarray(norms), "last_norms": np.asarray(last),
                     "success": np.asarray(hit), "classes": np.asarray(classes)})


# ----------------------------------------------------------------------------
# MM-BD: maximum margin.


@dataclasses.dataclass(frozen=True)
class MaxMarginConfig:
  """Settings of `max_margin`.

  Attributes:
    starts: random starting inputs per class (uniform in the box).
    steps: projected gradient-ascent steps (Adam, then clipping to the box).
    learning_rate: Adam learning rate on the input.
    low, high: the input box (images in [0, 1]).
    alpha: flag when the p-value is below alpha (the paper's 0.05); the
      score is -log10(p), so the threshold is -log10(alpha).
  """
  starts: int = 8
  steps: int = 200
  learning_rate: float = 0.05
  low: float = 0.0
  high: float = 1.0
  alpha: float = 0.05

  def validate(self) -> "MaxMarginConfig":
    _positive(self.starts, "starts", integer=True)
    _positive(self.steps, "steps", integer=True)
    _positive(self.learning_rate, "learning_rate")
    require(math.isfinite(self.low) and math.isfinite(self.high)
            and self.low < self.high, "high",
            f"the box needs finite low < high, got [{self.low}, {self.high}]")
    require(0 < self.alpha < 1, "alpha",
            f"must be in (0, 1), got {self.alpha!r}")
    return self


def _margin(logits, c):
  others = jnp.where(jnp.arange(logits.shape[-1]) == c, -jnp.inf, logits)
  return logits[..., c] - jnp.max(others, axis=-1)


def _max_margin_one(model: Model, cfg: MaxMarginConfig, params, model_state,
                    c, key):
  """Largest margin logit_c - max_{k != c} logit_k found for ONE model."""
  x = jax.random.uniform(key, (cfg.starts, *model.input_shape),
                         minval=cfg.low, maxval=cfg.high)
  tx = optax.adam(cfg.learning_rate)

  def margins(x):
    logits, _ = model.predict(params, model_state, x)
    return _margin(logits, c)

  def step(carry, _):
    x, opt_state, best = carry
    def loss(x):
      m = margins(x)
      return -jnp.sum(m), m

    (_, m), grads = jax.value_and_grad(loss, has_aux=True)(x)
    best = jnp.maximum(best, jnp.max(m))
    updates, opt_state = tx.update(grads, opt_state)
    x = jnp.clip(optax.apply_updates(x, updates), cfg.low, cfg.high)
    return (x, opt_state, best), None

  (x, _, best), _ = jax.lax.scan(step, (x, tx.init(x), -jnp.inf), None,
                                 length=cfg.steps)
  return jnp.maximum(best, jnp.max(margins(x)))


def _margin_provider(model, cfg, classes, keys):
  """Every class of one provider: (params, model_state) -> margins [C]."""
  per_class = jax.vmap(_max_margin_one, in_axes=(None, None, None, None, 0, 0))
  return lambda p, s: per_class(model, cfg, p, s, classes, keys)


@functools.partial(jax.jit, static_argnums=(0, 1, 6))
def _max_margins(model, cfg, params, model_state, classes, keys, block):
  return _per_provider(_margin_provider(model, cfg, classes, keys), block,
                       (params, model_state))


def max_margin_pvalue(margins) -> float:
  """MM-BD's p-value of the largest of K per-class statistics: a Gamma
  distribution (location 0, MLE) is fitted to the other K - 1 and the
  p-value is 1 - F(r_max)^(K - 1), the chance that the largest of K - 1 null
  draws is at least r_max. Statistics are shifted to be positive first
  (by 1e-6 - min, when some are <= 0)."""
  r = np.sort(np.asarray(margins, np.float64))
  require(r.ndim == 1 and r.size >= 3 and np.all(np.isfinite(r)), "margins",
          f"need >= 3 finite per-class statistics, got {margins!r}")
  if r[0] <= 0:
    r = r - r[0] + 1e-6
  null, top = r[:-1], r[-1]
  if np.ptp(null) <= 1e-12 * max(1.0, abs(null[0])):
    return 0.0 if top > null[-1] else 1.0
  shape, loc, scale = stats.gamma.fit(null, floc=0.0)
  cdf = stats.gamma.cdf(top, shape, loc=loc, scale=scale)
  return float(-np.expm1((null.size) * np.log(max(cdf, 1e-300))))


def max_margin(model: Model, params, model_state, key, *,
               config: MaxMarginConfig = MaxMarginConfig(),
               classes=None) -> Inspection:
  """Data-free maximum-margin detection (MM-BD style) for every provider.

  For each provider and class c, projected gradient ascent (Adam steps, then
  clipping to the box [low, high]) maximises logit_c(x) - max_{k != c}
  logit_k(x) from `config.starts` uniform random starts (shared by all
  providers); the statistic of c is the largest margin seen. A backdoor
  target's margin is abnormally large (the trigger is a shortcut). Per
  provider, `max_margin_pvalue` turns the K statistics into the p-value of
  the largest; the score is -log10(p), flagged when p < config.alpha (0.05,
  the paper's level). No data is used.

  Returns:
    `Inspection` with details "margins" [n, C], "pvalues" [n], "top_class"
    [n] (the class with the largest margin) and "classes" [C].
  """
  n = _check_model(model, params)
  config.validate()
  classes = _check_classes(classes, model.num_classes)
  keys = jax.random.split(key, classes.shape[0])
  block = provider_block(_margin_provider(model, config, classes, keys),
                         (params, model_state))
  margins = np.asarray(_max_margins(model, config, params, model_state,
                                    classes, keys, block), np.float64)
  require(np.all(np.isfinite(margins)), "params",
          "a provider's model gives non-finite margins")
  pvalues = np.array([max_margin_pvalue(m) for m in margins])
  scores = -np.log10(np.maximum(pvalues, 1e-300))
  threshold = -math.log10(config.alpha)
  assert scores.shape == (n,)
  return Inspection("max_margin", scores, scores > threshold, threshold,
                    {"margins": margins, "pvalues": pvalues,
                     "top_class": np.asarray(classes)[np.argmax(margins, 1)],
                     "classes": np.asarray(classes)})


# ----------------------------------------------------------------------------
# STRIP: entropy of superimposed inputs.


@dataclasses.dataclass(frozen=True)
class StripConfig:
  """Settings of `strip` and `strip_separation`.

  Attributes:
    overlays: clean images superimposed on each input (the paper's N).
    weight: blend weight of the overlay: x' = (1 - weight) x + weight o.
    frr: false rejection rate of clean inputs at which each provider's
      detection boundary is set (the paper's 1 %), from a normal fit to the
      clean entropies as in the paper.
    threshold: flag a provider whose confidence under superimposition
      (see `strip`) exceeds it.
  """
  overlays: int = 16
  weight: float = 0.5
  frr: float = 0.01
  threshold: float = 0.9

  def validate(self) -> "StripConfig":
    _positive(self.overlays, "overlays", integer=True)
    require(0 < self.weight < 1, "weight",
            f"must be in (0, 1), got {self.weight!r}")
    require(0 < self.frr < 0.5, "frr", f"must be in (0, 0.5), got {self.frr!r}")
    _positive(self.threshold, "threshold")
    return self


def _strip_provider(model, cfg, overlay):
  """One provider: (params, model_state, x [B, ...]) -> mean entropy [B]
  of each input blended with `overlay` [B, overlays, ...]."""
  def one(p, s, x):
    blended = (1.0 - cfg.weight) * x[:, None] + cfg.weight * overlay
    flat = blended.reshape(-1, *x.shape[1:])
    logits, _ = model.predict(p, s, flat)
    logp = jax.nn.log_softmax(logits)
    ent = -jnp.sum(jnp.exp(logp) * logp, -1)
    return ent.reshape(x.shape[0], cfg.overlays).mean(-1)
  return one


@functools.partial(jax.jit, static_argnums=(0, 1, 7))
def _strip_entropies(model, cfg, params, model_state, x, x_overlay, picks,
                     block):
  """[n, B] mean prediction entropy of each input in x [n, B, ...]
  blended with x_overlay[picks] ([B, overlays] indices, shared)."""
  return _per_provider(_strip_provider(model, cfg, x_overlay[picks]), block,
                       (params, model_state, x))


def strip_entropies(model: Model, params, model_state, x, x_overlay, key, *,
                    config: StripConfig = StripConfig(),
                    name: str = "x") -> np.ndarray:
  """STRIP entropy of inputs under every provider's model: float [n, B].

  Each input is superimposed with `config.overlays` clean images drawn
  (from `key`, the same draws for every provider) from x_overlay, and the
  entropy of the model's softmax is averaged over them. x is [B, H, W, C]
  (the same inputs for every provider) or [n, B, H, W, C] (each provider its
  own, e.g. its own triggered inputs). Errors name `x` as `name`.
  """
  n = _check_model(model, params)
  config.validate()
  shape = tuple(model.input_shape)
  x = np.asarray(x)
  per_provider = x.ndim == 2 + len(shape)
  require(not per_provider or x.shape[0] == n, name,
          f"per-provider inputs need a leading axis of {n}, got {x.shape}")
  x = _check_images(x.reshape(-1, *x.shape[-len(shape):]) if per_provider
                    else x, model, name)
  x = x.reshape(n, -1, *shape) if per_provider else jnp.broadcast_to(
      x, (n, *x.shape))
  x_overlay = _check_images(x_overlay, model, "x_overlay", 2)
  picks = jax.random.randint(key, (x.shape[1], config.overlays), 0,
                             x_overlay.shape[0])
  block = provider_block(_strip_provider(model, config, x_overlay[picks]),
                         (params, model_state, x))
  return np.asarray(_strip_entropies(model, config, params, model_state, x,
                                     x_overlay, picks, block), np.float64)


def strip_boundary(entropies, frr: float) -> np.ndarray:
  """The STRIP detection boundary of each row of clean entropies [n, B]:
  the frr-quantile of a normal fitted to them (mean + z_frr * std), as the
  paper sets it; an input whose entropy is below it is rejected."""
  e = np.asarray(entropies, np.float64)
  return e.mean(-1) + stats.norm.ppf(frr) * e.std(-1, ddof=1)


def strip(model: Model, params, model_state, x_clean, x_overlay, key, *,
          config: StripConfig = StripConfig()) -> Inspection:
  """The STRIP input filter of every provider, from clean data only.

  STRIP judges *inputs*, not models: a triggered input keeps the target
  class when superimposed with other images, so its prediction entropy is
  low. What a client can compute without any trigger is each provider's
  filter: the entropy distribution of held-out clean inputs `x_clean`
  (superimposed with images of `x_overlay`) and the boundary at the chosen
  false rejection rate (`strip_boundary`).

  The model-level score is the provider's confidence under superimposition,
  1 - mean clean entropy / log(C), a statistic of ONE model (comparing
  providers' statistics with each other would be replication, the thing
  inspection is the alternative to). A patch backdoor does not show in clean
  inputs, so this score is not expected to separate backdoored from clean
  models; flagged above `config.threshold` (default 0.9, set above the
  benign models of a calibration setting, digits MLP seed 1, which score
  0.79; see BUILD_NOTES "Model inspection detectors"). `strip_separation`
  measures what STRIP is for, given the triggered inputs.

  Returns:
    `Inspection` with details "entropies" [n, B] (clean), "boundary" [n]
    and "mean_entropy" [n].
  """
  entropies = strip_entropies(model, params, model_state, x_clean, x_overlay,
                              key, config=config, name="x_clean")
  mean = entropies.mean(-1)
  scores = 1.0 - mean / math.log(model.num_classes)
  return Inspection("strip", scores, scores > config.threshold,
                    float(config.threshold),
                    {"entropies": entropies, "mean_entropy": mean,
                     "boundary": strip_boundary(entropies, config.frr)})


def strip_separation(model: Model, params, model_state, x_clean, x_triggered,
                     x_overlay, key, *, config: StripConfig = StripConfig()
                     ) -> dict[str, np.ndarray]:
  """How well each provider's STRIP filter separates triggered from clean
  test inputs (for the report only: it needs the triggers).

  Args:
    x_clean: [B, H, W, C] clean test inputs (the same for every provider).
    x_triggered: [n, B', H, W, C] each provider's triggered test inputs.
    x_overlay: held-out clean images to superimpose (not in x_clean).

  Returns:
    "auroc" [n]: probability that a triggered input has a lower entropy than
    a clean one (ties one half); "tpr" [n]: share of triggered inputs
    rejected at the boundary set on x_clean at `config.frr`; "frr" [n]: the
    share of x_clean rejected at that boundary.
  """
  clean = strip_entropies(model, params, model_state, x_clean, x_overlay,
                          key, config=config, name="x_clean")
  n = clean.shape[0]
  x_triggered = np.asarray(x_triggered)
  require(x_triggered.ndim == 2 + len(model.input_shape)
          and x_triggered.shape[0] == n, "x_triggered",
          f"must be [n={n}, B, {', '.join(map(str, model.input_shape))}] "
          f"(each provider's triggered inputs), got {x_triggered.shape}")
  trig = strip_entropies(model, params, model_state, x_triggered, x_overlay,
                         jax.random.fold_in(key, 1), config=config,
                         name="x_triggered")
  boundary = strip_boundary(clean, config.frr)
  # AUROC by ranks: triggered inputs should have the LOWER entropy.
  ranks = stats.rankdata(np.concatenate([-trig, -clean], 1), axis=1)
  b, bc = trig.shape[1], clean.shape[1]
  auc = (ranks[:, :b].sum(1) - b * (b + 1) / 2) / (b * bc)
  return {"auroc": auc, "tpr": (trig < boundary[:, None]).mean(1),
          "frr": (clean < boundary[:, None]).mean(1), "boundary": boundary}


# ----------------------------------------------------------------------------
# The client's compute.


def flops_per_provider(detector: str, model: Model, params, model_state, *,
                       x_clean=None, x_overlay=None, config=None,
                       classes=None) -> int:
  """FLOPs `detector` spends on ONE provider's model, as it runs on the
  population (params, model_state with leading provider axis; arrays or
  `jax.ShapeDtypeStruct`s), in the `jaxrep.core.flops` convention (loops
  counted by their trip counts). Counted by tracing the same per-provider
  program the detector compiles; nothing runs. Shapes are all that matter:
  x_clean (neural_cleanse, strip) and x_overlay (strip) may be arrays or
  structs of the inputs the detector would be given."""
  require(detector in ("neural_cleanse", "max_margin", "strip"), "detector",
          f"must be neural_cleanse, max_margin or strip, got {detector!r}")
  n = _check_model(model, params)
  key = jax.random.key(0)   # FLOPs do not depend on the random starts
  classes = _check_classes(classes, model.num_classes)
  keys = jax.random.split(key, classes.shape[0])
  if detector == "neural_cleanse":
    config = (config or NeuralCleanseConfig()).validate()
    require(x_clean is not None, "x_clean", "neural_cleanse needs x_clean")
    x = jnp.zeros(x_clean.shape, jnp.float32)
    fn = _reverse_provider(model, config, x, classes, keys)
    args = (params, model_state)
  elif detector == "max_margin":
    config = (config or MaxMarginConfig()).validate()
    fn = _margin_provider(model, config, classes, keys)
    args = (params, model_state)
  else:
    config = (config or StripConfig()).validate()
    require(x_clean is not None and x_overlay is not None, "x_clean",
            "strip needs x_clean and x_overlay")
    overlay = jnp.zeros((x_clean.shape[0], config.overlays,
                         *x_overlay.shape[1:]), jnp.float32)
    fn = _strip_provider(model, config, overlay)
    args = (params, model_state,
            jax.ShapeDtypeStruct((n, *x_clean.shape), jnp.float32))
  return flops_lib.count_flops(fn, *memory_lib.one_provider(args))
