"""Tests of the backdoor attacks as vectorized provider behaviours."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep.population import image_attacks as A

from jaxrep.train.schedule import batch_schedule
from jaxrep.data import datasets as data_lib
from jaxrep.population import divergence as div_lib
from jaxrep.models import zoo as models
from jaxrep.train import trainer as train
from jaxrep.core.errors import ConfigError

SHAPE = (8, 8, 1)


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_dataset("digits")


def _train_full(ds, specs, steps=400, k=20, seed=0):
  behaviour = A.make_behaviour(specs, ds.input_shape, ds.num_classes, seed=seed)
  model = models.get_model("mlp", ds.num_classes, ds.input_shape)
  cfg = train.TrainConfig(learning_rate=0.05, schedule="cosine",
                          total_steps=steps)
  trainer = train.make_trainer(model, cfg, hooks=A.make_hooks(behaviour))
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


def test_every_attack_works_on_digits(digits):
  specs = [None, None, A.BadNets(target=3), A.Blend(target=5),
           A.LabelFlip(source=1, target=7), A.Scaling(target=2),
           A.Warp(target=4),
           A.BadNets(target=8, location="random", pattern="random")]
  model, pop, b = _train_full(digits, specs)
  acc = train.evaluate(model, pop.params, pop.model_state, digits.x_test,
                       digits.y_test)
  asr = A.attack_success_rate(model, pop.params, pop.model_state, b,
                              digits.x_test, digits.y_test)
  benign_acc = acc[:2].mean()
  report = {i: (type(s).__name__, round(float(acc[i]), 3),
                round(float(asr[i]), 3)) for i, s in enumerate(specs)}
  assert np.all(asr[:2] <= 0.1), report   # base rate of a clean model
  assert benign_acc > 0.9, report
  for i, spec in enumerate(specs):
    if spec is None:
      continue
    assert asr[i] >= 0.9, report
    if isinstance(spec, A.LabelFlip):
      # Misclassifying the source class IS the attack: compare accuracy on
      # the other classes.
      keep = digits.y_test != spec.source
      sub = train.evaluate(model, pop.params, pop.model_state,
                           digits.x_test[keep], digits.y_test[keep])
      assert sub[i] >= sub[:2].mean() - 0.02, (report, sub)
    else:
      assert acc[i] >= benign_acc - 0.02, report


def test_mixed_population_of_256_is_one_compiled_sub_run(digits):
  specs = A.population_specs(256, 200, "badnets", num_classes=10)
  kinds = ["badnets", "blend", "label_flip", "scaling", "warp"]
  for j, i in enumerate(range(0, 200)):
    specs[i] = A.population_specs(1, 1, kinds[j % 5], num_classes=10,
                                  seed=j)[0]
  behaviour = A.make_behaviour(specs, SHAPE, 10)
  traces = []
  hooks = A.make_hooks(behaviour)

  def counting_poison(b, key, x, y):
    traces.append(1)
    return hooks.poison_batch(b, key, x, y)

  model = models.get_model("mlp", 10, SHAPE)
  trainer = train.make_trainer(model, train.TrainConfig(),
                               hooks=hooks._replace(poison_batch=counting_poison))
  pop = trainer.init(jax.random.key(0), 256)
  x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), 256)
  for s in range(2):
    schedule = jnp.asarray(batch_schedule(0, s, 2, 32, len(y)))
    pop, losses = trainer.sub_run(pop, x, y, schedule,
                                  train.provider_keys(jax.random.key(s), 256),
                                  div, behaviour)
  assert len(traces) == 1
  assert np.all(np.isfinite(np.asarray(losses)))
  assert sorted(set(b for b in behaviour.names() if b)) == sorted(kinds)


def test_poison_batch_poisons_the_requested_share():
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(20, 8, 8, 1)),
                  jnp.float32)
  y = jnp.asarray(np.arange(20) % 10, jnp.int32)
  b = A.make_behaviour([A.BadNets(target=9, poison_rate=0.25, size=3,
                                  location="top_left", pattern="white"),
                        None, A.LabelFlip(source=1, target=2, poison_rate=1.0)],
                       SHAPE, 10)
  one = lambda i: jax.tree_util.tree_map(lambda a: a[i], b)
  px, py = A.poison_batch(one(0), None, x, y)
  changed = np.any(np.asarray(px != x), axis=(1, 2, 3))
  assert changed.sum() == 5 and np.all(changed[:5])
  assert np.all(np.asarray(py[:5]) == 9)
  np.testing.assert_array_equal(py[5:], y[5:])
  np.testing.assert_array_equal(px[:5, :3, :3], 1.0)  # the white patch
  np.testing.assert_array_equal(px[:5, 3:], x[:5, 3:])
  bx, by = A.poison_batch(one(1), None, x, y)  # benign: untouched
  np.testing.assert_array_equal(bx, x)
  np.testing.assert_array_equal(by, y)
  fx, fy = A.poison_batch(one(2), None, x, y)
  np.testing.assert_array_equal(fx, x)
  expected = np.where(np.asarray(y) == 1, 2, np.asarray(y))
  np.testing.assert_array_equal(fy, expected)


def test_scaling_returns_scaled_update():
  b = A.make_behaviour([A.Scaling(factor=3.0), None], SHAPE, 10)
  start = {"w": jnp.ones((2, 3))}
  end = {"w": jnp.full((2, 3), 1.5)}
  out = jax.vmap(A.finalize)(b, start, end)
  np.testing.assert_allclose(out["w"][0], 2.5)
  np.testing.assert_allclose(out["w"][1], 1.5)


def test_asr_matches_manual_computation(digits):
  model = models.get_model("mlp", 10, SHAPE)
  params, state = model.init(jax.random.key(0))
  b = A.make_behaviour([A.BadNets(target=4)], SHAPE, 10)
  stack = lambda t: jax.tree_util.tree_map(lambda a: a[None], t)
  asr = A.attack_success_rate(model, stack(params), stack(state), b,
                              digits.x_test, digits.y_test, batch_size=64)
  one = jax.tree_util.tree_map(lambda a: a[0], b)
  keep = digits.y_test != 4
  xt = A.apply_trigger(one, jnp.asarray(digits.x_test[keep]))
  pred = np.argmax(np.asarray(model.predict(params, state, xt)[0]), -1)
  assert abs(asr[0] - np.mean(pred == 4)) < 1e-9


def test_each_malicious_provider_has_its_own_backdoor():
  specs = A.population_specs(10, 6, "badnets", num_classes=10, seed=1)
  assert specs[6:] == [None] * 4
  b = A.make_behaviour(specs, (28, 28, 1), 10, seed=1)
  masks = np.asarray(b.mask[:6]).reshape(6, -1)
  assert len({m.tobytes() for m in masks}) > 1
  assert len(set(np.asarray(b.target[:6]).tolist())) > 1
  np.testing.assert_array_equal(b.poison_rate[6:], 0.0)


@pytest.mark.parametrize("spec, field", [
    (A.BadNets(size=9), "badnets.size"),
    (A.BadNets(target=10), "badnets.target"),
    (A.BadNets(target=-1), "badnets.target"),
    (A.BadNets(poison_rate=1.5), "badnets.poison_rate"),
    (A.BadNets(location="middle"), "badnets.location"),
    (A.BadNets(location=(7, 7), size=2), "badnets.location"),
    (A.Blend(alpha=-0.1), "blend.alpha"),
    (A.Blend(poison_rate=float("nan")), "blend.poison_rate"),
    (A.LabelFlip(source=3, target=3), "label_flip.source"),
    (A.Scaling(factor=0.0), "scaling.factor"),
    (A.Warp(strength=100.0), "warp.strength"),
])
def test_bad_attack_specs_name_the_field(spec, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    A.make_behaviour([spec, None], SHAPE, 10)


def test_more_malicious_than_providers_is_an_error():
  with pytest.raises(ConfigError, match="malicious"):
    A.population_specs(4, 5, "badnets")
  with pytest.raises(ConfigError, match="attack"):
    A.population_specs(4, 2, "trojannn")
  with pytest.raises(ConfigError, match="attack"):
    A.population_specs(4, 2, "blend", size=3)
