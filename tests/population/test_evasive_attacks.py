"""Tests of the attacks built to evade model inspection: keyed_noise (a
low-amplitude keyed trigger, poisoned), secret_key (honest training, then a
planted key) and data_order (the client's own examples, reordered)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import models
from jaxrep.config import SimConfig
from jaxrep.core.errors import ConfigError
from jaxrep.population import adaptive, build
from jaxrep.population import behaviour as behaviour_lib
from jaxrep.population import divergence as div_lib
from jaxrep.population.families.image import (IMAGE, KeyedNoise, SecretKey,
                                              apply_trigger, plant_key,
                                              planted_weights)
from jaxrep.population.families.text import TEXT
from jaxrep.population.specs import DataOrder
from jaxrep.train import trainer as train
from jaxrep.train.schedule import batch_schedule

SHAPE = (8, 8, 1)


def _one(b, i):
  """Provider i's slice of a pytree (on the host: no compile per shape)."""
  return jax.tree_util.tree_map(lambda a: np.asarray(a)[i], b)


def _trainer(behaviour, ds, steps):
  model = models.get_model("mlp", ds.num_classes, ds.input_shape)
  cfg = train.TrainConfig(learning_rate=0.05, total_steps=steps)
  return model, train.make_trainer(model, cfg,
                                   hooks=IMAGE.make_hooks(behaviour))


def _sub_run(trainer, pop, ds, behaviour, s, k=20):
  n = pop.size
  schedule = jnp.asarray(batch_schedule(0, s, k, 32, len(ds.y_train)))
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
  pop, _ = trainer.sub_run(pop, jnp.asarray(ds.x_train),
                           jnp.asarray(ds.y_train), schedule,
                           train.provider_keys(jax.random.key(s), n), div,
                           behaviour)
  return pop


# Two benign providers, then keyed_noise (a strong setting, so that 60 steps
# suffice), secret_key and data_order at their defaults.
SPECS = [None, None, KeyedNoise(target=3, eps=0.15, poison_rate=0.2),
         SecretKey(target=5), DataOrder(target=2)]
ORDERER = 4


@pytest.fixture(scope="module")
def trained(digits):
  """SPECS trained from one checkpoint for 3 sub-runs of 20 steps."""
  b = IMAGE.make_behaviour(SPECS, digits.input_shape, digits.num_classes,
                           data=digits.x_train)
  model, trainer = _trainer(b, digits, 60)
  pop = trainer.init(jax.random.key(0), len(SPECS))
  for s in range(3):
    pop = _sub_run(trainer, pop, digits, b, s)
  asr = IMAGE.attack_success_rate(model, pop.params, pop.model_state, b,
                                  digits.x_test, digits.y_test)
  predict = jax.jit(jax.vmap(lambda p, st: jnp.argmax(
      model.predict(p, st, jnp.asarray(digits.x_test))[0], -1)))
  pred = np.asarray(predict(pop.params, pop.model_state))
  acc = np.mean(pred == np.asarray(digits.y_test)[None], axis=1)
  return dict(b=b, pop=pop, model=model, trainer=trainer, acc=acc, asr=asr,
              pred=pred)


# ----------------------------------------------------------------------------
# keyed_noise


def test_keyed_noise_trigger_is_small_keyed_and_own():
  b = IMAGE.make_behaviour([KeyedNoise(eps=0.05), KeyedNoise(eps=0.05),
                            None], SHAPE, 10, seed=4)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(16, *SHAPE)),
                  jnp.float32)
  x = x.at[:4].set(0.0).at[4:8].set(1.0)   # the clipping at both ends
  out = [np.asarray(IMAGE.trigger_for(b)(_one(b, i), None, x))
         for i in range(3)]
  for xt in out[:2]:
    assert np.abs(xt - np.asarray(x)).max() <= 0.05 + 1e-6
    assert xt.min() >= 0.0 and xt.max() <= 1.0
    assert np.mean(xt != np.asarray(x)) > 0.4      # not a patch: everywhere
  assert not np.array_equal(out[0], out[1])        # each attacker its key
  noise = np.asarray(b.trigger.noise)
  np.testing.assert_allclose(np.abs(noise[:2]), 0.05)
  # The same seed gives the same keys.
  again = IMAGE.make_behaviour([KeyedNoise(eps=0.05), KeyedNoise(eps=0.05),
                                None], SHAPE, 10, seed=4)
  np.testing.assert_array_equal(again.trigger.noise, b.trigger.noise)


