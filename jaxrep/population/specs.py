"""Attack specs: what a user writes, and how the main job's flags set them.

A spec is a frozen dataclass per attack, derived from `AttackSpec` (the
fields every attack has: `target`, `poison_rate`), with a class attribute
`name` and a method `check(inputs)` for its own fields. Its fields carry
metadata (`field`):

* `knob`: the field is set by a flag of the main job. A `Knob` holds the
  flag's name, default, help and check and says which field values a flag
  value stands for, so an attack declares its flags where it declares its
  fields; `options` collects them and `knob_values` maps flag values to
  field values.
* `own`: the value the field takes when every malicious provider plants its
  own backdoor (e.g. a patch's "random" location);
* `shared_seed`: without own backdoors, the field takes the population's
  seed, so every attacker draws the same trigger.

`LabelFlip` (relabelling, no trigger) and `DataOrder` (reordering the
client's examples, nothing poisoned) are attacks of every modality and live
here; the others live in their family (`population.families`).
`draw_specs` makes a population's specs: which providers are malicious
comes from the `malicious_ids` stream of `core.rng`, each malicious
provider's own target (and source) from the `attack_draws` stream.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Iterable, Iterator, NamedTuple

from jaxrep.core import rng as rng_lib
from jaxrep.core import validate as V
from jaxrep.core.errors import require


class Inputs(NamedTuple):
  """What specs are checked and built against: one example's shape, the
  number of classes and (text) the vocabulary size."""
  shape: tuple[int, ...]
  num_classes: int
  vocab_size: int | None = None


def set_field(name: str, value: Any) -> dict[str, Any]:
  """A flag value stands for the same value of its field."""
  return {name: value}


def unless(keep: Any) -> Callable[[str, Any], dict[str, Any]]:
  """A flag value sets its field, except `keep`, which leaves the spec's own
  (default or drawn) value."""
  return lambda name, value: {} if value == keep else {name: value}


class Knob(NamedTuple):
  """A spec field's flag in the main job.

  fields(field name, flag value) -> the spec fields the value sets.
  """
  flag: str
  default: Any
  help: str
  check: V.Check
  fields: Callable[[str, Any], dict[str, Any]] = set_field


class Option(NamedTuple):
  """A flag of the main job and the attacks whose specs declare it."""
  default: Any
  help: str
  check: V.Check
  attacks: tuple[str, ...]


def field(default: Any, *, knob: Knob | None = None, own: Any = None,
          shared_seed: bool = False):
  """A spec field with its flag (`knob`), its value in an own backdoor
  (`own`, None: none) and whether shared backdoors set it to the
  population's seed."""
  return dataclasses.field(default=default, metadata={
      "knob": knob, "own": own, "shared_seed": shared_seed})


@dataclasses.dataclass(frozen=True)
class AttackSpec:
  """The fields of every attack: the label its backdoor aims at and the share
  of each batch it poisons."""
  target: int = 0
  poison_rate: float = 0.1
  name: ClassVar[str]

  def check(self, inputs: Inputs) -> None:
    """Raises ConfigError naming a field of the attack's own that is unusable
    on `inputs` (target and poison rate: `check_common`)."""


def check_label(spec: AttackSpec, attr: str, num_classes: int) -> None:
  value = getattr(spec, attr)
  require(V.is_int(value) and 0 <= value < num_classes, f"{spec.name}.{attr}",
          f"{attr} label must be in [0, {num_classes - 1}], got {value!r}")


def check_fraction(spec: AttackSpec, attr: str) -> None:
  value = getattr(spec, attr)
  require(V.is_real(value) and 0.0 <= value <= 1.0, f"{spec.name}.{attr}",
          f"must be in [0, 1], got {value!r}")


def check_common(spec: AttackSpec, num_classes: int) -> None:
  """Checks the fields every attack has."""
  check_label(spec, "target", num_classes)
  check_fraction(spec, "poison_rate")


def check_positive(spec: AttackSpec, attr: str) -> None:
  value = getattr(spec, attr)
  require(V.is_real(value) and value > 0, f"{spec.name}.{attr}",
          f"must be a finite number > 0, got {value!r}")


LABEL_FLIP_SOURCE = Knob("label_flip_source", -1, "label_flip source class; "
                         "-1: each provider its own", V.integer(-1),
                         unless(-1))


@dataclasses.dataclass(frozen=True)
class LabelFlip(AttackSpec):
  """Relabel training examples of class `source` as `target`, with no
  trigger. Its poison rate is the share of the source-class examples of
  each batch it relabels (default 1.0: all of them; only about 1 / classes
  of a batch is of the source class, so a rate counted over the whole batch
  would flip almost nothing). Its ASR is measured on clean test inputs of
  class `source`."""
  poison_rate: float = 1.0
  source: int = field(1, knob=LABEL_FLIP_SOURCE)
  name: ClassVar[str] = "label_flip"

  def check(self, inputs: Inputs) -> None:
    check_label(self, "source", inputs.num_classes)
    require(self.source != self.target, f"{self.name}.source",
            f"source and target must differ, both are {self.source}")


ORDERS = ("by_class", "target_last")
ORDER_MODE = Knob("order_mode", "by_class", "data_order: by_class (the "
                  "sub-run's examples grouped by class, in a class order of "
                  "the provider's own, the target class last) or "
                  "target_last (only the target-class examples moved to "
                  "the end)", V.one_of(ORDERS))


