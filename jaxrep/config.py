"""The nested configuration of a simulation.

A `SimConfig` has one section per stage of the data flow:

    data -> model -> attack -> training -> divergence -> protocol -> detector
         -> runtime   (+ the seed of everything)

Every leaf field carries its own metadata: the help text, the command-line
flag it is set by (the field name unless said otherwise) and a check of its
value. The main job's flags and their help are made from these fields
(`flag_fields`), so a field, its flag, its default, its help and its check
live in one place. Flat flag names are also the keys of `SimConfig.flat()`
(what results.json records as `config`) and of `SimConfig.from_flat`.

Checks that need a later stage (is this a known model, attack, metric?) are
made by that stage; `jaxrep.protocol.validate` runs them all before training.

Attack-specific knobs (`trigger_size`, `blend_alpha`, `warp_strength`, ...)
belong to the attacks that use them: they are declared by the attack family
in `jaxrep.population` and validated by the attack's own spec.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

from jaxrep.core import validate as V
from jaxrep.core.errors import require

AUTO = "auto"


def field(default, help: str, *, check: V.Check | None = None,
          flag: str | None = "", kind: type | None = None):
  """A config field with its help, flag name ("" = the field name, None = no
  flag) and value check."""
  return dataclasses.field(default=default, metadata={
      "help": help, "flag": flag, "check": check, "kind": kind})


@dataclasses.dataclass(frozen=True)
class DataConfig:
  dataset: str = field(
      "digits", "images: digits (embedded), idx, fashion_mnist_idx, or a TFDS "
      "name; text: fortunes (Debian's fortunes package), text_synthetic, or a "
      "TFDS text name (imdb_reviews, ag_news_subset, ...)",
      check=lambda v: None if isinstance(v, str) and v else
      "must be a dataset name, e.g. digits, idx, fashion_mnist")
  data_dir: str | None = field(
      None, "directory of IDX files, of the fortunes files or of prepared "
      "TFDS data", check=V.optional_text("a directory"), kind=str)
  max_len: int = field(64, "text: tokens per example (longer ones are "
                       "truncated)", check=V.integer(1))
  vocab_size: int = field(10000, "text: vocabulary size, <pad> and <unk> "
                          "included", check=V.integer(3))
  max_train: int = field(0, "use only the first N training examples (0: all)",
                         check=V.integer(0))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  name: str = field(AUTO, "auto (mlp for images, text_cnn for text), mlp, "
                    "cnn, resnet20, text_cnn or text_transformer",
                    flag="model", check=V.text("a model name"))


@dataclasses.dataclass(frozen=True)
class AttackConfig:
  """Who attacks and how; `options` holds the chosen attack's own knobs
  (flag name -> value), declared and checked by its family."""
  name: str = field(AUTO, "auto (badnets for images, token for text); "
                    "images: badnets, blend, label_flip, scaling, warp, "
                    "keyed_noise (low-amplitude keyed noise trigger, "
                    "poisoned), secret_key (honest training, then hidden "
                    "units keyed to a secret perturbation planted into the "
                    "returned MLP) or data_order (the client's examples "
                    "reordered, target class last; nothing poisoned); "
                    "text: token (rare-word trigger inserted at a random "
                    "place), phrase (a phrase of common words inserted at "
                    "the start), label_flip or data_order", flag="attack",
                    check=V.text("an attack name"))
  malicious: int = field(8, "how many of them plant a backdoor",
                         check=V.integer(0))
  poison_rate: float = field(
      -1.0, "share of each batch a malicious provider poisons (label_flip: "
      "share of the batch's source-class examples it relabels; data_order: "
      "share of the sub-run's target-class examples it moves to the end); "
      "-1: the attack's own default (0.1; label_flip and data_order 1.0; "
      "secret_key 0: it poisons nothing)",
      check=lambda v: None if (V.is_real(v) and (v == -1 or 0 <= v <= 1))
      else f"must be -1 (the attack's default) or in [0, 1], got {v!r}")
  target_label: int = field(-1, "backdoor target; -1: each malicious "
                            "provider its own", check=V.integer(-1))
  adaptive: str = field(
      "none", "the malicious providers adapt to the defense: none, low_rate "
      "(poison rate = strength), sporadic (poison a share = strength of "
      "their sub-runs), constrained (backdoor deviation clipped to strength "
      "x the benign distance), mimicry (keep a share = strength of the "
      "deviation, plus benign-sized noise) or collusion (all malicious "
      "providers share one backdoor)", check=V.text("an adaptive attack"))
  adaptive_strength: float = field(
      -1.0, "the adaptive attack's knob; -1: its default (low_rate 1/32, "
      "sporadic 0.25, constrained 10, mimicry 0.01)",
      check=lambda v: None if (V.is_real(v) and (v == -1 or v > 0))
      else f"must be -1 (the default) or > 0, got {v!r}")
  options: tuple = field((), "attack-specific knobs", flag=None)

  def option(self, name: str, default: Any = None) -> Any:
    return dict(self.options).get(name, default)


@dataclasses.dataclass(frozen=True)
class TrainingConfig:
  """Hyper-parameters the client sends to every provider."""
  batch_size: int = field(32, "examples per training step",
                          check=V.integer(1))
  optimizer: str = field("sgd", "sgd (with momentum) or adam",
                         check=V.text("an optimizer name"))
  learning_rate: float = field(0.05, "peak learning rate",
                               check=V.real(0.0, 1e6, low_open=True))
  momentum: float = field(0.9, "SGD momentum",
                          check=V.real(0.0, 1.0, high_open=True))
  schedule: str = field("cosine", "constant, cosine, warmup_cosine or step",
                        check=V.text("a schedule name"))


@dataclasses.dataclass(frozen=True)
class DivergenceConfig:
  """Benign divergence: how honest replicas come to differ."""
  permute: bool = field(True, "benign divergence: per-provider reduction "
                        "order", check=V.boolean())
  grad_noise: float = field(0.0, "benign divergence: relative gradient noise "
                            "scale", check=V.real(0.0, 1.0, high_open=True))
  bf16_fraction: float = field(0.0, "benign divergence: share of providers "
                               "in bfloat16 (shorthand for "
                               "--stacks=bf16:f,fp32:1-f)",
                               check=V.real(0.0, 1.0))
  stacks: str = field(
      "", "benign divergence: hardware profiles as shares of providers, e.g. "
      "fp32:0.5,tf32:0.25,bf16:0.25 (fp32: float32, tf32: matmul operands "
      "with 10 mantissa bits, bf16: 7); '': all fp32 (or --bf16_fraction)",
      check=V.text("profile:share pairs, e.g. fp32:0.5,tf32:0.25,bf16:0.25"))

  def validate(self) -> "DivergenceConfig":
    """Field checks and the bf16_fraction / stacks conflict; the profile
    names and shares are checked by `jaxrep.population.divergence`."""
    _check_section(self, prefix="divergence.")
    require(not (self.stacks.strip() and self.bf16_fraction != 0.0),
            "stacks", "give either --stacks or --bf16_fraction (its "
            f"shorthand), not both (got stacks={self.stacks!r}, "
            f"bf16_fraction={self.bf16_fraction})")
    return self

  @property
  def is_zero(self) -> bool:
    """No divergence configured (any --stacks text counts as some)."""
    return (not self.permute and self.grad_noise == 0.0
            and self.bf16_fraction == 0.0 and not self.stacks.strip())


@dataclasses.dataclass(frozen=True)
class ProtocolConfig:
  """The client's protocol: n providers, T steps in sub-runs of k, m of
  them replicated."""
  providers: int = field(16, "number of providers n (>= 2)",
                         check=V.integer(2))
  steps: int = field(400, "training steps T of the whole run",
                     check=V.integer(1))
  subrun_steps: int = field(20, "steps k per sub-run (steps must be a "
                            "multiple)", check=V.integer(1))
  replicated: int = field(5, "sub-runs m the client replicates on all "
                          "providers", check=V.integer(1))
  recovery: str = field(
      "rollback", "what the client does when it flags providers: rollback (return "
      "to the last checkpoint no flagged provider contributed to and "
      "re-execute every later sub-run with trusted providers) or none (keep "
      "the model)", check=V.one_of(("rollback", "none")))
  attack_check: bool = field(True, "also train every provider's own full "
                             "run, to show each attack works (ASR) - doubles "
                             "the training cost", check=V.boolean())
  hostile: str = field("", "for testing the client's checks: providers "
                       "returning garbage, e.g. '3:nan,5:wrong_shape' (modes "
                       "nan, inf, diverged, wrong_shape)",
                       check=V.text("a string like '3:nan,5:wrong_shape'"))

  @property
  def num_subruns(self) -> int:
    return self.steps // self.subrun_steps


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
  metric: str = field("l2", "l2, cosine, l1, linf, output, cka or zest",
                      check=V.text("a metric name"))
  name: str = field("replica", "replica (flags a provider with no near "
                    "replica at the look; decides at the first look), "
                    "replica_group (also flags every near-replica group "
                    "outside a strict-majority group: colluders), ks, "
                    "zscore, krum, multikrum, median or cluster",
                    flag="detector", check=V.text("a detector name"))
  alpha: float = field(0.01, "significance level of the detector, in (0, 1)",
                       check=V.real(0.0, 1.0, low_open=True, high_open=True))
  ks_margin: float = field(10.0, "ks: test whether a provider's distances "
                           "exceed margin x the others' (1: the plain test; "
                           "see jaxrep/detect)", check=V.real(1.0, 1e12))
  replica_margin: float = field(
      1e5, "replica, replica_group: a provider is flagged when its distance to its "
      "nearest other participant exceeds margin x the 10th percentile of "
      "those nearest distances (chosen on an all-benign calibration "
      "setting, see BUILD_NOTES 'Replica detector')",
      check=V.real(1.0, 1e12))
  krum_f: int = field(-1, "f assumed by krum/multikrum; -1: (n - 3) // 2",
                      check=V.integer(-1))
  probe_size: int = field(256, "probe set of output/cka/zest: the last "
                          "N training examples, held out of every batch",
                          check=V.integer(1))


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
  devices: int = field(1, "devices the providers are split over (1: one "
                       "device, 0: all, e.g. 8 GPUs); providers must be a "
                       "multiple", check=V.integer(0))
  memory_mb: int = field(0, "memory budget per device in MiB (0: what the "
                         "device reports); a population that does not fit is "
                         "trained in provider chunks, one that can never fit "
                         "is refused", check=V.integer(0))
  provider_block: int = field(
      0, "providers per device trained side by side inside one sub-run (0: "
      "auto: on CPU as many as keep one block's step within 64 MiB of "
      "temporaries, on GPU/TPU all); changes speed, not results beyond "
      "float32 rounding", check=V.integer(0))


SECTIONS = ("data", "model", "attack", "training", "divergence", "protocol",
            "detector", "runtime")


@dataclasses.dataclass(frozen=True)
class SimConfig:
  """Everything that defines a simulation (the main job's flags)."""
  data: DataConfig = DataConfig()
  model: ModelConfig = ModelConfig()
  attack: AttackConfig = AttackConfig()
  training: TrainingConfig = TrainingConfig()
  divergence: DivergenceConfig = DivergenceConfig()
  protocol: ProtocolConfig = ProtocolConfig()
  detector: DetectorConfig = DetectorConfig()
  runtime: RuntimeConfig = RuntimeConfig()
  seed: int = field(0, "seed of everything (init, schedule, triggers, "
                    "choices)", check=V.integer(0, 2**31 - 1))

  # -- flat view (flag names) ----------------------------------------------

  @classmethod
  def from_flat(cls, **values) -> "SimConfig":
    """A config from flag-named values, e.g. SimConfig.from_flat(
    providers=6, attack="blend", blend_alpha=0.3); unknown flag names that
    are not attack options raise ConfigError."""
    return cls().replace(**values)

  def replace(self, **values) -> "SimConfig":
    """A copy with flag-named fields replaced; names that are no section
    field are attack options (checked by the attack family)."""
    where = _flag_index()
    sections: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}
    options = dict(self.attack.options)
    for name, value in values.items():
      if name in where:
        section, attr = where[name]
        if section is None:
          top[attr] = value
        else:
          sections.setdefault(section, {})[attr] = value
      elif name in SECTIONS and isinstance(value, type(getattr(self, name))):
        top[name] = value
      else:
        require(isinstance(name, str) and name.isidentifier(), "config",
                f"unknown field {name!r}")
        options[name] = value
    new = self
    for section, changes in sections.items():
      new = dataclasses.replace(new, **{
          section: dataclasses.replace(getattr(new, section), **changes)})
    if options != dict(self.attack.options):
      attack = new.attack
      new = dataclasses.replace(new, attack=dataclasses.replace(
          attack, options=tuple(sorted(options.items()))))
    return dataclasses.replace(new, **top) if top else new

  def flat(self) -> dict[str, Any]:
    """Every flag-named field and attack option, flat (results.json)."""
    out = {}
    for section, f, flag in flag_fields(type(self)):
      holder = self if section is None else getattr(self, section)
      out[flag] = getattr(holder, f.name)
    out.update(dict(self.attack.options))
    return out

  def __getattr__(self, name: str):
    # Read access by flag name (config.providers, config.blend_alpha, ...).
    if name.startswith("__"):
      raise AttributeError(name)
    where = _flag_index()
    if name in where:
      section, attr = where[name]
      return getattr(self if section is None else getattr(self, section), attr)
    options = dict(object.__getattribute__(self, "attack").options)
    if name in options:
      return options[name]
    raise AttributeError(f"SimConfig has no field or flag {name!r}")

  # -- derived -------------------------------------------------------------

  @property
  def num_subruns(self) -> int:
    return self.protocol.num_subruns

  @property
  def overhead_steps(self) -> int:
    p = self.protocol
    return p.replicated * p.subrun_steps * (p.providers - 1)

  def validate(self) -> "SimConfig":
    """Checks every field and every cross-field rule this module knows;
    the stages check their names (`jaxrep.protocol.validate`)."""
    for section in SECTIONS:
      _check_section(getattr(self, section))
    _check_section(self, only=("seed",))
    p, a = self.protocol, self.attack
    require(a.malicious <= p.providers, "malicious",
            f"{a.malicious} malicious providers but only {p.providers} "
            "providers")
    require(p.subrun_steps <= p.steps, "subrun_steps",
            f"a sub-run of {p.subrun_steps} steps does not fit in "
            f"{p.steps} steps")
    require(p.steps % p.subrun_steps == 0, "steps",
            f"must be a multiple of subrun_steps={p.subrun_steps}, got "
            f"{p.steps} (e.g. {p.num_subruns * p.subrun_steps})")
    require(p.replicated <= p.num_subruns, "replicated",
            f"{p.replicated} replicated sub-runs but the run has only "
            f"{p.num_subruns} sub-runs (steps / subrun_steps)")
    f = self.detector.krum_f
    require(f < p.providers - 2 or f == -1, "krum_f",
            f"Krum needs n - f - 2 >= 1 neighbours, got f={f} for "
            f"{p.providers} providers")
    d = self.runtime.devices
    if d > 1:
      require(p.providers % d == 0, "devices",
              f"{p.providers} providers do not split evenly over {d} "
              "devices")
    return self