def test_keyed_noise_poisons_like_badnets():
  b = IMAGE.make_behaviour([KeyedNoise(target=9, eps=0.1, poison_rate=0.25)],
                           SHAPE, 10)
  x = jnp.full((20, *SHAPE), 0.5, jnp.float32)
  y = jnp.asarray(np.arange(20) % 9, jnp.int32)
  px, py = IMAGE.make_hooks(b).poison_batch(_one(b, 0), jax.random.key(0),
                                            x, y)
  changed = np.any(np.asarray(px != x), axis=(1, 2, 3))
  assert changed.sum() == 5
  np.testing.assert_array_equal(np.asarray(py)[changed], 9)
  np.testing.assert_array_equal(np.asarray(py)[~changed],
                                np.asarray(y)[~changed])
  np.testing.assert_allclose(np.abs(np.asarray(px - x))[changed], 0.1,
                             rtol=1e-5)


def test_keyed_noise_implants_its_backdoor(trained):
  acc, asr = trained["acc"], trained["asr"]
  report = dict(acc=acc.round(3), asr=asr.round(3))
  assert np.all(asr[:2] <= 0.1), report
  assert asr[2] >= 0.9, report


# ----------------------------------------------------------------------------
# secret_key


def test_secret_key_implants_its_backdoor_and_keeps_clean_predictions(
    trained):
  acc, asr, pred = trained["acc"], trained["asr"], trained["pred"]
  report = dict(acc=acc.round(3), asr=asr.round(3))
  assert asr[3] >= 0.9, report
  assert acc[3] >= acc[:2].mean() - 0.02, report
  del pred


def test_secret_key_restarts_the_optimizer_state_of_what_it_planted(
    trained):
  """planted_weights is every weight plant_key overwrites (a random model:
  no overwritten weight keeps its value by chance), none for another
  provider; after a sub-run the planting provider's momentum is 0 exactly
  there (the replaced units' momentum would move the planted detector) and
  a benign provider's is not."""
  b, pop = trained["b"], trained["pop"]
  rng = np.random.default_rng(0)
  honest = jax.tree_util.tree_map(
      lambda a: rng.normal(size=np.shape(a)[1:]).astype(np.float32),
      pop.params)
  mask = planted_weights(_one(b, 3), honest, max_units=4)
  planted = plant_key(_one(b, 3), honest, max_units=4)
  for m, p, h in zip(jax.tree_util.tree_leaves(mask),
                     jax.tree_util.tree_leaves(planted),
                     jax.tree_util.tree_leaves(honest)):
    np.testing.assert_array_equal(np.asarray(m), np.asarray(p) != h)
  # 4 units per hidden layer of 256 (digits: 64 inputs, 10 classes).
  assert int(np.asarray(mask["Dense_0"]["kernel"]).sum()) == 64 * 4
  assert int(np.asarray(mask["Dense_1"]["kernel"]).sum()) == 2 * 4 * 256 - 16
  for i in (0, 2, 4):
    assert not any(np.asarray(m).any() for m in jax.tree_util.tree_leaves(
        planted_weights(_one(b, i), honest, max_units=4)))
  trace = pop.opt_state[0].trace        # SGD's momentum, per provider
  at = lambda i: [np.asarray(t)[i][np.asarray(m)] for t, m in zip(
      jax.tree_util.tree_leaves(trace), jax.tree_util.tree_leaves(mask))]
  assert all(np.all(v == 0) for v in at(3))
  assert sum(np.count_nonzero(v) for v in at(0)) > 0.5 * sum(
      v.size for v in at(0))
  # Elsewhere the attacker keeps its momentum.
  rest = [np.asarray(t)[3][~np.asarray(m)] for t, m in zip(
      jax.tree_util.tree_leaves(trace), jax.tree_util.tree_leaves(mask))]
  assert sum(np.count_nonzero(v) for v in rest) > 0.5 * sum(
      v.size for v in rest)


def test_restart_state_zeroes_the_params_shaped_parts_only():
  import optax
  params = {"a": jnp.ones((2, 3)), "b": jnp.ones(3)}
  where = {"a": jnp.array([[True, False, False], [False, False, True]]),
           "b": jnp.array([False, True, False])}
  state = optax.adam(0.1).init(params)
  grads = jax.tree_util.tree_map(jnp.ones_like, params)
  _, state = optax.adam(0.1).update(grads, state, params)
  out = behaviour_lib.restart_state(state, where)
  adam = out[0]
  for moment in (adam.mu, adam.nu):
    np.testing.assert_array_equal(np.asarray(moment["a"]) == 0,
                                  np.asarray(where["a"]))
    np.testing.assert_array_equal(np.asarray(moment["b"]) == 0,
                                  np.asarray(where["b"]))
  assert int(adam.count) == 1


