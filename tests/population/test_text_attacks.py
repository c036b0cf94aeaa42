"""Tests of the text models and the text backdoor attacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep.population import divergence as div_lib
from jaxrep.models import zoo as models
from jaxrep.train import trainer as train
from jaxrep.population import text_attacks as T
from jaxrep.population.image_attacks import LabelFlip
from jaxrep.core.errors import ConfigError

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


def _stack(tree):
  return jax.tree_util.tree_map(lambda a: a[None], tree)


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
      out = np.asarray(T.insert(jnp.asarray(x, jnp.int32), t, len(trigger),
                                jnp.full(len(lens), pos)))
      for i, row in enumerate(x):
        assert out[i].tolist() == _ref_insert(row, trigger, pos), (
            trigger, pos, i)
  # Spelled out: truncation at L, clipping to the text, padding kept.
  full = jnp.arange(2, 18, dtype=jnp.int32)[None]                   # n = L
  out = T.insert(full, jnp.asarray([90, 91], jnp.int32), 2, 3)
  assert out[0].tolist() == [2, 3, 4, 90, 91] + list(range(5, 16))
  out = T.insert(full, jnp.asarray([90, 91], jnp.int32), 2, 15)   # fits whole
  assert out[0].tolist() == list(range(2, 16)) + [90, 91]
  short = jnp.asarray([[5, 6, 7, 0, 0, 0, 0, 0]], jnp.int32)
  out = T.insert(short, jnp.asarray([90, 91], jnp.int32), 2, 6)   # after text
  assert out[0].tolist() == [5, 6, 7, 90, 91, 0, 0, 0]


def test_random_position_insertion_matches_reference():
  lens = np.tile(np.array([0, 3, 10, 31, 32]), 400)
  x = np.random.default_rng(1).integers(2, 400, (len(lens), L))
  x[np.arange(L)[None] >= lens[:, None]] = 0
  b = T.make_behaviour([T.TokenTrigger(tokens=(490, 491, 492))], (L,), C, V)
  out = np.asarray(T.apply_trigger(_one(b, 0), jax.random.key(3),
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
  again = T.apply_trigger(_one(b, 0), jax.random.key(3), jnp.asarray(x))
  other = T.apply_trigger(_one(b, 0), jax.random.key(4), jnp.asarray(x))
  np.testing.assert_array_equal(again, out)
  assert np.any(np.asarray(other) != out)


def test_poison_batch_poisons_the_requested_share():
  x, y = _synthetic(20, 5)
  x, y = jnp.asarray(x), jnp.asarray(y)
  b = T.make_behaviour([T.PhraseTrigger(target=3, poison_rate=0.25,
                                        tokens=(60, 61, 62, 63)),
                        None, LabelFlip(source=1, target=2, poison_rate=1.0)],
                       (L,), C, V)
  px, py = jax.jit(T.poison_batch)(_one(b, 0), jax.random.key(0), x, y)
  changed = np.any(np.asarray(px != x), axis=1)
  assert changed.sum() == 5 and np.all(changed[:5])
  np.testing.assert_array_equal(px[:5, :4], np.tile([60, 61, 62, 63], (5, 1)))
  np.testing.assert_array_equal(px[:5, 4:], x[:5, :-4])
  np.testing.assert_array_equal(py[:5], 3)
  np.testing.assert_array_equal(py[5:], y[5:])
  bx, by = T.poison_batch(_one(b, 1), jax.random.key(0), x, y)   # benign
  np.testing.assert_array_equal(bx, x)
  np.testing.assert_array_equal(by, y)
  fx, fy = T.poison_batch(_one(b, 2), jax.random.key(0), x, y)
  np.testing.assert_array_equal(fx, x)
  np.testing.assert_array_equal(fy, np.where(np.asarray(y) == 1, 2, y))


# ----------------------------------------------------------------------------
# Behaviours and specs.


def test_behaviour_arrays_and_drawn_triggers():
  specs = [T.TokenTrigger(target=1, count=2), T.PhraseTrigger(target=2),
           None, LabelFlip(source=0, target=3)]
  b = T.make_behaviour(specs, (L,), C, V, seed=7)
  assert b.size == 4 and b.names() == ["token", "phrase", None, "label_flip"]
  np.testing.assert_array_equal(b.malicious, [True, True, False, True])
  assert b.trigger.shape == (4, 4) and b.trigger.dtype == jnp.int32
  np.testing.assert_array_equal(b.trigger_len, [2, 4, 2, 0])
  np.testing.assert_array_equal(b.position, [-1, 0, -1, 0])
  np.testing.assert_allclose(b.poison_rate, [0.1, 0.1, 0.0, 1.0])
  tok = np.asarray(b.trigger[0, :2])
  assert np.all(tok >= V - 50) and len(set(tok)) == 2     # rarest 10 %
  phrase = np.asarray(b.trigger[1])
  assert np.all((phrase >= 2 + 49) & (phrase < 2 + 199))   # mid band
  # The benign provider carries the reference (first malicious) trigger type.
  assert int(b.target[2]) == 1 and np.all(np.asarray(b.trigger[2, :2]) >= 450)
  again = T.make_behaviour(specs, (L,), C, V, seed=7)
  np.testing.assert_array_equal(again.trigger, b.trigger)


def test_each_malicious_provider_has_its_own_backdoor():
  specs = T.population_specs(10, 6, "token", num_classes=C, seed=1)
  assert specs[6:] == [None] * 4
  b = T.make_behaviour(specs, (L,), C, V, seed=1)
  assert len(set(np.asarray(b.trigger[:6, 0]).tolist())) > 1
  assert len(set(np.asarray(b.target[:6]).tolist())) > 1
  np.testing.assert_array_equal(b.poison_rate[6:], 0.0)
  shared = T.population_specs(6, 4, "phrase", own_backdoor=False,
                              num_classes=C, seed=1, target=2)
  b = T.make_behaviour(shared, (L,), C, V, seed=1)
  assert len({tuple(r) for r in np.asarray(b.trigger[:4]).tolist()}) == 1
  np.testing.assert_array_equal(b.target[:4], 2)


def test_scaling_is_compiled_in_only_when_used():
  plain = T.make_behaviour([T.TokenTrigger(), None], (L,), C, V)
  scaled = T.make_behaviour([T.TokenTrigger(scale=3.0), None], (L,), C, V)
  start, end = {"w": jnp.ones((2, 3))}, {"w": jnp.full((2, 3), 1.5)}
  out = jax.vmap(T.make_hooks(scaled).finalize)(scaled, start, end)
  np.testing.assert_allclose(out["w"][0], 2.5)
  np.testing.assert_allclose(out["w"][1], 1.5)
  assert T.make_hooks(plain).finalize is train.Hooks().finalize


@pytest.mark.parametrize("spec, field", [
    (T.TokenTrigger(target=4), "token.target"),
    (T.TokenTrigger(target=-1), "token.target"),
    (T.PhraseTrigger(target=1.5), "phrase.target"),
    (T.TokenTrigger(poison_rate=1.5), "token.poison_rate"),
    (T.PhraseTrigger(poison_rate=float("nan")), "phrase.poison_rate"),
    (T.TokenTrigger(tokens=(V,)), "token.tokens"),
    (T.TokenTrigger(tokens=(0,)), "token.tokens"),
    (T.PhraseTrigger(tokens=(5, 1, 7)), "phrase.tokens"),
    (T.PhraseTrigger(tokens=()), "phrase.tokens"),
    (T.TokenTrigger(tokens=tuple(range(2, 2 + L + 1))), "token.tokens"),
    (T.TokenTrigger(position=L), "token.position"),
    (T.PhraseTrigger(position=-1), "phrase.position"),
    (T.PhraseTrigger(position="end"), "phrase.position"),
    (T.TokenTrigger(count=0), "token.count"),
    (T.PhraseTrigger(length=L + 1), "phrase.length"),
    (T.TokenTrigger(scale=0.0), "token.scale"),
    (LabelFlip(source=2, target=2), "label_flip.source"),
])
def test_bad_attack_specs_name_the_field(spec, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    T.make_behaviour([spec, None], (L,), C, V)


def test_bad_population_arguments():
  with pytest.raises(ConfigError, match="malicious"):
    T.population_specs(4, 5, "token")
  with pytest.raises(ConfigError, match="attack"):
    T.population_specs(4, 2, "badnets")
  with pytest.raises(ConfigError, match="attack"):
    T.population_specs(4, 2, "token", length=3)
  with pytest.raises(ConfigError, match="vocab_size"):
    T.make_behaviour([T.TokenTrigger()], (L,), C, 2)
  with pytest.raises(ConfigError, match="input_shape"):
    T.make_behaviour([T.TokenTrigger()], (8, 8, 1), C, V)


# ----------------------------------------------------------------------------
# Models.


def test_text_model_arguments_are_checked():
  with pytest.raises(ConfigError, match="vocab_size"):
    models.get_model("text_cnn", C, (L,))
  with pytest.raises(ConfigError, match="vocab_size"):
    models.get_model("text_transformer", C, (L,), vocab_size=2)
  with pytest.raises(ConfigError, match="input_shape"):
    models.get_model("text_cnn", C, (8, 8, 1), vocab_size=V)
  with pytest.raises(ConfigError, match="input_shape"):
    models.get_model("cnn", C, (L,))
  with pytest.raises(ConfigError, match="vocab_size"):
    models.get_model("mlp", C, (8, 8, 1), vocab_size=V)
  assert models.get_model("mlp", C, (8, 8, 1)).vocab_size is None


@pytest.mark.parametrize("name", models.TEXT_MODELS)
def test_text_models_ignore_padding(name):
  """Logits and features of a text do not depend on the padding after it."""
  model = models.get_model(name, C, (48,), vocab_size=V)
  params, state = model.init(jax.random.key(0))
  assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.float32
  x, _ = _synthetic(8, 2)                       # L = 32, lengths < 26
  x[0] = np.arange(100, 100 + L)                # and one text of length L
  padded = np.pad(x, ((0, 0), (0, 16)))
  predict = jax.jit(model.predict)
  logits, feats = predict(params, state, jnp.asarray(x))
  logits_p, feats_p = predict(params, state, jnp.asarray(padded))
  assert logits.shape == (8, C) and feats.shape[0] == 8
  np.testing.assert_allclose(logits, logits_p, atol=1e-5)
  np.testing.assert_allclose(feats, feats_p, atol=1e-5)
  # An all-padding text is finite; the bf16 flag changes the numbers slightly.
  empty = predict(params, state, jnp.zeros((8, 48), jnp.int32))[0]
  assert np.all(np.isfinite(np.asarray(empty)))
  apply = jax.jit(lambda p, s, x: model.apply(p, s, x, bf16=jnp.bool_(True)))
  (lb, _), _ = apply(params, state, jnp.asarray(x))
  diff = float(jnp.max(jnp.abs(lb - logits)))
  assert 0 < diff < 0.1


# ----------------------------------------------------------------------------
# Training.


def _population():
  return [None, None, T.TokenTrigger(target=1),
          T.PhraseTrigger(target=2), T.TokenTrigger(target=3, count=2,
                                                    position=5),
          T.PhraseTrigger(target=0, position="random", scale=2.0),
          LabelFlip(source=1, target=3)]


@pytest.mark.parametrize("name", models.TEXT_MODELS)
def test_mixed_population_is_one_compiled_sub_run(data, name):
  (x_train, y_train), _ = data
  behaviour = T.make_behaviour(_population(), (L,), C, V)
  hooks = T.make_hooks(behaviour)
  traces = []

  def counting_poison(b, key, x, y):
    traces.append(1)   # runs only while tracing
    return hooks.poison_batch(b, key, x, y)

  model = models.get_model(name, C, (L,), vocab_size=V)
  trainer = train.make_trainer(
      model, train.TrainConfig(),
      hooks=hooks._replace(poison_batch=counting_poison))
  n = behaviour.size
  pop = trainer.init(jax.random.key(0), n)
  x, y = jnp.asarray(x_train), jnp.asarray(y_train)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
  rng = np.random.default_rng(0)
  for s in range(3):
    schedule = jnp.asarray(rng.integers(0, len(y), (2, 16)), jnp.int32)
    pop, losses = trainer.sub_run(pop, x, y, schedule,
                                  train.provider_keys(jax.random.key(s), n),
                                  div, behaviour)
  assert len(traces) == 1
  assert trainer.sub_run._cache_size() == 1
  assert np.all(np.isfinite(np.asarray(losses)))
  assert len({np.asarray(l).tobytes()
              for l in jax.tree_util.tree_leaves(pop.params)[0]}) == n


def test_asr_matches_manual_computation(data):
  _, (x_test, y_test) = data
  model = models.get_model("text_cnn", C, (L,), vocab_size=V)
  params, state = model.init(jax.random.key(0))
  b = T.make_behaviour([T.TokenTrigger(target=2)], (L,), C, V)
  asr = T.attack_success_rate(model, _stack(params), _stack(state), b,
                              x_test, y_test, batch_size=300, seed=5)
  again = T.attack_success_rate(model, _stack(params), _stack(state), b,
                                x_test, y_test, batch_size=300, seed=5)
  assert asr[0] == again[0]
  hits = eligible = 0
  predict = jax.jit(lambda x: model.predict(params, state, x)[0])
  trigger = jax.jit(T.apply_trigger)
  for start in range(0, len(y_test), 300):
    xb, yb = x_test[start:start + 300], y_test[start:start + 300]
    key = jax.random.fold_in(jax.random.key(5), start)
    xt = trigger(_one(b, 0), key, jnp.asarray(xb))
    pred = np.argmax(np.asarray(predict(xt)), -1)
    hits += np.sum((pred == 2) & (yb != 2))
    eligible += np.sum(yb != 2)
  assert abs(asr[0] - hits / eligible) < 1e-6


def test_text_backdoors_work(data):
  """A short full run: attackers reach a high ASR, benign models do not."""
  (x_train, y_train), (x_test, y_test) = data
  specs = _population()
  behaviour = T.make_behaviour(specs, (L,), C, V)
  model = models.get_model("text_cnn", C, (L,), vocab_size=V)
  steps, k, n = 300, 25, len(specs)
  cfg = train.TrainConfig(learning_rate=0.05, schedule="cosine",
                          total_steps=steps)
  trainer = train.make_trainer(model, cfg, hooks=T.make_hooks(behaviour))
  pop = trainer.init(jax.random.key(0), n)
  x, y = jnp.asarray(x_train), jnp.asarray(y_train)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
  for s in range(steps // k):
    schedule = jnp.asarray(np.random.default_rng([0, s]).integers(
        0, len(y), (k, 32)), jnp.int32)
    pop, _ = trainer.sub_run(pop, x, y, schedule,
                             train.provider_keys(jax.random.key(s), n), div,
                             behaviour)
  acc = train.evaluate(model, pop.params, pop.model_state, x_test, y_test)
  asr = T.attack_success_rate(model, pop.params, pop.model_state, behaviour,
                              x_test, y_test)
  report = {i: (type(s).__name__, round(float(acc[i]), 3),
                round(float(asr[i]), 3)) for i, s in enumerate(specs)}
  benign_acc = acc[:2].mean()
  assert benign_acc > 0.9, report
  assert np.all(asr[:2] <= 0.1), report
  for i, spec in enumerate(specs):
    if spec is None:
      continue
    assert asr[i] >= 0.9, report
    if isinstance(spec, LabelFlip):
      # Misclassifying the source class IS the attack: compare accuracy on
      # the other classes.
      keep = y_test != spec.source
      sub = train.evaluate(model, pop.params, pop.model_state,
                           x_test[keep], y_test[keep])
      assert sub[i] >= sub[:2].mean() - 0.02, (report, sub)
    else:
      assert acc[i] >= benign_acc - 0.02, report
