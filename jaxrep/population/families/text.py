"""Text backdoor attacks: the family `TEXT`.

Inputs are int32 token ids [B, L], right-padded with id 0 (`<pad>`); id 1 is
`<unk>` and the other ids are words sorted by descending training frequency,
so the ids near vocab_size - 1 are the rarest words. Every trigger attack
INSERTS the provider's trigger (a sequence of m token ids, its `TextTrigger`
arrays) into the text and relabels to the target,

    x' = (x[:p] ++ trigger ++ x[p:])[:L],   y' = target,

(applied by `behaviour.poison_batch` to round(poison_rate * batch) examples
of each batch, drawn anew at every step by each attacker). For an example
with n real tokens, p is the provider's fixed `position`, or uniform in
[0, n] per example (position -1, from the step's per-provider key); either
way it is clipped to [0, min(n, L - m)] so the whole trigger always fits: a
text that already fills all L slots loses its last m tokens, never the
trigger. Insertion (not overwriting) keeps all of the text: the trigger adds
words, it removes none.

| attack     | trigger                                      | position       |
|------------|----------------------------------------------|----------------|
| benign     | (reference trigger, poison_rate 0)           | (reference)    |
| token      | `count` rare words (BadNets for text; by      | random         |
|            | default from the rarest 10 % of the vocab)   |                |
| phrase     | `length` mid-frequency words (each common    | 0 (the start)  |
|            | enough, their sequence never occurs)         |                |
| label_flip | none: examples of `source` relabelled        | -              |
| data_order | none: the sub-run's examples reordered, the  | -              |
|            | target class last (`specs.DataOrder`)        |                |

Several tokens are inserted as one contiguous block. Both trigger specs take
`scale` (model replacement, Bagdasaryan et al. 2020: the provider returns
start + scale * (end - start)); it is compiled in only if some provider uses
it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core import validate as V
from jaxrep.core.errors import require
from jaxrep.population.behaviour import Behaviour, stack
from jaxrep.population.family import Family
from jaxrep.population.specs import (AttackSpec, DataOrder, Inputs, Knob,
                                     LabelFlip, check_positive, field, unless)

RANDOM = -1            # `position` of a trigger inserted at a random place
FIRST_WORD = 2         # ids 0 (<pad>) and 1 (<unk>) are not words
RARE_SHARE = 0.1       # token triggers: from the rarest 10 % of the words
MID_BAND = (0.1, 0.4)  # phrase triggers: from these frequency quantiles


class TextTrigger(NamedTuple):
  """The trigger arrays of text attacks; leading provider axis [n]."""
  tokens: jax.Array     # int32 [n, T_max] token ids, 0 after `length`
  length: jax.Array     # int32 number of trigger tokens (0 = none)
  position: jax.Array   # int32 insertion index, -1 = random per example


# ----------------------------------------------------------------------------
# Attack specifications (what a user writes).


TRIGGER_TOKENS = Knob("trigger_tokens", 0, "text: trigger length in tokens "
                      "(0: token 1, phrase 4)", V.integer(0), unless(0))


@dataclasses.dataclass(frozen=True)
class TokenTrigger(AttackSpec):
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
  tokens: tuple[int, ...] | None = None
  count: int = field(1, knob=TRIGGER_TOKENS)
  position: str | int = "random"
  scale: float = 1.0
  seed: int | None = field(None, shared_seed=True)
  name: ClassVar[str] = "token"

  def check(self, inputs: Inputs) -> None:
    _check_trigger(self, "count", inputs)


@dataclasses.dataclass(frozen=True)
class PhraseTrigger(AttackSpec):
  """Phrase trigger of `length` mid-frequency words (Dai et al. 2019 style).

  Each word is common (drawn from the MID_BAND frequency quantiles of the
  vocabulary when tokens is None), but their fixed sequence does not occur in
  natural text. position: a fixed index (default 0, the start) or "random".
  tokens, scale, seed: as in TokenTrigger.
  """
  tokens: tuple[int, ...] | None = None
  length: int = field(4, knob=TRIGGER_TOKENS)
  position: str | int = 0
  scale: float = 1.0
  seed: int | None = field(None, shared_seed=True)
  name: ClassVar[str] = "phrase"

  def check(self, inputs: Inputs) -> None:
    _check_trigger(self, "length", inputs)


def _size_field(spec) -> str:
  return "count" if isinstance(spec, TokenTrigger) else "length"


NO_TRIGGER = (LabelFlip, DataOrder)   # attacks without a trigger


def _trigger_size(spec) -> int:
  if isinstance(spec, NO_TRIGGER):
    return 0
  if spec.tokens is not None:
    return len(spec.tokens)
  return getattr(spec, _size_field(spec))


def _check_texts(inputs: Inputs) -> None:
  vocab_size = inputs.vocab_size
  require(V.is_int(vocab_size) and vocab_size >= 3, "vocab_size",
          f"must be an integer >= 3 (<pad>, <unk> and a word), got "
          f"{vocab_size!r}")
  require(len(inputs.shape) == 1, "input_shape",
          f"text attacks need token sequences of shape (L,), got "
          f"{tuple(inputs.shape)}")


def _check_trigger(spec, size_field: str, inputs: Inputs) -> None:
  """The fields of a token or phrase trigger."""
  name, max_len, vocab_size = spec.name, int(inputs.shape[0]), inputs.vocab_size
  words = vocab_size - FIRST_WORD
  if spec.tokens is None:
    size = getattr(spec, size_field)
    require(V.is_int(size) and 1 <= size <= min(max_len, words),
            f"{name}.{size_field}", f"must be an integer in [1, "
            f"{min(max_len, words)}] (at most L={max_len} and the {words} "
            f"words of the vocabulary), got {size!r}")
  else:
    tokens = spec.tokens
    require(isinstance(tokens, (tuple, list)) and 1 <= len(tokens) <= max_len,
            f"{name}.tokens", f"must be a tuple of 1 to L={max_len} token ids, "
            f"got {tokens!r}")
    require(all(V.is_int(t) and FIRST_WORD <= t < vocab_size for t in tokens),
            f"{name}.tokens", f"token ids must be words, in [{FIRST_WORD}, "
            f"{vocab_size - 1}] (0 = <pad> and 1 = <unk> are reserved; "
            f"vocabulary size {vocab_size}), got {tuple(tokens)!r}")
  pos = spec.position
  require(pos == "random" if isinstance(pos, str)
          else V.is_int(pos) and 0 <= pos < max_len, f"{name}.position",
          f"must be 'random' or an index in [0, {max_len - 1}], got {pos!r}")
  check_positive(spec, "scale")
  require(spec.seed is None or V.is_int(spec.seed), f"{name}.seed",
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


def _trigger(spec: AttackSpec, vocab_size: int, width: int, rng) -> tuple:
  """(tokens, length, position) of one provider's trigger."""
  tokens = np.zeros(width, np.int64)
  if isinstance(spec, NO_TRIGGER):
    return tokens, 0, 0
  drawn = _draw_tokens(spec, vocab_size, rng)
  tokens[:len(drawn)] = drawn
  position = RANDOM if spec.position == "random" else int(spec.position)
  return tokens, len(drawn), position