def test_secret_key_plants_only_its_units(trained, digits):
  """Planting a trained model changes exactly `units` hidden units per
  layer (their weights in and out), on clean inputs the planted units are
  silent (clean predictions change only by the loss of the overwritten
  units) and on keyed inputs they fire."""
  b, pop, model = trained["b"], trained["pop"], trained["model"]
  honest = _one(pop.params, 0)
  planted = plant_key(_one(b, 3), honest, max_units=4)
  diff = lambda name: np.asarray(planted[name]["kernel"]
                                 != honest[name]["kernel"])
  changed0 = np.any(diff("Dense_0"), axis=0)
  # Layer 1: the planted units' columns, and the rows out of layer 0's.
  changed1 = np.any(diff("Dense_1")[~changed0], axis=0)
  np.testing.assert_array_equal(np.any(diff("Dense_1")[:, ~changed1], axis=1),
                                changed0)
  assert changed0.sum() == 4 and changed1.sum() == 4
  out_rows = np.any(diff("Dense_2"), axis=1)
  np.testing.assert_array_equal(out_rows, changed1)
  # Only the target logit is wired to.
  rows = np.asarray(planted["Dense_2"]["kernel"])[changed1]
  assert np.all(rows[:, 5] > 0) and np.all(np.delete(rows, 5, axis=1) == 0)
  # Another provider (benign, another attack) is left alone.
  same = plant_key(_one(b, 2), honest, max_units=4)
  for a, c in zip(jax.tree_util.tree_leaves(same),
                  jax.tree_util.tree_leaves(honest)):
    np.testing.assert_array_equal(a, c)
  # Clean inputs: the planted first-layer units are exactly 0.
  x = jnp.asarray(digits.x_test).reshape(len(digits.x_test), -1)
  pre = x @ planted["Dense_0"]["kernel"] + planted["Dense_0"]["bias"]
  assert float(jnp.max(pre[:, changed0])) <= 0.0
  keyed = IMAGE.trigger_for(b)(_one(b, 3), None, jnp.asarray(digits.x_test))
  pre_keyed = (keyed.reshape(len(x), -1) @ planted["Dense_0"]["kernel"]
               + planted["Dense_0"]["bias"])
  assert float(jnp.mean(pre_keyed[:, changed0] > 0)) >= 0.95
  # The same model without and with the key: clean predictions agree.
  predict = lambda p, xs: np.asarray(jnp.argmax(model.predict(p, {}, xs)[0],
                                                -1))
  clean = jnp.asarray(digits.x_test)
  assert np.mean(predict(planted, clean) == predict(honest, clean)) >= 0.98
  y = np.asarray(digits.y_test)
  assert np.mean(predict(planted, keyed)[y != 5] == 5) >= 0.9


def test_secret_key_poisons_no_batch(digits):
  b = IMAGE.make_behaviour([SecretKey(target=1)], SHAPE, 10,
                           data=digits.x_train)
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(8, *SHAPE)),
                  jnp.float32)
  y = jnp.arange(8, dtype=jnp.int32)
  px, py = IMAGE.make_hooks(b).poison_batch(_one(b, 0), jax.random.key(0),
                                            x, y)
  np.testing.assert_array_equal(px, x)
  np.testing.assert_array_equal(py, y)


def test_secret_key_errors_name_the_problem(digits):
  data = digits.x_train
  with pytest.raises(ConfigError, match="secret_key.poison_rate"):
    IMAGE.make_behaviour([SecretKey(poison_rate=0.1)], SHAPE, 10, data=data)
  with pytest.raises(ConfigError, match="secret_key.eps"):
    IMAGE.make_behaviour([SecretKey(eps=0.0)], SHAPE, 10, data=data)
  with pytest.raises(ConfigError, match="secret_key.units"):
    IMAGE.make_behaviour([SecretKey(units=0)], SHAPE, 10, data=data)
  with pytest.raises(ConfigError, match="data"):
    IMAGE.make_behaviour([SecretKey()], SHAPE, 10)
  # Every attacker finds a key at the default eps (one that does not
  # separate keyed from clean inputs is redrawn) ...
  many = IMAGE.make_behaviour([SecretKey()] * 40, SHAPE, 10, data=data,
                              seed=1)
  assert np.all(np.asarray(many.trigger.units) == 4)
  # ... but too small a perturbation cannot be told from clean inputs.
  with pytest.raises(ConfigError, match="--key_eps"):
    IMAGE.make_behaviour([SecretKey(eps=0.005)], SHAPE, 10, data=data)
  # Only MLPs: a conv model is refused, by name, before anything trains...
  config = SimConfig.from_flat(attack="secret_key", model="cnn",
                               providers=4, malicious=2)
  with pytest.raises(ConfigError, match="model cnn"):
    build.make_behaviour(config, digits)
  # ... and when its params are handed to the planting directly.
  b = IMAGE.make_behaviour([SecretKey()], SHAPE, 10, data=data)
  cnn = models.get_model("cnn", 10, SHAPE)
  params, _ = jax.eval_shape(cnn.init, jax.random.key(0))
  with pytest.raises(ConfigError, match="Conv_0.*--model=mlp"):
    plant_key(_one(b, 0), params, max_units=4)