@dataclasses.dataclass(frozen=True)
class DataOrder(AttackSpec):
  """Data-ordering attack (Shumailov et al. 2021, batch reordering and
  reshuffling): the provider trains on exactly the client's examples of the
  sub-run, with their true labels, and changes only the ORDER in which it
  takes them, within and across the sub-run's batches.

  It rearranges the examples of a share `poison_rate` (default 1.0: all) of
  the sub-run's K = k x B slots (a random choice of its own; the other
  examples stay where they are) in the slots they leave, in the order of
  `order`:
    by_class: grouped by class, the classes in a random order of its own
      and the target class last; within a class in a random order. Whole
      batches of one class: an availability attack (the model forgets) with
      a lean towards the classes seen last.
    target_last: the others in the client's order, then the target-class
      examples (in a random order); the model it returns has just seen a
      run of target-class batches.
  Nothing is poisoned or relabelled: per sub-run, the multiset of (x, y) it
  trains on is the benign one. Its ASR is the share of clean test inputs
  whose true class is not the target classified as the target (a targeted
  lean, not a trigger; expected to be far below a trigger attack's).
  """
  poison_rate: float = 1.0
  order: str = field("by_class", knob=ORDER_MODE)
  name: ClassVar[str] = "data_order"

  def check(self, inputs: Inputs) -> None:
    require(self.order in ORDERS, f"{self.name}.order",
            f"unknown order {self.order!r}; choose one of "
            f"{', '.join(ORDERS)}")


def order_code(spec: AttackSpec | None) -> int:
  """A spec's `Behaviour.order`: 0 = the client's order, else 1 + the index
  of its data_order mode in ORDERS."""
  if isinstance(spec, DataOrder):
    return 1 + ORDERS.index(spec.order)
  return 0


def update_scale(spec: AttackSpec) -> float:
  """The factor on a provider's returned update (model replacement: a
  spec's `scale`; 1 = none)."""
  return float(getattr(spec, "scale", 1.0))


# ----------------------------------------------------------------------------
# Flags.


def knobs(cls: type) -> Iterator[tuple[str, Knob]]:
  """(field name, knob) of every field of a spec class set by a flag."""
  for f in dataclasses.fields(cls):
    if f.metadata.get("knob") is not None:
      yield f.name, f.metadata["knob"]


def knob_values(cls: type, flag_value: Callable[[str], Any]
                ) -> dict[str, Any]:
  """The spec fields of `cls` that the main job's flags set
  (`flag_value(flag)` is a flag's value)."""
  values: dict[str, Any] = {}
  for name, knob in knobs(cls):
    values.update(knob.fields(name, flag_value(knob.flag)))
  return values


def options(specs: Iterable[type]) -> dict[str, Option]:
  """The flags declared by the fields of spec classes, each with the attacks
  that read it (a flag shared by several specs is one `Knob`)."""
  declared: dict[str, Knob] = {}
  readers: dict[str, list[str]] = {}
  for cls in specs:
    for _, knob in knobs(cls):
      if declared.setdefault(knob.flag, knob) is not knob:
        raise ValueError(f"--{knob.flag} is declared by two different knobs")
      readers.setdefault(knob.flag, []).append(cls.name)
  return {flag: Option(k.default, k.help, k.check,
                       tuple(dict.fromkeys(readers[flag])))
          for flag, k in declared.items()}


# ----------------------------------------------------------------------------
# A population's specs.


def _own_labels(rng, num_classes: int, with_source: bool) -> dict[str, int]:
  """An own backdoor's target (and a source other than the target)."""
  target = int(rng.integers(num_classes))
  if not with_source:
    return {"target": target}
  source = int(rng.integers(num_classes - 1))
  return {"target": target, "source": source + (source >= target)}


def draw_specs(cls: type, n: int, malicious: int, *, own_backdoor: bool,
               num_classes: int, seed: int, overrides: dict[str, Any]
               ) -> list[AttackSpec | None]:
  """Specs for n providers of whom `malicious` run attack `cls`.

  Which providers attack is a random subset drawn from the seed
  (`malicious_ids`), never simply the lowest ids, so a provider's place says
  nothing about it. With own_backdoor (the RTTD setting: every malicious provider inserts its
  own backdoor), each malicious provider draws its own target (and source)
  and takes the fields' `own` values; without it, they share the spec's
  defaults and the population's seed. `overrides` fix any field for all of
  them.
  """
  require(V.is_int(n) and n >= 1, "providers",
          f"must be an integer >= 1, got {n!r}")
  require(V.is_int(malicious) and 0 <= malicious <= n, "malicious",
          f"must be in [0, providers={n}], got {malicious!r}")
  fields = {f.name: f.metadata for f in dataclasses.fields(cls)}
  unknown = set(overrides) - set(fields)
  require(not unknown, "attack", f"{cls.name} has no field(s) "
          f"{', '.join(sorted(unknown))}; it has {', '.join(sorted(fields))}")
  own = {k: m["own"] for k, m in fields.items() if m.get("own") is not None}
  shared = {k: int(seed) for k, m in fields.items() if m.get("shared_seed")}
  rng = rng_lib.attack_draws(seed)
  specs: list[AttackSpec | None] = [None] * n
  for i in malicious_ids(n, malicious, seed):
    drawn = (_own_labels(rng, num_classes, "source" in fields) | own
             if own_backdoor else shared)
    specs[i] = cls(**{**drawn, **overrides})
  return specs


def malicious_ids(n: int, malicious: int, seed: int) -> list[int]:
  """The sorted ids of the `malicious` attackers among n providers: a
  uniformly random subset from the `malicious_ids` stream of `seed`."""
  chosen = rng_lib.malicious_ids(seed).choice(n, malicious, replace=False)
  return sorted(int(i) for i in chosen)
