"""Tests of the protocol's entry to the population (population.build)."""

import types

import jax
import numpy as np
import pytest

from jaxrep import models
from jaxrep.config import SimConfig
from jaxrep.core import trees
from jaxrep.core.errors import ConfigError
from jaxrep.population import build
from jaxrep.population.families.image import IMAGE, BadNets
from jaxrep.population.families.text import TEXT, TokenTrigger
from jaxrep.population.specs import LabelFlip

# A stand-in text dataset: what build reads of one.
TEXTS = types.SimpleNamespace(modality="text", vocab=["w"] * 100,
                              num_classes=4, input_shape=(16,))


def _config(**flags):
  return SimConfig.from_flat(providers=6, malicious=3, seed=1, **flags)


def _attackers(specs):
  return [s for s in specs if s is not None]


def _specs(config, text=False):
  if text:
    return build.attack_specs(config, 4, (16,), vocab_size=100)
  return build.attack_specs(config, 10, (8, 8, 1))


def test_flags_set_every_attackers_spec():
  specs = _specs(_config(attack="badnets", trigger_size=3,
                         trigger_location="top_left", target_label=5,
                         poison_rate=0.3))
  assert [i for i, s in enumerate(specs) if s is not None] == [0, 1, 3]
  assert _attackers(specs) == [BadNets(
      target=5, poison_rate=0.3, size=3, location="top_left",
      pattern="checkerboard")] * 3
  tokens = _attackers(_specs(_config(attack="token", trigger_tokens=3),
                             text=True))
  assert len(tokens) == 3
  assert all(isinstance(s, TokenTrigger) and s.count == 3 for s in tokens)
  flips = _attackers(_specs(_config(attack="label_flip", label_flip_source=2,
                                    target_label=0)))
  assert all(s.source == 2 and s.target == 0 for s in flips)


def test_poison_rate_minus_one_is_the_attacks_own_default():
  """--poison_rate=-1 (the default): 0.1 of the batch for trigger attacks,
  every source-class example for label_flip; a given rate is every
  attacker's."""
  assert SimConfig().attack.poison_rate == -1
  rates = lambda **f: {s.poison_rate for s in _attackers(_specs(_config(**f)))}
  assert rates(attack="badnets") == {0.1}
  assert rates(attack="label_flip") == {1.0}
  assert rates(attack="label_flip", poison_rate=0.5) == {0.5}
  assert rates(attack="blend", poison_rate=0.0) == {0.0}
  for bad in (-0.5, 1.5, float("nan"), "x"):
    with pytest.raises(ConfigError, match="^poison_rate: must be -1"):
      _config(poison_rate=bad).validate()


def test_by_default_each_attacker_draws_its_own_backdoor():
  specs = _specs(_config(attack="scaling"))
  attackers = _attackers(specs)
  assert {(s.location, s.pattern, s.size, s.factor) for s in attackers} == {
      ("random", "random", 2, 1.5)}
  assert len({s.target for s in attackers}) > 1
  assert specs == _specs(_config(attack="scaling"))
  flips = _attackers(_specs(_config(attack="label_flip"), text=True))
  assert len(flips) == 3 and all(
      isinstance(s, LabelFlip) and s.source != s.target for s in flips)


def test_flags_are_checked_against_the_data():
  with pytest.raises(ConfigError, match="badnets.size"):
    _specs(_config(attack="badnets", trigger_size=9))
  with pytest.raises(ConfigError, match="phrase.length"):
    _specs(_config(attack="phrase", trigger_tokens=17), text=True)


def test_attack_names_and_options_are_validated():
  build.validate_attack(_config(attack="warp", warp_strength=2.0).attack)
  with pytest.raises(ConfigError, match="^attack:"):
    build.validate_attack(_config(attack="trojan").attack)
  with pytest.raises(ConfigError, match="^blend_alpha:"):
    build.validate_attack(_config(blend_alpha=2.0).attack)
  with pytest.raises(ConfigError, match="^trigger_colour:"):
    build.validate_attack(_config(trigger_colour="red").attack)
  assert build.resolve_attack("auto", "text", "fortunes") == "token"
  assert build.resolve_attack("auto", "image", "digits") == "badnets"
  with pytest.raises(ConfigError, match="not an attack on text"):
    build.resolve_attack("blend", "text", "fortunes")


def test_with_defaults_fills_in_every_option():
  attack = build.with_defaults(_config(blend_alpha=0.5).attack)
  options = dict(attack.options)
  assert options == {**{k: o.default for k, o in build.OPTIONS.items()},
                     "blend_alpha": 0.5}
  assert build.option(attack, "blend_alpha") == 0.5


def test_behaviour_of_a_config_on_each_modality(digits):
  config = _config(attack="blend")
  b = build.make_behaviour(config, digits)
  assert b.family is build.family("image") is IMAGE
  assert b.names() == ["blend", "blend", None, "blend", None, None]
  text = build.make_behaviour(_config(attack="phrase"), TEXTS)
  assert text.family is build.family("text") is TEXT
  assert text.trigger.tokens.shape == (6, 4)
  again = IMAGE.make_behaviour(_specs(config), digits.input_shape, 10, seed=1)
  for x, y in zip(b.trigger, again.trigger):
    np.testing.assert_array_equal(x, y)


def test_client_asr_is_the_worst_trigger(digits):
  b = build.make_behaviour(_config(attack="badnets"), digits)
  model = models.get_model("mlp", 10, digits.input_shape)
  params, state = model.init(jax.random.key(0))
  worst, per = build.client_asr(model, params, state, b, digits, b.malicious)
  asr = build.attack_success_rate(model, trees.stack(params, 6),
                                  trees.stack(state, 6), b, digits)
  assert per == [float(v) for v in asr[b.malicious]] and worst == max(per)
  none = build.client_asr(model, params, state, b, digits,
                          np.zeros(6, bool))
  assert np.isnan(none[0]) and none[1] == []