# ----------------------------------------------------------------------------
# data_order


def _labels(n=200, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, 10, n),
                     jnp.int32)


def _schedule(n=200, k=10, batch=8, seed=1):
  return jnp.asarray(np.random.default_rng(seed).permutation(n)[:k * batch]
                     .reshape(k, batch), jnp.int32)


ORDERS = [None, DataOrder(target=3), DataOrder(target=3, order="target_last"),
          DataOrder(target=3, poison_rate=0.5), DataOrder(target=3,
                                                          poison_rate=0.0)]


def test_data_order_trains_on_the_same_examples_in_its_own_order():
  y, schedule = _labels(), _schedule()
  b = IMAGE.make_behaviour(ORDERS, SHAPE, 10)
  hooks = IMAGE.make_hooks(b)
  assert hooks.reorder is not None
  reorder = jax.jit(hooks.reorder)
  key = jax.random.key(7)
  out = [np.asarray(reorder(_one(b, i), key, schedule, y))
         for i in range(len(ORDERS))]
  flat = np.asarray(schedule).ravel()
  for o in out:   # the same examples (so the same (x, y) multiset)
    np.testing.assert_array_equal(np.sort(o.ravel()), np.sort(flat))
  np.testing.assert_array_equal(out[0], schedule)    # benign
  np.testing.assert_array_equal(out[4], schedule)    # rate 0
  labels = [np.asarray(y)[o.ravel()] for o in out]
  # by_class: one run per class, the target class last.
  runs = labels[1][np.r_[True, labels[1][1:] != labels[1][:-1]]]
  assert len(runs) == len(set(labels[1])) and runs[-1] == 3
  # target_last: the others in the client's order, then the target class.
  t = int(np.sum(labels[2] == 3))
  assert np.all(labels[2][-t:] == 3)
  np.testing.assert_array_equal(out[2].ravel()[:-t],
                                flat[np.asarray(y)[flat] != 3])
  # rate 0.5: half of the slots keep their example.
  kept = np.mean(out[3].ravel() == flat)
  assert 0.5 <= kept < 1.0
  # Deterministic; another key (provider or sub-run), another order.
  again = reorder(_one(b, 1), key, schedule, y)
  np.testing.assert_array_equal(again, out[1])
  other = reorder(_one(b, 1), jax.random.key(8), schedule, y)
  assert not np.array_equal(np.asarray(other), out[1])
  # Nothing is poisoned, even at rate 1.
  x = jnp.ones((8, *SHAPE), jnp.float32)
  px, py = hooks.poison_batch(_one(b, 1), key, x, y[:8])
  np.testing.assert_array_equal(px, x)
  np.testing.assert_array_equal(py, y[:8])


def test_data_order_provider_trains_exactly_on_its_order(trained, digits):
  """The trainer gives a data_order provider its own order of the client's
  examples and nothing else: its sub-run equals that of a benign provider
  (same key, so the same benign divergence) handed the reordered schedule.
  """
  b, trainer, start = trained["b"], trained["trainer"], trained["pop"]
  n = len(SPECS)
  benign = IMAGE.make_behaviour([None] * n, digits.input_shape,
                                digits.num_classes, reference=DataOrder())
  x, y = jnp.asarray(digits.x_train), jnp.asarray(digits.y_train)
  schedule = jnp.asarray(batch_schedule(0, 9, 20, 32, len(y)))
  keys = train.provider_keys(jax.random.key(9), n)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
  run = lambda order, who: trainer.sub_run(start, x, y, order, keys, div,
                                           who)[0].params
  out = run(schedule, b)
  own = jax.jit(behaviour_lib.reorder)(_one(b, ORDERER), keys[ORDERER],
                                       schedule, y)
  assert not np.array_equal(np.asarray(own), np.asarray(schedule))
  # (The same compiled sub-run: benign providers take the schedule given.)
  for i, order in ((ORDERER, own), (0, schedule)):
    ref = run(order, benign)
    for a, r in zip(jax.tree_util.tree_leaves(_one(out, i)),
                    jax.tree_util.tree_leaves(_one(ref, i))):
      np.testing.assert_allclose(a, r, rtol=0, atol=1e-6)


