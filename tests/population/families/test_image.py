"""Tests of the image attacks (jaxrep.population.families.image)."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep import models
from jaxrep.population import divergence as div_lib
from jaxrep.population.families.image import (IMAGE, BadNets, Blend, Scaling,
                                              Warp, apply_trigger)
from jaxrep.population.specs import LabelFlip
from jaxrep.train import trainer as train
from jaxrep.train.schedule import batch_schedule

SHAPE = (8, 8, 1)


def _one(b, i):
  return jax.tree_util.tree_map(lambda a: a[i], b)


def _train_full(ds, specs, steps=400, k=20, seed=0):
  behaviour = IMAGE.make_behaviour(specs, ds.input_shape, ds.num_classes,
                                   seed=seed)
  model = models.get_model("mlp", ds.num_classes, ds.input_shape)
  cfg = train.TrainConfig(learning_rate=0.05, schedule="cosine",
                          total_steps=steps)
  trainer = train.make_trainer(model, cfg, hooks=IMAGE.make_hooks(behaviour))
  n = len(specs)
  pop = trainer.init(jax.random.key(seed), n)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
  for s in range(steps // k):
    schedule = jnp.asarray(batch_schedule(seed, s, k, 32, len(y)))
    pop, _ = trainer.sub_run(pop, x, y, schedule,
                             train.provider_keys(jax.random.key(s), n), div,
                             behaviour)
  return model, pop, behaviour


def test_every_attack_works_on_digits(digits, check_attacks_work):
  specs = [None, None, BadNets(target=3), Blend(target=5),
           LabelFlip(source=1, target=7), Scaling(target=2), Warp(target=4),
           BadNets(target=8, location="random", pattern="random")]
  model, pop, b = _train_full(digits, specs)
  asr = IMAGE.attack_success_rate(model, pop.params, pop.model_state, b,
                                  digits.x_test, digits.y_test)
  check_attacks_work(specs, model, pop, asr, digits.x_test, digits.y_test)


def test_poison_batch_poisons_the_requested_share():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(20, 8, 8, 1)),
                  jnp.float32)
  y = jnp.asarray(np.arange(20) % 10, jnp.int32)
  b = IMAGE.make_behaviour([BadNets(target=9, poison_rate=0.25, size=3,
                                    location="top_left", pattern="white"),
                            None, LabelFlip(source=1, target=2,
                                            poison_rate=1.0),
                            LabelFlip(source=3, target=2, poison_rate=0.5)],
                           SHAPE, 10)
  poison = IMAGE.make_hooks(b).poison_batch
  key = jax.random.key(0)
  px, py = poison(_one(b, 0), key, x, y)
  changed = np.any(np.asarray(px != x), axis=(1, 2, 3))
  assert changed.sum() == 5   # round(0.25 * 20), anywhere in the batch
  np.testing.assert_array_equal(np.asarray(py) != np.asarray(y),
                                changed & (np.asarray(y) != 9))
  assert np.all(np.asarray(py)[changed] == 9)
  np.testing.assert_array_equal(px[changed][:, :3, :3], 1.0)  # white patch
  np.testing.assert_array_equal(px[changed][:, 3:], x[changed][:, 3:])
  np.testing.assert_array_equal(px[~changed], x[~changed])
  bx, by = poison(_one(b, 1), key, x, y)  # benign: untouched
  np.testing.assert_array_equal(bx, x)
  np.testing.assert_array_equal(by, y)
  fx, fy = poison(_one(b, 2), key, x, y)  # rate 1.0: every source example
  np.testing.assert_array_equal(fx, x)
  expected = np.where(np.asarray(y) == 1, 2, np.asarray(y))
  np.testing.assert_array_equal(fy, expected)
  # label_flip's rate counts source-class examples: half of the two 3s.
  _, hy = poison(_one(b, 3), key, x, y)
  flipped = np.asarray(hy) != np.asarray(y)
  assert flipped.sum() == 1 and np.all(np.asarray(y)[flipped] == 3)


def test_each_key_poisons_its_own_examples():
  """The poisoned examples come from the attacker's own key: the same key
  picks the same ones, other keys (other providers or steps) others."""
  x = jnp.zeros((32, 8, 8, 1), jnp.float32)
  y = jnp.zeros((32,), jnp.int32)
  b = IMAGE.make_behaviour([BadNets(target=7, poison_rate=0.25, size=2,
                                    location="top_left")], SHAPE, 10)
  poison = IMAGE.make_hooks(b).poison_batch

  def picked(seed):
    _, py = poison(_one(b, 0), jax.random.key(seed), x, y)
    return tuple(np.flatnonzero(np.asarray(py) == 7))
  picks = [picked(s) for s in range(8)]
  assert picked(0) == picks[0]
  assert all(len(p) == 8 for p in picks)
  assert len(set(picks)) == 8
  # Not the first slots, and every slot gets its turn.
  assert picks[0] != tuple(range(8))
  assert len(set().union(*picks)) > 24


def test_trigger_arrays_of_each_attack():
  b = IMAGE.make_behaviour([BadNets(size=2, location="center"),
                            Blend(alpha=0.3), Warp(), LabelFlip(source=2)],
                           SHAPE, 10)
  mask, pattern = np.asarray(b.trigger.mask), np.asarray(b.trigger.pattern)
  assert mask[0].sum() == 4 and mask[0, 3:5, 3:5].all()
  np.testing.assert_array_equal(pattern[0, :2, :2, 0], [[0, 1], [1, 0]])
  assert mask[1].all() and 0 < pattern[1].mean() < 1
  np.testing.assert_allclose(b.trigger.alpha, [1.0, 0.3, 0.0, 0.0])
  assert not mask[2:].any() and not pattern[2:].any()
  displacement = np.abs(np.asarray(b.trigger.warp[2] - b.trigger.warp[3]))
  assert 0 < displacement.max() <= 1.5 + 1e-6
  np.testing.assert_array_equal(b.source, [-1, -1, -1, 2])


def test_warp_is_compiled_in_only_when_used():
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(4, 8, 8, 1)),
                  jnp.float32)
  warp = IMAGE.make_behaviour([Warp(), None], SHAPE, 10)
  patch = IMAGE.make_behaviour([BadNets(), None], SHAPE, 10)
  assert IMAGE.trigger_for(warp) is apply_trigger
  assert IMAGE.trigger_for(patch) is not apply_trigger
  warped = apply_trigger(_one(warp, 0), None, x)
  assert np.any(np.asarray(warped) != np.asarray(x))
  # The benign provider wears the warp as its reference but only a warp
  # attacker resamples.
  np.testing.assert_array_equal(apply_trigger(_one(warp, 1), None, x), x)
  np.testing.assert_array_equal(IMAGE.trigger_for(patch)(_one(patch, 0), None,
                                                         x),
                                apply_trigger(_one(patch, 0), None, x))


def test_each_malicious_provider_has_its_own_backdoor():
  specs = IMAGE.population_specs(10, 6, "badnets", num_classes=10, seed=1)
  b = IMAGE.make_behaviour(specs, (28, 28, 1), 10, seed=1)
  mal = b.malicious
  assert mal.sum() == 6 and not mal[:6].all()   # a random subset
  masks = np.asarray(b.trigger.mask)[mal].reshape(6, -1)
  assert len({m.tobytes() for m in masks}) > 1
  assert len(set(np.asarray(b.target)[mal].tolist())) > 1
  np.testing.assert_array_equal(np.asarray(b.poison_rate)[~mal], 0.0)
