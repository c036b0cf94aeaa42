"""An attack family: the attacks of one input modality behind one interface.

A `Family` holds what is particular to a modality (its spec classes, the
reference trigger of benign providers, how a trigger's arrays are built and
applied) and does everything else the same way for every modality:

    family.population_specs(n, malicious, attack, ...)  # who attacks, how
    b = family.make_behaviour(specs, input_shape, num_classes, vocab_size)
    hooks = family.make_hooks(b)                        # for the trainer
    asr = family.attack_success_rate(model, params, model_state, b, x, y)

The families are `families.image.IMAGE` and `families.text.TEXT`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import require
from jaxrep.population import behaviour as behaviour_lib
from jaxrep.population import specs as specs_lib
from jaxrep.population.behaviour import Behaviour, Hooks
from jaxrep.population.specs import AttackSpec, Inputs, LabelFlip


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
  """The attacks of one modality (see module docstring).

  Attributes:
    modality: "image" or "text".
    specs: the spec classes; the attack of kind k > 0 is specs[k - 1].
    reference: the default reference trigger of benign providers (used only
      to measure their ASR, the base rate a backdoor has to beat) when no
      provider attacks.
    check_inputs(inputs): raises ConfigError if the family cannot attack
      such inputs.
    build_triggers(specs, inputs, rngs, data=None) -> the `Behaviour.trigger`
      arrays of providers running `specs` (one per provider, none None), each
      drawing its random parts from its own stream in `rngs` (`data`: the
      training inputs, for attacks that need them).
    apply_trigger(b, key, x) -> x: a batch with ONE provider's trigger.
    trigger_for(behaviour) -> apply_trigger without the parts nobody in the
      population uses (a module function, so compiled code is reused).
    plant_for(behaviour) -> plant(b, params) -> (params, overwritten), a
      change of the model a provider returns after its training (e.g. the
      secret-key backdoor of `families.image`) and the bool tree of the
      weights it overwrote (their optimizer state restarts with it), or
      None when nobody in the population makes one (nothing is compiled
      in).
  """
  modality: str
  specs: tuple[type, ...]
  reference: AttackSpec
  check_inputs: Callable[[Inputs], None]
  build_triggers: Callable[..., Any]
  apply_trigger: behaviour_lib.Trigger
  trigger_for: Callable[[Behaviour], behaviour_lib.Trigger]
  plant_for: Callable[[Behaviour], Callable | None] = lambda behaviour: None

  @property
  def attacks(self) -> tuple[str, ...]:
    return tuple(cls.name for cls in self.specs)

  def kind(self, attack: str) -> int:
    """The kind code of an attack (-1: not one of this family)."""
    return self.attacks.index(attack) + 1 if attack in self.attacks else -1

  def spec_class(self, attack: str) -> type:
    require(attack in self.attacks, "attack",
            f"unknown {self.modality} attack {attack!r}; choose one of "
            f"{', '.join(self.attacks)}")
    return self.specs[self.kind(attack) - 1]

  def validate_spec(self, spec: AttackSpec, input_shape, num_classes: int,
                    vocab_size: int | None = None) -> None:
    """Raises ConfigError naming the field of an unusable attack spec."""
    require(isinstance(spec, self.specs), "attack",
            f"unknown {self.modality} attack spec {spec!r}; use one of "
            f"{', '.join(self.attacks)}")
    inputs = Inputs(tuple(input_shape), num_classes, vocab_size)
    self.check_inputs(inputs)
    specs_lib.check_common(spec, num_classes)
    spec.check(inputs)

  def population_specs(self, n: int, malicious: int, attack: str, *,
                       own_backdoor: bool = True, num_classes: int = 10,
                       seed: int = 0, **overrides
                       ) -> list[AttackSpec | None]:
    """Specs for n providers of whom `malicious` (a random subset drawn
    from `seed`, see `specs.draw_specs`) run `attack`.

    With own_backdoor (the RTTD setting), each malicious provider gets its
    own random target label (label_flip: and source) and its own trigger
    (drawn from its own stream in make_behaviour); without it they share the
    spec's target and trigger. `overrides` fix any field for all of them.
    """
    return specs_lib.draw_specs(
        self.spec_class(attack), n, malicious, own_backdoor=own_backdoor,
        num_classes=num_classes, seed=seed, overrides=overrides)

  def make_behaviour(self, specs: Sequence[AttackSpec | None], input_shape,
                     num_classes: int, vocab_size: int | None = None, *,
                     seed: int = 0, reference: AttackSpec | None = None,
                     data=None) -> Behaviour:
    """Stacks per-provider attack specs (None = benign) into a Behaviour.

    Random parts of provider i's trigger come from the `trigger` stream of
    (seed, i), so each provider has its own trigger and the result is
    reproducible. Benign providers carry the `reference` trigger (default:
    the first malicious provider's spec, else the family's). `data`: the
    training inputs the providers train on (an attack that fits its trigger
    to the data, e.g. secret_key, needs them; the others ignore them).
    """
    require(len(specs) >= 1, "providers", "need at least one provider")
    for spec in specs:
      if spec is not None:
        self.validate_spec(spec, input_shape, num_classes, vocab_size)
    if reference is None:
      reference = next((s for s in specs if s is not None), self.reference)
    self.validate_spec(reference, input_shape, num_classes, vocab_size)
    worn = [reference if s is None else s for s in specs]
    columns = zip(*(_common_fields(self, s, w) for s, w in zip(specs, worn)))
    kind, target, source, poison_rate, scale, order = map(np.asarray,
                                                          columns)
    inputs = Inputs(tuple(int(s) for s in input_shape), num_classes,
                    vocab_size)
    trigger = self.build_triggers(
        worn, inputs, [rng_lib.trigger(seed, i) for i in range(len(specs))],
        data=data)
    return Behaviour(
        kind=jnp.asarray(kind, jnp.int32),
        poison_rate=jnp.asarray(poison_rate, jnp.float32),
        target=jnp.asarray(target, jnp.int32),
        source=jnp.asarray(source, jnp.int32),
        scale=jnp.asarray(scale, jnp.float32),
        order=jnp.asarray(order, jnp.int32), trigger=trigger, family=self)

  def benign(self, n: int, input_shape, num_classes: int,
             vocab_size: int | None = None, **kwargs) -> Behaviour:
    return self.make_behaviour([None] * n, input_shape, num_classes,
                               vocab_size, **kwargs)

  def make_hooks(self, behaviour: Behaviour) -> Hooks:
    """Hooks for `train.make_trainer`, compiling in only what is used."""
    return behaviour_lib.make_hooks(self.trigger_for(behaviour), behaviour,
                                    self.plant_for(behaviour))

  def attack_success_rate(self, model, params, model_state, behaviour,
                          x_test, y_test, **kwargs) -> np.ndarray:
    """Per-provider ASR against their own triggers (see
    `behaviour.attack_success_rate`; a wrapped behaviour, e.g. adaptive, is
    measured by the plain one it wraps)."""
    plain = behaviour.plain
    return behaviour_lib.attack_success_rate(
        self.trigger_for(plain), model, params, model_state, plain, x_test,
        y_test, **kwargs)


def _common_fields(family: Family, spec: AttackSpec | None,
                   worn: AttackSpec) -> tuple:
  """(kind, target, source, poison_rate, scale, order) of one provider
  running `spec` (None: benign, wearing the reference trigger `worn`)."""
  source = worn.source if isinstance(worn, LabelFlip) else -1
  if spec is None:
    return 0, worn.target, source, 0.0, 1.0, 0
  return (family.kind(spec.name), spec.target, source, spec.poison_rate,
          specs_lib.update_scale(spec), specs_lib.order_code(spec))

