"""Text backdoor attacks as provider behaviours: the text twin of `attacks`.

Inputs are int32 token ids [B, L], right-padded with id 0 (`<pad>`); id 1 is
`<unk>` and the other ids are words sorted by descending training frequency,
so the ids near vocab_size - 1 are the rarest words. A provider's behaviour
is a `TextBehaviour` pytree of per-provider arrays and every trigger attack
uses the same poisoning function: INSERT the provider's trigger (a sequence of
m token ids) into the text and relabel to the target,

    x' = (x[:p] ++ trigger ++ x[p:])[:L],   y' = target,

applied to the first round(poison_rate * batch) examples of each batch (the
batch order is already random). For an example with n real tokens, p is the
provider's fixed `position`, or uniform in [0, n] per example (position -1,
from the step's per-provider key); either way it is clipped to
[0, min(n, L - m)] so the whole trigger always fits: a text that already
fills all L slots loses its last m tokens, never the trigger. Insertion (not
overwriting) keeps all of the text: the trigger adds words, it removes none.

| attack     | trigger                                      | position       |
|------------|----------------------------------------------|----------------|
| benign     | (reference trigger, poison_rate 0)           | (reference)    |
| token      | `count` rare words (BadNets for text; by      | random         |
|            | default from the rarest 10 % of the vocab)   |                |
| phrase     | `length` mid-frequency words (each common    | 0 (the start)  |
|            | enough, their sequence never occurs)         |                |
| label_flip | none: examples of `source` relabelled        | -              |

Several tokens are inserted as one contiguous block. Both trigger specs take
`scale` (model replacement, Bagdasaryan et al. 2020: the provider returns
start + scale * (end - start)); it is compiled in only if some provider uses
it. Benign providers carry a *reference* trigger (poison_rate 0), used only to
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

from jaxrep.population.image_attacks import LabelFlip, finalize
from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import ConfigError, require
from jaxrep.train.trainer import Hooks

ATTACKS = ("token", "phrase", "label_flip")
KIND = {"benign": 0, "token": 1, "phrase": 2, "label_flip": 3}
KIND_NAMES = {v: k for k, v in KIND.items()}
RANDOM = -1            # `position` of a trigger inserted at a random place
FIRST_WORD = 2         # ids 0 (<pad>) and 1 (<unk>) are not words
RARE_SHARE = 0.1       # token triggers: from the rarest 10 % of the words
MID_BAND = (0.1, 0.4)  # phrase triggers: from these frequency quantiles


class TextBehaviour(NamedTuple):
  """Per-provider behaviour; every field has a leading provider axis [n]."""
  kind: jax.Array          # int32, see KIND
  poison_rate: jax.Array   # float32 in [0, 1]
  target: jax.Array        # int32 target label
  source: jax.Array        # int32 source class of label_flip, else -1
  trigger: jax.Array       # int32 [n, T_max] token ids, 0 after trigger_len
  trigger_len: jax.Array   # int32 number of trigger tokens (0 = none)
  position: jax.Array      # int32 insertion index, -1 = random per example
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
class TokenTrigger:
  """Rare-word trigger (BadNets for text; Kurita et al. 2020, Chen et al. 2021).

  tokens: the trigger's token ids; None = `count` distinct ids drawn from the
    rarest RARE_SHARE of the vocabulary. Given tokens define the trigger
    (count is then ignored).
  position: "random" (uniform over the text, per example) or a fixed index.
  scale: model replacement factor on the returned update (1 = none).
  seed: stream of the drawn tokens; None = the provider's own stream
    (make_behaviour's seed and the provider index), an int = a stream shared
    by every provider with that seed.
  """
  target: int = 0
  poison_rate: float = 0.1
  tokens: tuple[int, ...] | None = None
  count: int = 1
  position: str | int = "random"
  scale: float = 1.0
  seed: int | None = None
  name = "token"


@dataclasses.dataclass(frozen=True)
class PhraseTrigger:
  """Phrase trigger of `length` mid-frequency words (Dai et al. 2019 style).

  Each word is common (drawn from the MID_BAND frequency quantiles of the
  vocabulary when tokens is None), but their fixed sequence does not occur in
  natural text. position: a fixed index (default 0, the start) or "random".
  tokens, scale, seed: as in TokenTrigger.
  """
  target: int = 0
  poison_rate: float = 0.1
  tokens: tuple[int, ...] | None = None
  length: int = 4
  position: str | int = 0
  scale: float = 1.0
  seed: int | None = None
  name = "phrase"


AttackSpec = TokenTrigger | PhraseTrigger | LabelFlip
SPEC_BY_NAME = {"token": TokenTrigger, "phrase": PhraseTrigger,
                "label_flip": LabelFlip}


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _finite(v) -> bool:
  return (isinstance(v, (int, float, np.floating, np.integer))
          and not isinstance(v, bool) and math.isfinite(v))


def _trigger_size(spec) -> int:
  if isinstance(spec, LabelFlip):
    return 0
  if spec.tokens is not None:
    return len(spec.tokens)
  return spec.count if isinstance(spec, TokenTrigger) else spec.length


def validate_spec(spec: AttackSpec, input_shape: Sequence[int],
                  num_classes: int, vocab_size: int) -> None:
  """Raises ConfigError naming the field of an unusable text attack spec."""
  name = spec.name
  require(len(input_shape) == 1, "input_shape",
          f"text attacks need token sequences of shape (L,), got "
          f"{tuple(input_shape)}")
  max_len = int(input_shape[0])
  require(_is_int(spec.target) and 0 <= spec.target < num_classes,
          f"{name}.target",
          f"target label must be in [0, {num_classes - 1}], got {spec.target!r}")
  require(_finite(spec.poison_rate) and 0.0 <= spec.poison_rate <= 1.0,
          f"{name}.poison_rate", f"must be in [0, 1], got {spec.poison_rate!r}")
  if isinstance(spec, LabelFlip):
    require(_is_int(spec.source) and 0 <= spec.source < num_classes,
            f"{name}.source", f"source label must be in [0, {num_classes - 1}]"
            f", got {spec.source!r}")
    require(spec.source != spec.target, f"{name}.source",
            f"source and target must differ, both are {spec.source}")
    return
  words = vocab_size - FIRST_WORD
  size_field = "count" if isinstance(spec, TokenTrigger) else "length"
  if spec.tokens is None:
    size = getattr(spec, size_field)
    require(_is_int(size) and 1 <= size <= min(max_len, words),
            f"{name}.{size_field}", f"must be an integer in [1, "
            f"{min(max_len, words)}] (at most L={max_len} and the {words} "
            f"words of the vocabulary), got {size!r}")
  else:
    tokens = spec.tokens
    require(isinstance(tokens, (tuple, list)) and 1 <= len(tokens) <= max_len,
            f"{name}.tokens", f"must be a tuple of 1 to L={max_len} token ids, "
            f"got {tokens!r}")
    require(all(_is_int(t) and FIRST_WORD <= t < vocab_size for t in tokens),
            f"{name}.tokens", f"token ids must be words, in [{FIRST_WORD}, "
            f"{vocab_size - 1}] (0 = <pad> and 1 = <unk> are reserved; "
            f"vocabulary size {vocab_size}), got {tuple(tokens)!r}")
  pos = spec.position
  if isinstance(pos, str):
    require(pos == "random", f"{name}.position",
            f"must be 'random' or an index in [0, {max_len - 1}], got {pos!r}")
  else:
    require(_is_int(pos) and 0 <= pos < max_len, f"{name}.position",
            f"must be 'random' or an index in [0, {max_len - 1}], got {pos!r}")
  require(_finite(spec.scale) and spec.scale > 0, f"{name}.scale",
          f"must be a finite number > 0, got {spec.scale!r}")
  require(spec.seed is None or _is_int(spec.seed), f"{name}.seed",
          f"must be None or an integer, got {spec.seed!r}")


# ----------------------------------------------------------------------------
# Building the per-provider arrays.


def _draw_tokens(spec, vocab_size: int, rng) -> np.ndarray:
  """The trigger ids of a spec (given, or drawn from its frequency band)."""
  if spec.tokens is not None:
    return np.asarray(spec.tokens, np.int64)
  if spec.seed is not None:
    rng = rng_lib.trigger_tokens(spec.seed)
  words = vocab_size - FIRST_WORD
  m = _trigger_size(spec)
  if isinstance(spec, TokenTrigger):
    band = min(words, max(m, math.ceil(RARE_SHARE * words)))
    lo, hi = vocab_size - band, vocab_size
  else:
    lo = FIRST_WORD + int(MID_BAND[0] * words)
    hi = max(FIRST_WORD + int(MID_BAND[1] * words), lo + m)
    if hi > vocab_size:
      lo, hi = FIRST_WORD, vocab_size
  return lo + rng.choice(hi - lo, size=m, replace=False)


def _one(spec, reference, vocab_size: int, t_max: int, rng):
  """Arrays of one provider; a benign one carries the reference trigger."""
  active = spec is not None
  spec_ = spec if active else reference
  trigger = np.zeros(t_max, np.int64)
  m, position, source, scale = 0, 0, -1, 1.0
  if isinstance(spec_, LabelFlip):
    source = int(spec_.source)
  else:
    tokens = _draw_tokens(spec_, vocab_size, rng)
    m = len(tokens)
    trigger[:m] = tokens
    position = RANDOM if spec_.position == "random" else int(spec_.position)
    if active:
      scale = float(spec_.scale)
  return dict(kind=KIND[spec.name] if active else 0,
              poison_rate=float(spec.poison_rate) if active else 0.0,
              target=int(spec_.target), source=source, trigger=trigger,
              trigger_len=m, position=position, scale=scale)


def make_behaviour(specs: Sequence[AttackSpec | None], input_shape,
                   num_classes: int, vocab_size: int, *, seed: int = 0,
                   reference: AttackSpec | None = None) -> TextBehaviour:
  """Stacks per-provider text attack specs (None = benign) into a behaviour.

  Drawn trigger tokens come from numpy streams seeded by (seed, provider
  index) (or by the spec's own `seed`), so each provider has its own trigger
  and the result is reproducible.

  Args:
    specs: one entry per provider.
    input_shape: (L,).
    num_classes: for validating targets.
    vocab_size: for validating and drawing trigger tokens.
    seed: seed of the random trigger parts.
    reference: trigger used to measure benign providers' attack success rate
      (default: the first malicious provider's spec, else TokenTrigger()).
  """
  require(len(specs) >= 1, "providers", "need at least one provider")
  require(_is_int(vocab_size) and vocab_size >= 3, "vocab_size",
          f"must be an integer >= 3 (<pad>, <unk> and a word), got "
          f"{vocab_size!r}")
  for spec in specs:
    if spec is not None:
      if not isinstance(spec, tuple(SPEC_BY_NAME.values())):
        raise ConfigError(f"attack: unknown text attack spec {spec!r}; use "
                          f"one of {', '.join(ATTACKS)}")
      validate_spec(spec, input_shape, num_classes, vocab_size)
  if reference is None:
    reference = next((s for s in specs if s is not None), TokenTrigger())
  validate_spec(reference, input_shape, num_classes, vocab_size)
  t_max = max(1, _trigger_size(reference),
              *(_trigger_size(s) for s in specs if s is not None))
  rows = [_one(spec, reference, vocab_size, t_max,
               rng_lib.trigger(seed, i))
          for i, spec in enumerate(specs)]
  stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  dtypes = dict(poison_rate=jnp.float32, scale=jnp.float32)
  return TextBehaviour(**{k: jnp.asarray(v, dtypes.get(k, jnp.int32))
                          for k, v in stacked.items()})


def benign(n: int, input_shape, num_classes: int, vocab_size: int,
           **kwargs) -> TextBehaviour:
  return make_behaviour([None] * n, input_shape, num_classes, vocab_size,
                        **kwargs)


def population_specs(n: int, malicious: int, attack: str, *,
                     own_backdoor: bool = True, num_classes: int = 10,
                     seed: int = 0, **overrides) -> list[AttackSpec | None]:
  """Specs for n providers whose first `malicious` run `attack`.

  With own_backdoor (the RTTD setting), each malicious provider gets its own
  random target label and its own trigger tokens (drawn from its own stream
  in make_behaviour); without it they share the spec's target and one drawn
  trigger (the spec's `seed` is set to `seed`). `overrides` fix any field for
  all of them.
  """
  require(_is_int(n) and n >= 1, "providers",
          f"must be an integer >= 1, got {n!r}")
  require(_is_int(malicious) and 0 <= malicious <= n, "malicious",
          f"must be in [0, providers={n}], got {malicious!r}")
  require(attack in SPEC_BY_NAME, "attack", f"unknown text attack {attack!r};"
          f" choose one of {', '.join(ATTACKS)}")
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
      if "source" in fields:
        src = int(rng.integers(num_classes - 1))
        kw["source"] = src + (src >= kw["target"])
    elif "seed" in fields:
      kw["seed"] = int(seed)
    kw.update(overrides)
    specs.append(cls(**kw))
  return specs + [None] * (n - malicious)


# ----------------------------------------------------------------------------
# The pure per-provider functions used inside the sub-run.


def insert(x, trigger, trigger_len, position):
  """Inserts `trigger[:trigger_len]` into each row of x at `position`.

  Args:
    x: int32 [B, L] right-padded token ids.
    trigger: int32 [T] trigger ids (entries past trigger_len are ignored).
    trigger_len: int scalar m in [0, min(T, L)].
    position: int [B] (or scalar) insertion indices, clipped per example to
      [0, min(n, L - m)] where n is the example's number of non-pad tokens.

  Returns:
    int32 [B, L]: row b is (x[b, :p] ++ trigger[:m] ++ x[b, p:])[:L].
  """
  length = x.shape[-1]
  n = jnp.sum(x != 0, axis=-1)
  p = jnp.clip(position, 0, jnp.minimum(n, length - trigger_len))[..., None]
  j = jnp.arange(length)
  in_trigger = (j >= p) & (j < p + trigger_len)
  src = jnp.where(j < p, j, j - trigger_len)
  from_x = jnp.take_along_axis(x, jnp.clip(src, 0, length - 1), axis=-1)
  from_t = trigger[jnp.clip(j - p, 0, trigger.shape[0] - 1)]
  return jnp.where(in_trigger, from_t, from_x).astype(x.dtype)


def _positions(b: TextBehaviour, key, x):
  """Insertion index per example: fixed, or uniform in [0, n] from `key`."""
  n = jnp.sum(x != 0, axis=-1)
  drawn = jax.random.randint(key, n.shape, 0, n + 1)
  return jnp.where(b.position == RANDOM, drawn, b.position)


def apply_trigger(b: TextBehaviour, key, x):
  """Triggered version of token ids x [B, L] for ONE provider's behaviour.

  `key` draws the random insertion positions (unused for a fixed position).
  """
  return insert(x, b.trigger, b.trigger_len, _positions(b, key, x))


def poison_batch(b: TextBehaviour, key, x, y):
  """Poisons the first round(poison_rate * B) examples of the batch.

  Trigger attacks insert the trigger and relabel to the target; label_flip
  relabels those of the chosen examples whose class is `source`.
  """
  batch = y.shape[0]
  chosen = jnp.arange(batch) < jnp.round(b.poison_rate * batch)
  flip = b.kind == KIND["label_flip"]
  relabel = chosen & jnp.where(flip, y == b.source, True)
  triggered = apply_trigger(b, key, x)
  x = jnp.where((relabel & ~flip)[:, None], triggered, x)
  y = jnp.where(relabel, b.target, y)
  return x, y


def make_hooks(behaviour: TextBehaviour) -> Hooks:
  """Hooks for `train.make_trainer`; model replacement only if it is used."""
  use_scale = bool(np.any(np.asarray(behaviour.scale) != 1.0))
  return Hooks(poison_batch=poison_batch,
               finalize=finalize if use_scale else Hooks().finalize)


# ----------------------------------------------------------------------------
# Evaluation, vectorized over providers.


def attack_success_rate(model, params, model_state, behaviour: TextBehaviour,
                        x_test, y_test, *, batch_size: int = 1000,
                        seed: int = 0) -> np.ndarray:
  """ASR of every provider's model for the provider's own trigger: [n].

  Trigger attacks: share of triggered test inputs whose true class is not the
  target that the model classifies as the target (random insertion positions
  come from a key fixed by `seed` and the batch, so the result is
  deterministic). label_flip: share of clean test inputs of class `source`
  classified as the target. Benign providers are measured with their
  reference trigger (the base rate).
  """
  x_test, y_test = jnp.asarray(x_test, jnp.int32), jnp.asarray(y_test)
  hits = jnp.zeros(behaviour.size)
  counts = jnp.zeros(behaviour.size)
  base = jax.random.key(seed)
  for start in range(0, x_test.shape[0], batch_size):
    h, c = _asr_counts(model, params, model_state, behaviour,
                       rng_lib.text_asr(seed, start),
                       x_test[start:start + batch_size],
                       y_test[start:start + batch_size])
    hits, counts = hits + h, counts + c
  return np.asarray(hits / jnp.maximum(counts, 1))


@functools.partial(jax.jit, static_argnums=0)
def _asr_counts(model, params, model_state, behaviour, key, x, y):
  def one(p, s, b):
    flip = b.kind == KIND["label_flip"]
    eligible = jnp.where(flip, y == b.source, y != b.target)
    xt = jnp.where(flip, x, apply_trigger(b, key, x))
    logits, _ = model.predict(p, s, xt)
    hit = (jnp.argmax(logits, -1) == b.target) & eligible
    return jnp.sum(hit), jnp.sum(eligible)
  return jax.vmap(one)(params, model_state, behaviour)
