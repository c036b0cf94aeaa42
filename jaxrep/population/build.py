"""A simulation's population: the attack family of the dataset's modality,
the attack options of the main job, and the per-provider behaviour.

This is the one entry the protocol uses; the families (image and text
attacks, `population.families`) sit behind it. The attack options (the main
job's attack flags) are those the attacks' spec fields declare
(`specs.Knob`), so an attack brings its own flags.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxrep import config as config_lib
from jaxrep.core import trees
from jaxrep.core import validate as V
from jaxrep.core.errors import require
from jaxrep.population import specs as specs_lib
from jaxrep.population.families.image import IMAGE
from jaxrep.population.families.text import TEXT
from jaxrep.population.family import Family

AUTO = config_lib.AUTO
FAMILIES = {"image": IMAGE, "text": TEXT}
DEFAULT_ATTACK = {"image": "badnets", "text": "token"}
ATTACKS = tuple(dict.fromkeys(a for f in FAMILIES.values() for a in f.attacks))
OPTIONS: dict[str, specs_lib.Option] = specs_lib.options(
    dict.fromkeys(cls for f in FAMILIES.values() for cls in f.specs))


def option(attack: config_lib.AttackConfig, name: str) -> Any:
  return attack.option(name, OPTIONS[name].default)


def with_defaults(attack: config_lib.AttackConfig) -> config_lib.AttackConfig:
  """The attack section with every option present (defaults filled in)."""
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
  attacks = FAMILIES[modality].attacks
  require(attack in attacks, "attack",
          f"{attack} is not an attack on {modality} (dataset {dataset}); use "
          f"one of {', '.join(attacks)}")
  return attack


def attack_specs(config, num_classes: int, input_shape,
                 vocab_size: int | None = None):
  """Per-provider attack specs (None = benign) of a resolved config; text
  attacks when `vocab_size` is given. Which providers are malicious is drawn
  from the seed; each of them draws its own backdoor; --poison_rate and
  --target_label (unless -1: the attack's own default, each provider's own
  target) and the attack's own flags fix fields for all of them."""
  family = FAMILIES["image" if vocab_size is None else "text"]
  a = config.attack
  fixed = {}
  if a.poison_rate != -1:
    fixed["poison_rate"] = a.poison_rate
  if a.target_label >= 0:
    fixed["target"] = a.target_label
  fixed.update(specs_lib.knob_values(family.spec_class(a.name),
                                     lambda flag: option(a, flag)))
  specs = family.population_specs(
      config.protocol.providers, a.malicious, a.name, own_backdoor=True,
      num_classes=num_classes, seed=config.seed, **fixed)
  for spec in specs:
    if spec is not None:
      family.validate_spec(spec, input_shape, num_classes, vocab_size)
  return specs


# Attacks that plant their backdoor into the model a provider returns (they
# fit it to the training inputs), and the models they can plant into.
PLANTED_MODELS = {"secret_key": ("mlp",)}


def make_behaviour(config, ds):
  """The per-provider behaviour of a resolved config on its dataset; an
  attack that fits its trigger to the data (secret_key) sees the training
  inputs the providers train on (not the client's held-out probes)."""
  vocab_size = len(ds.vocab) if ds.vocab else None
  models = PLANTED_MODELS.get(config.attack.name)
  if models is not None and config.attack.malicious > 0:
    require(config.model.name in models, "model",
            f"attack {config.attack.name} plants its backdoor into the "
            f"hidden units of an MLP; model {config.model.name} is not "
            f"supported (use --model={' or '.join(models)})")
  specs = attack_specs(config, ds.num_classes, ds.input_shape, vocab_size)
  data = None
  if models is not None:
    train_examples, _ = ds.probe_split(config.detector.probe_size,
                                       config.training.batch_size)
    data = ds.x_train[:train_examples]
  return FAMILIES[ds.modality].make_behaviour(
      specs, ds.input_shape, ds.num_classes, vocab_size, seed=config.seed,
      data=data)


def family(modality: str) -> Family:
  """The attack family of a modality: make_hooks, attack_success_rate,
  benign, ..."""
  return FAMILIES[modality]


def attack_success_rate(model, params, model_state, behaviour, ds):
  """Per-provider ASR of a population's models against their own triggers."""
  return FAMILIES[ds.modality].attack_success_rate(
      model, params, model_state, behaviour, ds.x_test, ds.y_test)


def client_asr(model, params, model_state, behaviour, ds, malicious):
  """ASR of one model against every malicious provider's trigger: (worst,
  per trigger)."""
  if not malicious.any():
    return float("nan"), []
  # Only the malicious providers' triggers: a benign provider's reference
  # trigger says nothing about the client (half the forward passes at 50 %).
  idx = np.flatnonzero(malicious)
  asr = attack_success_rate(model, trees.stack(params, idx.size),
                            trees.stack(model_state, idx.size),
                            trees.take(behaviour, idx), ds)
  per = np.asarray(asr)
  return float(per.max()), [float(v) for v in per]
