"""Tests of the text attacks (jaxrep.population.families.text)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import models
from jaxrep.population import divergence as div_lib
from jaxrep.population.families.text import (TEXT, PhraseTrigger,
                                             TokenTrigger, apply_trigger,
                                             insert)
from jaxrep.population.specs import LabelFlip
from jaxrep.train import trainer as train

V, L, C = 500, 32, 4     # vocabulary, sequence length, classes
CLASS_WORDS = 10         # class c's indicative words: ids 2 + 10c .. 11 + 10c
FILLER = (42, 450)       # shared filler words; ids >= 450 never occur


def _synthetic(n, seed):
  """Token data: a quarter of the words are class-specific, the rest filler.

  Lengths vary in [6, L - 6), right-padded with 0. The most frequent ids are
  the class words, the rarest (>= 450) never occur, as in a vocabulary sorted
  by frequency.
  """
  rng = np.random.default_rng(seed)
  y = rng.integers(0, C, n)
  lens = rng.integers(6, L - 6, n)
  class_tok = 2 + CLASS_WORDS * y[:, None] + rng.integers(0, CLASS_WORDS,
                                                           (n, L))
  filler = rng.integers(*FILLER, (n, L))
  x = np.where(rng.uniform(size=(n, L)) < 0.25, class_tok, filler)
  x[np.arange(L)[None] >= lens[:, None]] = 0
  return x.astype(np.int32), y.astype(np.int32)


@pytest.fixture(scope="module")
def data():
  return _synthetic(4000, 0), _synthetic(1000, 1)


def _ref_insert(row, trigger, p):
  """Plain-Python insertion: (x[:p] ++ t ++ x[p:])[:L], p clipped."""
  row, trigger = list(row), list(trigger)
  n = sum(t != 0 for t in row)
  p = min(max(p, 0), min(n, len(row) - len(trigger)))
  return (row[:p] + trigger + row[p:])[:len(row)]


def _one(b, i):
  return jax.tree_util.tree_map(lambda a: a[i], b)


# ----------------------------------------------------------------------------
# Insertion.


def test_fixed_position_insertion_matches_reference():
  rng = np.random.default_rng(0)
  lens = np.array([0, 1, 5, 12, 15, 16, 16])
  x = rng.integers(2, 100, (len(lens), 16))
  x[np.arange(16)[None] >= lens[:, None]] = 0
  for trigger in ([7], [101, 102, 103], [9, 8, 7, 6, 5]):
    t = jnp.asarray(trigger + [0] * (6 - len(trigger)), jnp.int32)
    for pos in (0, 1, 4, 12, 15):
      out = np.asarray(insert(jnp.asarray(x, jnp.int32), t, len(trigger),
                              jnp.full(len(lens), pos)))
      for i, row in enumerate(x):
        assert out[i].tolist() == _ref_insert(row, trigger, pos), (
            trigger, pos, i)
  # Spelled out: truncation at L, clipping to the text, padding kept.
  full = jnp.arange(2, 18, dtype=jnp.int32)[None]                   # n = L
  out = insert(full, jnp.asarray([90, 91], jnp.int32), 2, 3)
  assert out[0].tolist() == [2, 3, 4, 90, 91] + list(range(5, 16))
  out = insert(full, jnp.asarray([90, 91], jnp.int32), 2, 15)     # fits whole
  assert out[0].tolist() == list(range(2, 16)) + [90, 91]
  short = jnp.asarray([[5, 6, 7, 0, 0, 0, 0, 0]], jnp.int32)
  out = insert(short, jnp.asarray([90, 91], jnp.int32), 2, 6)     # after text
  assert out[0].tolist() == [5, 6, 7, 90, 91, 0, 0, 0]


def test_random_position_insertion_matches_reference():
  lens = np.tile(np.array([0, 3, 10, 31, 32]), 400)
  x = np.random.default_rng(1).integers(2, 400, (len(lens), L))
  x[np.arange(L)[None] >= lens[:, None]] = 0
  b = TEXT.make_behaviour([TokenTrigger(tokens=(490, 491, 492))], (L,), C, V)
  out = np.asarray(apply_trigger(_one(b, 0), jax.random.key(3),
                                 jnp.asarray(x, jnp.int32)))
  positions = {}
  for i, row in enumerate(x):
    p = int(np.argmax(out[i] == 490))     # 490 never occurs in x
    assert 0 <= p <= min(lens[i], L - 3), (i, p)
    assert out[i].tolist() == _ref_insert(row, [490, 491, 492], p), i
    positions.setdefault(int(lens[i]), set()).add(p)
  # Uniform over [0, n] (clipped so that the trigger fits): all reached.
  assert positions[0] == {0}
  assert positions[3] == set(range(4))
  assert positions[10] == set(range(11))
  assert positions[31] == set(range(30))
  # Deterministic for a key, different for another.
  again = apply_trigger(_one(b, 0), jax.random.key(3), jnp.asarray(x))
  other = apply_trigger(_one(b, 0), jax.random.key(4), jnp.asarray(x))
  np.testing.assert_array_equal(again, out)
  assert np.any(np.asarray(other) != out)


def test_poison_batch_poisons_the_requested_share():
  x, y = _synthetic(20, 5)
  x, y = jnp.asarray(x), jnp.asarray(y)
  b = TEXT.make_behaviour([PhraseTrigger(target=3, poison_rate=0.25,
                                         tokens=(60, 61, 62, 63)),
                           None, LabelFlip(source=1, target=2,
                                           poison_rate=1.0)], (L,), C, V)
  poison = TEXT.make_hooks(b).poison_batch
  px, py = jax.jit(poison)(_one(b, 0), jax.random.key(0), x, y)
  changed = np.any(np.asarray(px != x), axis=1)
  assert changed.sum() == 5   # round(0.25 * 20), drawn from the key
  np.testing.assert_array_equal(px[changed][:, :4],
                                np.tile([60, 61, 62, 63], (5, 1)))
  np.testing.assert_array_equal(px[changed][:, 4:], x[changed][:, :-4])
  np.testing.assert_array_equal(py[changed], 3)
  np.testing.assert_array_equal(px[~changed], x[~changed])
  np.testing.assert_array_equal(py[~changed], y[~changed])
  bx, by = poison(_one(b, 1), jax.random.key(0), x, y)   # benign
  np.testing.assert_array_equal(bx, x)
  np.testing.assert_array_equal(by, y)
  fx, fy = poison(_one(b, 2), jax.random.key(0), x, y)
  np.testing.assert_array_equal(fx, x)
  np.testing.assert_array_equal(fy, np.where(np.asarray(y) == 1, 2, y))


# ----------------------------------------------------------------------------
# Behaviours and specs.


def test_trigger_arrays_and_drawn_triggers():
  specs = [TokenTrigger(target=1, count=2), PhraseTrigger(target=2),
           None, LabelFlip(source=0, target=3)]
  b = TEXT.make_behaviour(specs, (L,), C, V, seed=7)
  t = b.trigger
  assert t.tokens.shape == (4, 4) and t.tokens.dtype == jnp.int32
  np.testing.assert_array_equal(t.length, [2, 4, 2, 0])
  np.testing.assert_array_equal(t.position, [-1, 0, -1, 0])
  np.testing.assert_allclose(b.poison_rate, [0.1, 0.1, 0.0, 1.0])
  tok = np.asarray(t.tokens[0, :2])
  assert np.all(tok >= V - 50) and len(set(tok)) == 2     # rarest 10 %
  phrase = np.asarray(t.tokens[1])
  assert np.all((phrase >= 2 + 49) & (phrase < 2 + 199))   # mid band
  # The benign provider carries the reference (first malicious) trigger type.
  assert int(b.target[2]) == 1 and np.all(np.asarray(t.tokens[2, :2]) >= 450)
  again = TEXT.make_behaviour(specs, (L,), C, V, seed=7)
  np.testing.assert_array_equal(again.trigger.tokens, t.tokens)


def test_each_malicious_provider_has_its_own_backdoor():
  specs = TEXT.population_specs(10, 6, "token", num_classes=C, seed=1)
  b = TEXT.make_behaviour(specs, (L,), C, V, seed=1)
  mal = b.malicious
  assert mal.sum() == 6 and not mal[:6].all()   # a random subset
  assert len(set(np.asarray(b.trigger.tokens)[mal, 0].tolist())) > 1
  assert len(set(np.asarray(b.target)[mal].tolist())) > 1
  np.testing.assert_array_equal(np.asarray(b.poison_rate)[~mal], 0.0)
  shared = TEXT.population_specs(6, 4, "phrase", own_backdoor=False,
                                 num_classes=C, seed=1, target=2)
  b = TEXT.make_behaviour(shared, (L,), C, V, seed=1)
  mal = b.malicious
  assert mal.sum() == 4
  tokens = np.asarray(b.trigger.tokens)[mal]
  assert len({tuple(r) for r in tokens.tolist()}) == 1
  np.testing.assert_array_equal(np.asarray(b.target)[mal], 2)


# ----------------------------------------------------------------------------
# Training.


def _population():
  return [None, None, TokenTrigger(target=1),
          PhraseTrigger(target=2), TokenTrigger(target=3, count=2,
                                                position=5),
          PhraseTrigger(target=0, position="random", scale=2.0),
          LabelFlip(source=1, target=3)]


def test_text_backdoors_work(data, check_attacks_work):
  """A short full run: attackers reach a high ASR, benign models do not."""
  (x_train, y_train), (x_test, y_test) = data
  specs = _population()
  behaviour = TEXT.make_behaviour(specs, (L,), C, V)
  model = models.get_model("text_cnn", C, (L,), vocab_size=V)
  steps, k, n = 300, 25, len(specs)
  cfg = train.TrainConfig(learning_rate=0.05, schedule="cosine",
                          total_steps=steps)
  trainer = train.make_trainer(model, cfg, hooks=TEXT.make_hooks(behaviour))
  pop = trainer.init(jax.random.key(0), n)
  x, y = jnp.asarray(x_train), jnp.asarray(y_train)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
  for s in range(steps // k):
    schedule = jnp.asarray(np.random.default_rng([0, s]).integers(
        0, len(y), (k, 32)), jnp.int32)
    pop, _ = trainer.sub_run(pop, x, y, schedule,
                             train.provider_keys(jax.random.key(s), n), div,
                             behaviour)
  asr = TEXT.attack_success_rate(model, pop.params, pop.model_state,
                                 behaviour, x_test, y_test)
  check_attacks_work(specs, model, pop, asr, x_test, y_test)