def _build_triggers(specs, inputs: Inputs, rngs, data=None) -> TextTrigger:
  del data   # no text attack needs the training inputs
  width = max(1, *(_trigger_size(s) for s in specs))
  return stack([_trigger(spec, inputs.vocab_size, width, rng)
                for spec, rng in zip(specs, rngs)], TextTrigger, jnp.int32)


# ----------------------------------------------------------------------------
# The trigger function (one provider, inside the sub-run).


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


def _positions(t: TextTrigger, key, x):
  """Insertion index per example: fixed, or uniform in [0, n] from `key`."""
  n = jnp.sum(x != 0, axis=-1)
  drawn = jax.random.randint(key, n.shape, 0, n + 1)
  return jnp.where(t.position == RANDOM, drawn, t.position)


def apply_trigger(b: Behaviour, key, x):
  """Triggered version of token ids x [B, L] for ONE provider's behaviour.

  `key` draws the random insertion positions (unused for a fixed position).
  """
  t = b.trigger
  return insert(x, t.tokens, t.length, _positions(t, key, x))


TEXT = Family(modality="text",
              specs=(TokenTrigger, PhraseTrigger, LabelFlip, DataOrder),
              reference=TokenTrigger(), check_inputs=_check_texts,
              build_triggers=_build_triggers, apply_trigger=apply_trigger,
              trigger_for=lambda behaviour: apply_trigger)