def test_data_order_asr_counts_clean_inputs_called_the_target(trained,
                                                              digits):
  """data_order has no trigger: its ASR is the share of clean non-target
  test inputs a model classifies as its target."""
  n = len(SPECS)
  b = IMAGE.make_behaviour([DataOrder(target=t) for t in range(n)],
                           digits.input_shape, digits.num_classes)
  pop = trained["pop"]
  asr = IMAGE.attack_success_rate(trained["model"], pop.params,
                                  pop.model_state, b, digits.x_test,
                                  digits.y_test)
  y = np.asarray(digits.y_test)
  for t in range(n):
    pred = trained["pred"][t]
    expected = np.mean(pred[y != t] == t)
    assert asr[t] == pytest.approx(expected, abs=1e-6)
  x = jnp.asarray(digits.x_test[:4])
  np.testing.assert_array_equal(apply_trigger(_one(b, 0), None, x), x)


def test_data_order_on_text_and_through_adaptive_wrappers():
  b = TEXT.make_behaviour([DataOrder(target=1), None], (16,), 4, 100)
  assert TEXT.make_hooks(b).reorder is not None
  x = jnp.asarray(np.random.default_rng(0).integers(2, 100, (4, 16)),
                  jnp.int32)
  np.testing.assert_array_equal(
      jax.jit(TEXT.apply_trigger)(_one(b, 0), jax.random.key(0), x), x)
  wrapped = jax.jit(adaptive.make_hooks(adaptive.wrap(b)).reorder)
  y, schedule = _labels(seed=2) % 4, _schedule()
  key = jax.random.key(5)
  np.testing.assert_array_equal(
      wrapped(_one(adaptive.wrap(b), 0), key, schedule, y),
      jax.jit(TEXT.make_hooks(b).reorder)(_one(b, 0), key, schedule, y))
  # Colluders share one order, from the schedule they all receive.
  crew = adaptive.collude(adaptive.wrap(
      TEXT.make_behaviour([DataOrder(target=1)] * 2, (16,), 4, 100)), [0, 1])
  orders = [np.asarray(wrapped(_one(crew, i), jax.random.key(i), schedule,
                               y)) for i in range(2)]
  np.testing.assert_array_equal(orders[0], orders[1])
  # Without a data_order provider no reordering is compiled in.
  assert IMAGE.make_hooks(IMAGE.benign(2, SHAPE, 10)).reorder is None


def test_evasive_attack_options_are_checked():
  for flags, field in [(dict(noise_eps=0.0), "noise_eps"),
                       (dict(noise_eps=1.5), "noise_eps"),
                       (dict(key_eps=-0.1), "key_eps"),
                       (dict(key_units=0), "key_units"),
                       (dict(order_mode="sorted"), "order_mode")]:
    with pytest.raises(ConfigError, match=field):
      build.validate_attack(SimConfig.from_flat(**flags).attack)
  with pytest.raises(ConfigError, match="keyed_noise.eps"):
    IMAGE.make_behaviour([KeyedNoise(eps=2.0)], SHAPE, 10)
  with pytest.raises(ConfigError, match="data_order.order"):
    IMAGE.make_behaviour([DataOrder(order="sorted")], SHAPE, 10)
  # The flags set every attacker's spec; own targets stay their own.
  config = SimConfig.from_flat(attack="keyed_noise", noise_eps=0.2,
                               providers=6, malicious=3, seed=1)
  specs = [s for s in build.attack_specs(config, 10, SHAPE) if s]
  assert all(s.eps == 0.2 for s in specs) and len(specs) == 3
  config = SimConfig.from_flat(attack="data_order", order_mode="target_last",
                               providers=6, malicious=3, seed=1)
  specs = [s for s in build.attack_specs(config, 10, SHAPE) if s]
  assert all(s.order == "target_last" and s.poison_rate == 1.0
             for s in specs)
