"""Tests of the one interface of the attack families, on images and text."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import models
from jaxrep.core import rng
from jaxrep.core.errors import ConfigError
from jaxrep.population import divergence as div_lib
from jaxrep.population.behaviour import Hooks
from jaxrep.population.families.image import (IMAGE, BadNets, Blend, Scaling,
                                              Warp)
from jaxrep.population.families.text import TEXT, PhraseTrigger, TokenTrigger
from jaxrep.population.specs import LabelFlip
from jaxrep.train import trainer as train

V, L = 500, 32     # text: vocabulary size, tokens per example
# family, input shape, classes, vocabulary size, model
SETTINGS = {"image": (IMAGE, (8, 8, 1), 10, None, "mlp"),
            "text": (TEXT, (L,), 4, V, "text_cnn")}
MIXED = {  # benign first, then every attack of the family
    "image": [None, BadNets(target=3), Blend(target=5),
              LabelFlip(source=1, target=7), Scaling(target=2, factor=3.0),
              Warp(target=4)],
    "text": [None, TokenTrigger(target=1), PhraseTrigger(target=2, scale=3.0),
             LabelFlip(source=1, target=3)],
}
MODALITIES = sorted(SETTINGS)


def _behaviour(modality, specs=None, **kwargs):
  family, shape, classes, vocab, _ = SETTINGS[modality]
  specs = MIXED[modality] if specs is None else specs
  return family.make_behaviour(specs, shape, classes, vocab, **kwargs)


def _data(modality, n, seed=0):
  """n random inputs of the modality (texts right-padded) and labels."""
  _, shape, classes, _, _ = SETTINGS[modality]
  r = np.random.default_rng(seed)
  y = jnp.asarray(r.integers(0, classes, n), jnp.int32)
  if modality == "image":
    return jnp.asarray(r.uniform(size=(n, *shape)), jnp.float32), y
  x = r.integers(2, V, (n, L))
  x[np.arange(L)[None] >= r.integers(4, L, n)[:, None]] = 0
  return jnp.asarray(x, jnp.int32), y


def _model(modality):
  _, shape, classes, vocab, name = SETTINGS[modality]
  return models.get_model(name, classes, shape, vocab_size=vocab)


@pytest.mark.parametrize("modality", MODALITIES)
def test_behaviour_is_one_pytree_of_per_provider_arrays(modality):
  specs = MIXED[modality]
  b = _behaviour(modality, seed=3)
  n = len(specs)
  assert b.size == n
  assert b.names() == [None] + [s.name for s in specs[1:]]
  np.testing.assert_array_equal(b.malicious, [s is not None for s in specs])
  assert all(leaf.shape[0] == n for leaf in jax.tree_util.tree_leaves(b))
  flips = [isinstance(s, LabelFlip) for s in specs]
  np.testing.assert_array_equal(b.is_attack("label_flip"), flips)
  np.testing.assert_array_equal(b.source, np.where(flips, 1, -1))
  np.testing.assert_array_equal(
      b.scale, [3.0 if getattr(s, "scale", 1.0) != 1.0 else 1.0
                for s in specs])
  np.testing.assert_array_equal(b.poison_rate[0], 0.0)
  # The benign provider carries the reference trigger: the first attacker's.
  assert int(b.target[0]) == specs[1].target
  again = _behaviour(modality, seed=3)
  for x, y in zip(jax.tree_util.tree_leaves(b),
                  jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("modality", MODALITIES)
def test_benign_population_carries_the_family_reference(modality):
  family, shape, classes, vocab, _ = SETTINGS[modality]
  b = family.benign(3, shape, classes, vocab)
  reference = family.make_behaviour([family.reference], shape, classes, vocab)
  assert b.names() == [None] * 3 and not b.malicious.any()
  np.testing.assert_array_equal(b.poison_rate, 0.0)
  for x, y in zip(jax.tree_util.tree_leaves(b.trigger),
                  jax.tree_util.tree_leaves(reference.trigger)):
    np.testing.assert_array_equal(x[0], y[0])


@pytest.mark.parametrize("modality", MODALITIES)
def test_mixed_population_is_one_compiled_sub_run(modality):
  behaviour = _behaviour(modality)
  family = SETTINGS[modality][0]
  hooks = family.make_hooks(behaviour)
  traces = []

  def counting_poison(b, key, x, y):
    traces.append(1)   # runs only while tracing
    return hooks.poison_batch(b, key, x, y)

  trainer = train.make_trainer(
      _model(modality), train.TrainConfig(),
      hooks=hooks._replace(poison_batch=counting_poison))
  n = behaviour.size
  pop = trainer.init(jax.random.key(0), n)
  x, y = _data(modality, 256)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
  schedules = np.random.default_rng(0).integers(0, len(y), (3, 2, 16))
  for s, schedule in enumerate(schedules):
    pop, losses = trainer.sub_run(pop, x, y, jnp.asarray(schedule, jnp.int32),
                                  train.provider_keys(jax.random.key(s), n),
                                  div, behaviour)
  # One trace to size the provider block (abstract), one to compile.
  assert len(traces) == 2
  assert trainer.sub_run._cache_size() == 1
  assert np.all(np.isfinite(np.asarray(losses)))
  assert len({np.asarray(l).tobytes()
              for l in jax.tree_util.tree_leaves(pop.params)[0]}) == n


@pytest.mark.parametrize("modality", MODALITIES)
def test_model_replacement_is_compiled_in_only_when_used(modality):
  family = SETTINGS[modality][0]
  scaled = _behaviour(modality)
  start = {"w": jnp.ones((scaled.size, 3))}
  end = {"w": jnp.full((scaled.size, 3), 1.5)}
  out = jax.vmap(family.make_hooks(scaled).finalize)(scaled, start, end)
  want = np.where(np.asarray(scaled.scale) == 3.0, 2.5, 1.5)
  np.testing.assert_allclose(out["w"], np.repeat(want[:, None], 3, 1))
  plain = _behaviour(modality, [s for s in MIXED[modality]
                                if getattr(s, "scale", 1.0) == 1.0])
  assert family.make_hooks(plain).finalize is Hooks().finalize


@pytest.mark.parametrize("modality", MODALITIES)
def test_unscaled_providers_return_their_trained_model_exactly(modality):
  # start + 1 * (end - start) is not end in float32 for these values, so
  # this fails if a provider with scale 1 goes through the arithmetic.
  family = SETTINGS[modality][0]
  scaled = _behaviour(modality)
  n = scaled.size
  rng = np.random.default_rng(0)
  start = {"w": jnp.asarray(rng.normal(size=(n, 64)) * 10, jnp.float32)}
  end = {"w": jnp.asarray(rng.normal(size=(n, 64)) * 1e-3, jnp.float32)}
  assert np.any(np.asarray(start["w"] + (end["w"] - start["w"]))
                != np.asarray(end["w"]))
  out = jax.vmap(family.make_hooks(scaled).finalize)(scaled, start, end)
  unscaled = np.asarray(scaled.scale) == 1.0
  assert unscaled.any() and not unscaled.all()
  np.testing.assert_array_equal(np.asarray(out["w"])[unscaled],
                                np.asarray(end["w"])[unscaled])


@pytest.mark.parametrize("modality", MODALITIES)
def test_asr_matches_manual_computation(modality):
  family = SETTINGS[modality][0]
  model = _model(modality)
  b = _behaviour(modality)
  n = b.size
  params, state = jax.vmap(model.init)(
      train.provider_keys(jax.random.key(0), n))
  x, y = _data(modality, 600, seed=1)
  asr = family.attack_success_rate(model, params, state, b, x, y,
                                   batch_size=300, seed=5)
  predict, trigger = jax.jit(model.predict), jax.jit(family.apply_trigger)
  for i in range(n):
    bi = jax.tree_util.tree_map(lambda a: a[i], b)
    p, s = jax.tree_util.tree_map(lambda a: a[i], (params, state))
    flip = bool(bi.is_attack("label_flip"))
    hits = eligible = 0
    for start in range(0, len(y), 300):
      xb, yb = x[start:start + 300], np.asarray(y[start:start + 300])
      xt = xb if flip else trigger(bi, rng.text_asr(5, start), xb)
      pred = np.argmax(np.asarray(predict(p, s, xt)[0]), -1)
      ok = yb == int(bi.source) if flip else yb != int(bi.target)
      hits += np.sum((pred == int(bi.target)) & ok)
      eligible += np.sum(ok)
    assert abs(asr[i] - hits / eligible) < 1e-6, (i, asr[i], hits / eligible)


@pytest.mark.parametrize("modality, spec, field", [
    ("image", BadNets(size=9), "badnets.size"),
    ("image", BadNets(target=10), "badnets.target"),
    ("image", BadNets(target=-1), "badnets.target"),
    ("image", BadNets(poison_rate=1.5), "badnets.poison_rate"),
    ("image", BadNets(location="middle"), "badnets.location"),
    ("image", BadNets(location=(7, 7), size=2), "badnets.location"),
    ("image", BadNets(pattern="stripes"), "badnets.pattern"),
    ("image", Blend(alpha=-0.1), "blend.alpha"),
    ("image", Blend(poison_rate=float("nan")), "blend.poison_rate"),
    ("image", LabelFlip(source=3, target=3), "label_flip.source"),
    ("image", Scaling(factor=0.0), "scaling.factor"),
    ("image", Scaling(size=0), "scaling.size"),
    ("image", Warp(strength=100.0), "warp.strength"),
    ("image", Warp(grid=1), "warp.grid"),
    ("text", TokenTrigger(target=4), "token.target"),
    ("text", TokenTrigger(target=-1), "token.target"),
    ("text", PhraseTrigger(target=1.5), "phrase.target"),
    ("text", TokenTrigger(poison_rate=1.5), "token.poison_rate"),
    ("text", PhraseTrigger(poison_rate=float("nan")), "phrase.poison_rate"),
    ("text", TokenTrigger(tokens=(V,)), "token.tokens"),
    ("text", TokenTrigger(tokens=(0,)), "token.tokens"),
    ("text", PhraseTrigger(tokens=(5, 1, 7)), "phrase.tokens"),
    ("text", PhraseTrigger(tokens=()), "phrase.tokens"),
    ("text", TokenTrigger(tokens=tuple(range(2, 2 + L + 1))), "token.tokens"),
    ("text", TokenTrigger(position=L), "token.position"),
    ("text", PhraseTrigger(position=-1), "phrase.position"),
    ("text", PhraseTrigger(position="end"), "phrase.position"),
    ("text", TokenTrigger(count=0), "token.count"),
    ("text", PhraseTrigger(length=L + 1), "phrase.length"),
    ("text", TokenTrigger(scale=0.0), "token.scale"),
    ("text", TokenTrigger(seed=1.5), "token.seed"),
    ("text", LabelFlip(source=2, target=2), "label_flip.source"),
])
def test_bad_attack_specs_name_the_field(modality, spec, field):
  with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
    _behaviour(modality, [spec, None])


@pytest.mark.parametrize("modality, call, field", [
    ("image", lambda f: f.population_specs(4, 2, "trojannn"), "attack"),
    ("image", lambda f: f.population_specs(4, 2, "token"), "attack"),
    ("text", lambda f: f.population_specs(4, 2, "badnets"), "attack"),
    ("text", lambda f: f.population_specs(4, 2, "token", length=3), "attack"),
    ("image", lambda f: f.make_behaviour([TokenTrigger()], (8, 8, 1), 10),
     "attack"),
    ("image", lambda f: f.make_behaviour([], (8, 8, 1), 10), "providers"),
    ("image", lambda f: f.make_behaviour([BadNets()], (L,), 10),
     "input_shape"),
    ("text", lambda f: f.make_behaviour([TokenTrigger()], (L,), 4, 2),
     "vocab_size"),
    ("text", lambda f: f.make_behaviour([TokenTrigger()], (8, 8, 1), 4, V),
     "input_shape"),
])
def test_bad_family_arguments_name_the_field(modality, call, field):
  with pytest.raises(ConfigError, match=f"^{field}:"):
    call(SETTINGS[modality][0])
