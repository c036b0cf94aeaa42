"""Tests of attack specs: flags from field metadata, drawing a population."""

import dataclasses
from typing import ClassVar

import numpy as np
import pytest

from jaxrep.config import AttackConfig
from jaxrep.core import validate as V
from jaxrep.core.errors import ConfigError
from jaxrep.population import build
from jaxrep.population import specs as S
from jaxrep.population.families.image import BadNets, Blend, Scaling
from jaxrep.population.families.text import PhraseTrigger, TokenTrigger

# The main job's attack flags: (default, attacks reading them).
FLAGS = {
    "trigger_size": (2, ("badnets", "scaling")),
    "trigger_location": ("random", ("badnets", "scaling")),
    "blend_alpha": (0.2, ("blend",)),
    "scale_factor": (1.5, ("scaling",)),
    "warp_strength": (1.5, ("warp",)),
    "label_flip_source": (-1, ("label_flip",)),
    "noise_eps": (0.15, ("keyed_noise",)),
    "key_eps": (0.05, ("secret_key",)),
    "key_units": (4, ("secret_key",)),
    "order_mode": ("by_class", ("data_order",)),
    "trigger_tokens": (0, ("token", "phrase")),
}


def test_options_come_from_the_specs_fields():
  assert {k: (o.default, o.attacks) for k, o in build.OPTIONS.items()} == FLAGS
  for option in build.OPTIONS.values():
    assert option.help and option.check(option.default) is None
  assert build.OPTIONS["trigger_location"].check("middle") is not None
  assert build.OPTIONS["label_flip_source"].check(-2) is not None


def _values(cls, **flags):
  attack = AttackConfig(name=cls.name, options=tuple(flags.items()))
  return S.knob_values(cls, lambda flag: build.option(attack, flag))


def test_flag_values_map_to_spec_fields():
  assert _values(BadNets) == {"size": 2, "location": "random"}
  assert _values(Scaling, trigger_location="top_left", scale_factor=3.0) == {
      "size": 2, "location": "top_left", "pattern": "checkerboard",
      "factor": 3.0}
  assert _values(Blend, blend_alpha=0.5) == {"alpha": 0.5}
  # -1 / 0 keep the spec's own (drawn or default) value.
  assert _values(S.LabelFlip) == {}
  assert _values(S.LabelFlip, label_flip_source=3) == {"source": 3}
  assert _values(TokenTrigger) == {} == _values(PhraseTrigger)
  assert _values(TokenTrigger, trigger_tokens=3) == {"count": 3}
  assert _values(PhraseTrigger, trigger_tokens=3) == {"length": 3}


def test_a_new_attack_brings_its_own_flag():
  @dataclasses.dataclass(frozen=True)
  class Noise(S.AttackSpec):
    sigma: float = S.field(0.1, knob=S.Knob("noise_sigma", 0.1, "noise",
                                            V.real(0.0, 1.0)))
    name: ClassVar[str] = "noise"

  options = S.options([BadNets, Noise])
  assert list(options) == ["trigger_size", "trigger_location", "noise_sigma"]
  assert options["noise_sigma"].attacks == ("noise",)
  specs = S.draw_specs(Noise, 2, 1, own_backdoor=False, num_classes=10,
                       seed=0, overrides={"sigma": 0.3})
  assert sorted(specs, key=lambda s: s is None) == [Noise(sigma=0.3), None]


def test_one_flag_is_one_knob():
  @dataclasses.dataclass(frozen=True)
  class Other(S.AttackSpec):
    size: int = S.field(3, knob=S.Knob("trigger_size", 3, "other",
                                       V.integer(1)))
    name: ClassVar[str] = "other"

  with pytest.raises(ValueError, match="trigger_size"):
    S.options([BadNets, Other])


def test_own_backdoors_draw_their_labels_and_take_own_values():
  specs = S.draw_specs(S.LabelFlip, 8, 6, own_backdoor=True, num_classes=10,
                       seed=1, overrides={})
  drawn = [s for s in specs if s is not None]
  assert len(drawn) == 6
  assert len({s.target for s in drawn}) > 1
  assert all(s.source != s.target for s in drawn)
  patches = S.draw_specs(BadNets, 3, 2, own_backdoor=True, num_classes=10,
                         seed=1, overrides={"size": 3})
  assert sum(s is not None for s in patches) == 2
  assert all(s.location == s.pattern == "random" and s.size == 3
             for s in patches if s is not None)
  again = S.draw_specs(BadNets, 3, 2, own_backdoor=True, num_classes=10,
                       seed=1, overrides={"size": 3})
  assert again == patches


def test_shared_backdoors_share_the_population_seed():
  specs = S.draw_specs(PhraseTrigger, 4, 3, own_backdoor=False,
                       num_classes=4, seed=7, overrides={"target": 2})
  assert [s for s in specs if s is not None] == [
      PhraseTrigger(target=2, seed=7)] * 3


def test_which_providers_are_malicious_is_drawn_from_the_seed():
  def ids(n, m, seed):
    specs = S.draw_specs(BadNets, n, m, own_backdoor=True, num_classes=10,
                         seed=seed, overrides={})
    return [i for i, s in enumerate(specs) if s is not None]
  assert ids(16, 8, 0) == ids(16, 8, 0) == S.malicious_ids(16, 8, 0)
  draws = {tuple(ids(16, 8, seed)) for seed in range(20)}
  assert len(draws) == 20                      # a new subset per seed
  assert tuple(range(8)) not in draws          # not the lowest ids
  assert all(len(d) == 8 for d in draws)
  # Every provider id is malicious in some seeds and benign in others.
  counts = np.bincount(np.concatenate([list(d) for d in draws]), minlength=16)
  assert 0 < counts.min() and counts.max() < 20
  assert ids(5, 0, 3) == [] and ids(5, 5, 3) == list(range(5))


def test_bad_population_arguments_name_the_field():
  with pytest.raises(ConfigError, match="malicious"):
    S.draw_specs(BadNets, 4, 5, own_backdoor=True, num_classes=10, seed=0,
                 overrides={})
  with pytest.raises(ConfigError, match="providers"):
    S.draw_specs(BadNets, 0, 0, own_backdoor=True, num_classes=10, seed=0,
                 overrides={})
  with pytest.raises(ConfigError, match="attack: blend has no field"):
    S.draw_specs(Blend, 4, 2, own_backdoor=True, num_classes=10, seed=0,
                 overrides={"size": 3})
