"""A simulation's population: the attack family of the dataset's modality,
the attack options of the main job, and the per-provider behaviour.

This is the one entry the protocol uses; the families (image and text
attacks) sit behind it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxrep import config as config_lib
from jaxrep.core import validate as V
from jaxrep.core import trees
from jaxrep.core.errors import require
from jaxrep.population import image_attacks
from jaxrep.population import text_attacks

AUTO = config_lib.AUTO
DEFAULT_ATTACK = {"image": "badnets", "text": "token"}
FAMILIES = {"image": image_attacks, "text": text_attacks}
ATTACKS = tuple(dict.fromkeys(image_attacks.ATTACKS + text_attacks.ATTACKS))


class Option(NamedTuple):
  """An attack-specific knob of the main job (a --flag)."""
  default: Any
  help: str
  check: V.Check
  attacks: tuple[str, ...]


OPTIONS: dict[str, Option] = {
    "trigger_size": Option(2, "images: BadNets / scaling patch size in pixels",
                           V.integer(1), ("badnets", "scaling")),
    "trigger_location": Option(
        "random", "top_left, top_right, bottom_left, bottom_right, center or "
        "random (each provider its own)", V.one_of(image_attacks.LOCATIONS),
        ("badnets", "scaling")),
    "blend_alpha": Option(0.2, "blend attack strength", V.real(0.0, 1.0),
                          ("blend",)),
    "scale_factor": Option(2.0, "model replacement factor of the scaling "
                           "attack", V.real(0.0, 1e6, low_open=True),
                           ("scaling",)),
    "warp_strength": Option(1.5, "warp attack displacement in pixels",
                            V.real(0.0, 1e6, low_open=True), ("warp",)),
    "label_flip_source": Option(-1, "label_flip source class; -1: each "
                                "provider its own", V.integer(-1),
                                ("label_flip",)),
    "trigger_tokens": Option(0, "text: trigger length in tokens (0: token 1, "
                             "phrase 4)", V.integer(0), ("token", "phrase")),
}


def option(attack: config_lib.AttackConfig, name: str) -> Any:
  return attack.option(name, OPTIONS[name].default)


def with_defaults(attack: config_lib.AttackConfig) -> config_lib.AttackConfig:
  """The attack section with every option present (defaults filled in)."""
  import dataclasses  # pylint: disable=g-import-not-at-top
  values = {k: option(attack, k) for k in OPTIONS}
  values.update(dict(attack.options))
  return dataclasses.replace(attack, options=tuple(sorted(values.items())))


def validate_attack(attack: config_lib.AttackConfig) -> None:
  """Checks the attack name and its options (ConfigError names the flag)."""
  require(attack.name in ATTACKS + (AUTO,), "attack",
          f"unknown attack {attack.name!r}; choose one of "
          f"{', '.join(ATTACKS + (AUTO,))}")
  for name, value in attack.options:
    require(name in OPTIONS, name,
            f"unknown attack option; known: {', '.join(OPTIONS)}")
    V.require_value(OPTIONS[name].check, name, value)


def resolve_attack(name: str, modality: str, dataset: str) -> str:
  """The concrete attack of `name` ("auto" or a name) for a modality."""
  attack = DEFAULT_ATTACK[modality] if name == AUTO else name
  family = FAMILIES[modality]
  require(attack in family.ATTACKS, "attack",
          f"{attack} is not an attack on {modality} (dataset {dataset}); use "
          f"one of {', '.join(family.ATTACKS)}")
  return attack


def _text_specs(config, num_classes: int, input_shape, vocab_size: int):
  """Specs of the text attacks: each malicious provider draws its own
  trigger tokens (and target unless --target_label is set)."""
  a = config.attack
  overrides: dict[str, Any] = {"poison_rate": a.poison_rate}
  if a.target_label >= 0:
    overrides["target"] = a.target_label
  tokens = option(a, "trigger_tokens")
  if tokens and a.name == "token":
    overrides["count"] = tokens
  if tokens and a.name == "phrase":
    overrides["length"] = tokens
  source = option(a, "label_flip_source")
  if a.name == "label_flip" and source >= 0:
    overrides["source"] = source
  specs = text_attacks.population_specs(
      config.protocol.providers, a.malicious, a.name, own_backdoor=True,
      num_classes=num_classes, seed=config.seed, **overrides)
  for spec in specs:
    if spec is not None:
      text_attacks.validate_spec(spec, input_shape, num_classes, vocab_size)
  return specs


def attack_specs(config, num_classes: int, input_shape,
                 vocab_size: int | None = None):
  """Per-provider attack specs (None = benign) of a resolved config; text
  attacks when `vocab_size` is given."""
  if vocab_size is not None:
    return _text_specs(config, num_classes, input_shape, vocab_size)
  a = config.attack
  overrides: dict[str, Any] = {"poison_rate": a.poison_rate}
  if a.target_label >= 0:
    overrides["target"] = a.target_label
  if a.name in ("badnets", "scaling"):
    location = option(a, "trigger_location")
    overrides.update(size=option(a, "trigger_size"), location=location)
    if location != "random":
      overrides["pattern"] = "checkerboard"
  if a.name == "blend":
    overrides["alpha"] = option(a, "blend_alpha")
  if a.name == "scaling":
    overrides["factor"] = option(a, "scale_factor")
  if a.name == "warp":
    overrides["strength"] = option(a, "warp_strength")
  source = option(a, "label_flip_source")
  if a.name == "label_flip" and source >= 0:
    overrides["source"] = source
  specs = image_attacks.population_specs(
      config.protocol.providers, a.malicious, a.name, own_backdoor=True,
      num_classes=num_classes, seed=config.seed, **overrides)
  for spec in specs:
    if spec is not None:
      image_attacks.validate_spec(spec, input_shape, num_classes)
  return specs


def make_behaviour(config, ds):
  """The per-provider behaviour of a resolved config on its dataset."""
  specs = attack_specs(config, ds.num_classes, ds.input_shape,
                       vocab_size=len(ds.vocab) if ds.vocab else None)
  if ds.modality == "text":
    return text_attacks.make_behaviour(specs, ds.input_shape, ds.num_classes,
                                       len(ds.vocab), seed=config.seed)
  return image_attacks.make_behaviour(specs, ds.input_shape, ds.num_classes,
                                      seed=config.seed)


def family(modality: str):
  """The attack family (module) of a modality: make_hooks,
  attack_success_rate, benign, ..."""
  return FAMILIES[modality]


def make_hooks(behaviour, modality: str):
  return FAMILIES[modality].make_hooks(behaviour)


def attack_success_rate(model, params, model_state, behaviour, ds):
  """Per-provider ASR of a population's models against their own triggers."""
  return FAMILIES[ds.modality].attack_success_rate(
      model, params, model_state, behaviour, ds.x_test, ds.y_test)


def client_asr(model, params, model_state, behaviour, ds, malicious):
  """ASR of one model against every malicious provider's trigger: (worst,
  per trigger)."""
  if not malicious.any():
    return float("nan"), []
  n = behaviour.size
  asr = attack_success_rate(model, trees.stack(params, n),
                            trees.stack(model_state, n), behaviour, ds)
  per = np.asarray(asr)[malicious]
  return float(per.max()), [float(v) for v in per]