def flag_fields(cls=SimConfig) -> Iterator[tuple[str | None, dataclasses.Field,
                                                 str]]:
  """(section name or None, field, flag name) of every flag of a config."""
  for f in dataclasses.fields(cls):
    if f.name in SECTIONS:
      for g in dataclasses.fields(f.type if isinstance(f.type, type)
                                  else type(f.default)):
        flag = g.metadata.get("flag", "")
        if flag is not None:
          yield f.name, g, flag or g.name
    else:
      flag = f.metadata.get("flag", "")
      if flag is not None:
        yield None, f, flag or f.name


_FLAG_INDEX: dict[str, tuple[str | None, str]] = {}


def _flag_index() -> dict[str, tuple[str | None, str]]:
  if not _FLAG_INDEX:
    _FLAG_INDEX.update({flag: (section, f.name)
                        for section, f, flag in flag_fields(SimConfig)})
  return _FLAG_INDEX


def _check_section(obj, *, prefix: str = "", only=None) -> None:
  for f in dataclasses.fields(obj):
    if only is not None and f.name not in only:
      continue
    check = f.metadata.get("check")
    if check is not None:
      flag = f.metadata.get("flag", "") or f.name
      V.require_value(check, prefix + flag, getattr(obj, f.name))


def flag_names() -> frozenset[str]:
  """The flag names of every section field (attack options aside)."""
  return frozenset(_flag_index())
