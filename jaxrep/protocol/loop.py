"""The RTTD protocol: the client's host loop over sub-runs.

A training run of T = `steps` steps is split into S = T / k sub-runs of
k = `subrun_steps` steps. Before training, the client secretly draws m =
`replicated` of them. For every sub-run s:

* the client hands its current checkpoint (parameters, optimizer and model
  state), the batch schedule of s and the hyper-parameters to the providers;
* a replicated sub-run goes to every provider still trusted; the client
  computes the distance matrix between the returned models, runs the detector
  on the evidence pooled over all replicated sub-runs so far, excludes the
  flagged providers for good, and continues from the medoid of the unflagged
  results;
* a non-replicated sub-run goes to one trusted provider, drawn at random, and
  is accepted unchecked (a malicious one poisons it; that is how a backdoor can
  reach the client despite the defense).

The simulator trains all n providers on every sub-run (one vmapped step does
that at the cost of one), but the client only *sees* and accepts what the
protocol allows. Malicious providers poison every sub-run they compute: they
cannot tell which sub-runs are replicated.

Two more chains are run for the report:
* no defense: the same client, but every sub-run is done by a provider drawn
  among all n and accepted unchecked; its final model answers "would the
  backdoor have reached the client without RTTD?";
* attack check (`attack_check=True`): every provider trains the whole run on
  its own (the model it would deliver as the only provider). Its clean
  accuracy and attack success rate show that each attack really works; a
  detected attack that does not work would prove nothing.

Extra cost of the defense: m * k * (n - 1) training steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.population import image_attacks as attacks_lib
from jaxrep.runtime import checkpoint as ckpt_lib
from jaxrep.protocol import hostile as hostile_lib
from jaxrep.runtime import memory as memory_lib
from jaxrep.runtime import sharding as sharding_lib
from jaxrep.population import text_attacks as text_attacks_lib
from jaxrep.data import datasets as data_lib
from jaxrep.detect import detectors as detect_lib
from jaxrep.distances import kernels as dist_lib
from jaxrep.population import divergence as div_lib
from jaxrep.detect import metrics as metrics_lib
from jaxrep.models import zoo as models_lib
from jaxrep.train import trainer as train_lib
from jaxrep.core.errors import ConfigError, require

METRICS = ("l2", "cosine", "l1", "linf", "output", "cka", "zest")
PARAM_METRICS = ("l2", "cosine", "l1", "linf")
AUTO = "auto"
# What "auto" means for --model / --attack, by the dataset's modality.
DEFAULT_MODEL = {"image": "mlp", "text": "text_cnn"}
DEFAULT_ATTACK = {"image": "badnets", "text": "token"}
ATTACK_FAMILY = {"image": attacks_lib, "text": text_attacks_lib}
ATTACKS = tuple(dict.fromkeys(attacks_lib.ATTACKS
                              + text_attacks_lib.ATTACKS))


@dataclasses.dataclass(frozen=True)
class SimConfig:
  """Everything that defines a simulation (the main job's flags)."""
  dataset: str = "digits"
  data_dir: str | None = None
  max_len: int = 64             # text: tokens per example (truncate / pad)
  vocab_size: int = 10000       # text: vocabulary size incl. <pad>, <unk>
  model: str = AUTO             # auto: mlp for images, text_cnn for text
  providers: int = 16
  malicious: int = 8
  attack: str = AUTO            # auto: badnets for images, token for text
  poison_rate: float = 0.1
  target_label: int = -1        # -1: each malicious provider picks its own
  trigger_size: int = 2
  trigger_location: str = "random"
  blend_alpha: float = 0.2
  scale_factor: float = 2.0
  warp_strength: float = 1.5
  label_flip_source: int = -1   # -1: each provider picks its own
  trigger_tokens: int = 0       # text: trigger length (0: token 1, phrase 4)
  steps: int = 400
  subrun_steps: int = 20
  replicated: int = 5
  metric: str = "l2"
  detector: str = "ks"
  alpha: float = 0.01
  ks_margin: float = 10.0       # ks: flag only distances > margin x the rest
  krum_f: int = -1              # -1: the largest Krum tolerates, (n - 3) // 2
  seed: int = 0
  batch_size: int = 32
  optimizer: str = "sgd"
  learning_rate: float = 0.05
  momentum: float = 0.9
  schedule: str = "cosine"
  permute: bool = True
  grad_noise: float = 0.0
  bf16_fraction: float = 0.0
  probe_size: int = 256
  hostile: str = ""             # testing: e.g. "3:nan,5:wrong_shape"
  max_train: int = 0            # 0: the whole training set
  attack_check: bool = True
  devices: int = 1              # 1: one device; 0: all; d: providers over d
  memory_mb: int = 0            # per-device budget in MiB; 0: ask the device

  @property
  def num_subruns(self) -> int:
    return self.steps // self.subrun_steps

  @property
  def overhead_steps(self) -> int:
    return self.replicated * self.subrun_steps * (self.providers - 1)

  def train_config(self) -> train_lib.TrainConfig:
    return train_lib.TrainConfig(
        optimizer=self.optimizer, learning_rate=self.learning_rate,
        momentum=self.momentum, schedule=self.schedule,
        total_steps=self.steps, batch_size=self.batch_size)

  def divergence_config(self) -> div_lib.DivergenceConfig:
    return div_lib.DivergenceConfig(permute=self.permute,
                                    grad_noise=self.grad_noise,
                                    bf16_fraction=self.bf16_fraction)

  def validate(self) -> "SimConfig":
    """Checks every field that can be checked without loading data."""
    def integer(name, low, high=None):
      v = getattr(self, name)
      ok = isinstance(v, (int, np.integer)) and not isinstance(v, bool)
      ok = ok and v >= low and (high is None or v <= high)
      bound = f"[{low}, {high}]" if high is not None else f">= {low}"
      require(ok, name, f"must be an integer {bound}, got {v!r}")

    def real(name, low, high, low_open=False, high_open=False):
      v = getattr(self, name)
      ok = (isinstance(v, (int, float, np.floating, np.integer))
            and not isinstance(v, bool) and math.isfinite(v))
      ok = ok and (v > low if low_open else v >= low)
      ok = ok and (v < high if high_open else v <= high)
      lb, hb = "(" if low_open else "[", ")" if high_open else "]"
      require(ok, name, f"must be a number in {lb}{low}, {high}{hb}, got {v!r}")

    require(self.model in models_lib.MODELS + (AUTO,), "model",
            f"unknown model {self.model!r}; choose one of "
            f"{', '.join(models_lib.MODELS + (AUTO,))}")
    require(isinstance(self.dataset, str) and self.dataset != "", "dataset",
            "must be a dataset name, e.g. digits, idx, fashion_mnist")
    integer("providers", 2)
    integer("malicious", 0)
    require(self.malicious <= self.providers, "malicious",
            f"{self.malicious} malicious providers but only "
            f"{self.providers} providers")
    require(self.attack in ATTACKS + (AUTO,), "attack",
            f"unknown attack {self.attack!r}; choose one of "
            f"{', '.join(ATTACKS + (AUTO,))}")
    integer("max_len", 1)
    integer("vocab_size", 3)
    integer("trigger_tokens", 0)
    real("poison_rate", 0.0, 1.0)
    integer("target_label", -1)
    integer("trigger_size", 1)
    require(self.trigger_location in attacks_lib.LOCATIONS, "trigger_location",
            f"unknown location {self.trigger_location!r}; choose one of "
            f"{', '.join(attacks_lib.LOCATIONS)}")
    real("blend_alpha", 0.0, 1.0)
    real("scale_factor", 0.0, 1e6, low_open=True)
    real("warp_strength", 0.0, 1e6, low_open=True)
    integer("label_flip_source", -1)
    integer("steps", 1)
    integer("subrun_steps", 1)
    require(self.subrun_steps <= self.steps, "subrun_steps",
            f"a sub-run of {self.subrun_steps} steps does not fit in "
            f"{self.steps} steps")
    require(self.steps % self.subrun_steps == 0, "steps",
            f"must be a multiple of subrun_steps={self.subrun_steps}, got "
            f"{self.steps} (e.g. {self.num_subruns * self.subrun_steps})")
    integer("replicated", 1)
    require(self.replicated <= self.num_subruns, "replicated",
            f"{self.replicated} replicated sub-runs but the run has only "
            f"{self.num_subruns} sub-runs (steps / subrun_steps)")
    require(self.metric in METRICS, "metric",
            f"unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
    require(self.detector in detect_lib.DETECTORS, "detector",
            f"unknown detector {self.detector!r}; choose one of "
            f"{', '.join(detect_lib.DETECTORS)}")
    real("alpha", 0.0, 1.0, low_open=True, high_open=True)
    real("ks_margin", 1.0, 1e12)
    integer("krum_f", -1)
    require(self.krum_f < self.providers - 2 or self.krum_f == -1, "krum_f",
            f"Krum needs n - f - 2 >= 1 neighbours, got f={self.krum_f} for "
            f"{self.providers} providers")
    integer("seed", 0, 2**31 - 1)
    integer("batch_size", 1)
    integer("probe_size", 1)
    integer("max_train", 0)
    real("bf16_fraction", 0.0, 1.0)
    real("grad_noise", 0.0, 1.0, high_open=True)
    require(isinstance(self.permute, bool), "permute",
            f"must be true or false, got {self.permute!r}")
    require(isinstance(self.attack_check, bool), "attack_check",
            f"must be true or false, got {self.attack_check!r}")
    require(isinstance(self.hostile, str), "hostile",
            f"must be a string like '3:nan,5:wrong_shape', got {self.hostile!r}")
    hostile_lib.parse_hostile(self.hostile, self.providers)
    integer("devices", 0)
    integer("memory_mb", 0)
    if self.devices > 1:
      require(self.providers % self.devices == 0, "devices",
              f"{self.providers} providers do not split evenly over "
              f"{self.devices} devices")
    self.train_config().validate()
    return self


def resolve(config: SimConfig, ds: data_lib.Dataset) -> SimConfig:
  """The config with "auto" model / attack made concrete for the dataset,
  checked against its modality (an image attack on text is a ConfigError)."""
  modality = ds.modality
  model = DEFAULT_MODEL[modality] if config.model == AUTO else config.model
  attack = DEFAULT_ATTACK[modality] if config.attack == AUTO else config.attack
  text_model = model in models_lib.TEXT_MODELS
  require(text_model == (modality == "text"), "model",
          f"{model} is {'a text' if text_model else 'an image'} model but "
          f"dataset {ds.name} holds "
          f"{'text' if modality == 'text' else 'images'}; use one of "
          f"{', '.join(models_lib.TEXT_MODELS if modality == 'text' else models_lib.IMAGE_MODELS)}")
  family = ATTACK_FAMILY[modality]
  require(attack in family.ATTACKS, "attack",
          f"{attack} is not an attack on {modality} (dataset {ds.name}); use "
          f"one of {', '.join(family.ATTACKS)}")
  return dataclasses.replace(config, model=model, attack=attack)


def make_behaviour(config: SimConfig, ds: data_lib.Dataset):
  """The per-provider behaviour of a resolved config on its dataset."""
  specs = attack_specs(config, ds.num_classes, ds.input_shape,
                       vocab_size=len(ds.vocab) if ds.vocab else None)
  if ds.modality == "text":
    return text_attacks_lib.make_behaviour(specs, ds.input_shape,
                                           ds.num_classes, len(ds.vocab),
                                           seed=config.seed)
  return attacks_lib.make_behaviour(specs, ds.input_shape, ds.num_classes,
                                    seed=config.seed)


def _text_attack_specs(config: SimConfig, num_classes: int, input_shape,
                       vocab_size: int):
  """Specs of the text attacks: each malicious provider draws its own
  trigger tokens (and target unless --target_label is set)."""
  overrides: dict[str, Any] = {"poison_rate": config.poison_rate}
  if config.target_label >= 0:
    overrides["target"] = config.target_label
  if config.trigger_tokens and config.attack == "token":
    overrides["count"] = config.trigger_tokens
  if config.trigger_tokens and config.attack == "phrase":
    overrides["length"] = config.trigger_tokens
  if config.attack == "label_flip" and config.label_flip_source >= 0:
    overrides["source"] = config.label_flip_source
  specs = text_attacks_lib.population_specs(
      config.providers, config.malicious, config.attack, own_backdoor=True,
      num_classes=num_classes, seed=config.seed, **overrides)
  for spec in specs:
    if spec is not None:
      text_attacks_lib.validate_spec(spec, input_shape, num_classes,
                                     vocab_size)
  return specs


def attack_specs(config: SimConfig, num_classes: int, input_shape,
                 vocab_size: int | None = None):
  """Per-provider attack specs (None = benign) for a resolved config;
  text attacks when `vocab_size` is given."""
  if vocab_size is not None:
    return _text_attack_specs(config, num_classes, input_shape, vocab_size)
  overrides: dict[str, Any] = {"poison_rate": config.poison_rate}
  if config.target_label >= 0:
    overrides["target"] = config.target_label
  if config.attack in ("badnets", "scaling"):
    overrides.update(size=config.trigger_size,
                     location=config.trigger_location)
    if config.trigger_location != "random":
      overrides["pattern"] = "checkerboard"
  if config.attack == "blend":
    overrides["alpha"] = config.blend_alpha
  if config.attack == "scaling":
    overrides["factor"] = config.scale_factor
  if config.attack == "warp":
    overrides["strength"] = config.warp_strength
  if config.attack == "label_flip" and config.label_flip_source >= 0:
    overrides["source"] = config.label_flip_source
  specs = attacks_lib.population_specs(
      config.providers, config.malicious, config.attack,
      own_backdoor=True, num_classes=num_classes, seed=config.seed,
      **overrides)
  for spec in specs:
    if spec is not None:
      attacks_lib.validate_spec(spec, input_shape, num_classes)
  return specs


def _take(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def _take_slice(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i:i + 1], tree)


def model_distances(config: SimConfig, model, start_params, pop, probe_x,
                    key, mesh=None) -> np.ndarray:
  """The [n, n] distance matrix of `config.metric` for one sub-run.

  With a `mesh`, the providers stay split over its devices (ring kernels of
  `jaxrep.runtime.sharding`); the result equals the unsharded one to float32 rounding.
  """
  metric = config.metric
  if mesh is not None:
    d = sharding_lib.model_distances(
        metric, mesh, start_params=start_params, params=pop.params,
        model_state=pop.model_state, apply_fn=model.predict,
        probe_x=probe_x[:16] if metric == "zest" else probe_x, key=key)
    return np.asarray(sharding_lib.to_host(d), np.float64)
  if metric in PARAM_METRICS:
    upd = dist_lib.updates(start_params, pop.params)
    d = dist_lib.pairwise_distances(upd, metric)
  elif metric == "output":
    d = dist_lib.output_distances(model.predict, pop.params, pop.model_state,
                                  probe_x)
  elif metric == "cka":
    d = dist_lib.cka_distances(model.predict, pop.params, pop.model_state,
                               probe_x)
  else:
    d = dist_lib.zest_distances(model.predict, pop.params, pop.model_state,
                                probe_x[:16], key)
  return np.asarray(d, np.float64)


def medoid(d: np.ndarray, members: np.ndarray) -> int:
  """Member with the smallest total distance to the other members."""
  idx = np.flatnonzero(members)
  sub = d[np.ix_(idx, idx)]
  totals = np.where(np.isfinite(sub), sub, np.finfo(float).max).sum(axis=1)
  return int(idx[int(np.argmin(totals))])


@dataclasses.dataclass
class SimResult:
  """Everything the report needs."""
  config: SimConfig
  malicious: np.ndarray
  attack_names: list
  flags: np.ndarray
  flagged_at: np.ndarray
  scores: np.ndarray
  clean_accuracy: np.ndarray
  attack_success_rate: np.ndarray
  client: dict
  no_defense: dict
  replicated_subruns: list
  matrices: list
  members: list
  wall_seconds: float
  notes: list
  recorded: dict = dataclasses.field(default_factory=dict)
  recorded_median: list = dataclasses.field(default_factory=list)
  reasons: dict = dataclasses.field(default_factory=dict)
  memory: dict = dataclasses.field(default_factory=dict)

  @property
  def hostile(self) -> dict[int, str]:
    return hostile_lib.parse_hostile(self.config.hostile,
                                     self.config.providers)

  def summary(self) -> dict:
    """Detection metrics exclude hostile providers (reported separately)."""
    mal = self.malicious
    keep = ~np.isin(np.arange(len(mal)), list(self.hostile))
    return {
        "tpr": metrics_lib.tpr(self.flags[keep], mal[keep]),
        "fpr": metrics_lib.fpr(self.flags[keep], mal[keep]),
        "auroc": metrics_lib.auroc(self.scores[keep], mal[keep]),
        "hostile_flagged": int(self.flags[~keep].sum()),
        "hostile": int((~keep).sum()),
        "final_clean_accuracy": self.client["clean_accuracy"],
        "final_attack_success_rate": self.client["attack_success_rate"],
        "no_defense_clean_accuracy": self.no_defense["clean_accuracy"],
        "no_defense_attack_success_rate":
            self.no_defense["attack_success_rate"],
        "malicious_mean_attack_success_rate":
            _mean_or_nan(self.attack_success_rate[mal]),
        "benign_mean_clean_accuracy":
            _mean_or_nan(self.clean_accuracy[~mal]),
        "malicious_mean_clean_accuracy":
            _mean_or_nan(self.clean_accuracy[mal]),
        "overhead_steps": self.config.overhead_steps,
        "training_steps": self.config.steps,
        "replicated_subruns": [int(s) for s in self.replicated_subruns],
        "wall_seconds": self.wall_seconds,
    }

  def providers(self) -> list[dict]:
    return [{
        "id": i,
        "malicious": bool(self.malicious[i]),
        "attack": self.attack_names[i],
        "hostile": self.hostile.get(i),
        "flagged": bool(self.flags[i]),
        "flagged_at_subrun": (int(self.flagged_at[i])
                              if self.flagged_at[i] >= 0 else None),
        "flag_reason": (self.reasons.get(i, f"{self.config.detector} on "
                                            f"{self.config.metric}")
                        if self.flagged_at[i] >= 0 else None),
        "score": _finite_or_none(self.scores[i]),
        "clean_accuracy": float(self.clean_accuracy[i]),
        "attack_success_rate": float(self.attack_success_rate[i]),
    } for i in range(len(self.malicious))]


def _mean_or_nan(x) -> float:
  return float(np.mean(x)) if np.size(x) else float("nan")


def _finite_or_none(v):
  v = float(v)
  return v if math.isfinite(v) else None


def _client_asr(model, params, model_state, behaviour, ds, malicious):
  """ASR of one model against every malicious provider's trigger."""
  n = behaviour.size
  if not malicious.any():
    return float("nan"), []
  stack = lambda t: jax.tree_util.tree_map(
      lambda a: jnp.broadcast_to(a, (n, *a.shape)), t)
  asr = ATTACK_FAMILY[ds.modality].attack_success_rate(
      model, stack(params), stack(model_state), behaviour, ds.x_test,
      ds.y_test)
  per = asr[malicious]
  return float(per.max()), [float(a) for a in per]


def memory_plan(config: SimConfig, trainer, behaviour, div, x_train, y_train,
                mesh=None) -> memory_lib.Plan:
  """How the population's sub-runs fit in device memory (`jaxrep.runtime.memory`).

  Estimates the peak bytes per device of a sub-run and of the distance
  kernels from the traced training step (nothing is allocated) and picks the
  number of providers trained at once: all n when they fit, else chunks
  (a multiple of the mesh size) that give the same models. A config that
  cannot fit even one provider per device raises ConfigError naming what to
  shrink. The budget is `config.memory_mb` MiB per device, else what the
  device reports (on CPU: the host's available memory shared by its
  devices).
  """
  d = 1 if mesh is None else sharding_lib.mesh_size(mesh)
  n = config.providers
  sizes = memory_lib.sizes_for(
      trainer, behaviour, div, x_train, y_train, providers=n,
      batch_size=config.batch_size, subrun_steps=config.subrun_steps,
      devices=d)
  # The client's, the no-defense chain's and (attack_check) every provider's
  # own model stay allocated throughout.
  state = sizes.params + sizes.opt_state + sizes.model_state
  own = -(-n // d) if config.attack_check else 0
  sizes = dataclasses.replace(sizes, resident=(2 + own) * state)
  available = config.memory_mb * 2**20 if config.memory_mb else None
  return memory_lib.plan(sizes, available)


def run(config: SimConfig, *, progress: bool = True,
        dataset: data_lib.Dataset | None = None,
        record_metrics: tuple[str, ...] = (),
        workdir: str | None = None, resume: bool = True,
        behaviour: attacks_lib.Behaviour | None = None,
        hooks: train_lib.Hooks | None = None,
        behaviour_for_subrun: Any = None) -> SimResult:
  """Runs one simulation end to end (see module docstring).

  Args:
    config: the simulation.
    progress: show a progress bar over sub-runs (stderr).
    dataset: an already loaded dataset (else `config.dataset` is loaded).
    record_metrics: further metrics whose matrices are computed and recorded
      at every replicated sub-run (in `SimResult.recorded`), so that other
      metric/detector pairs can be evaluated on the same sub-runs with
      `replay` (the client's trajectory follows config.metric/detector).
    workdir: if given, the state is checkpointed there after every sub-run
      and, with `resume`, a run found there continues where it stopped. A
      resumed run gives bitwise the same results as an uninterrupted one.
    resume: continue from a checkpoint in `workdir` (else start over).
    behaviour: a custom per-provider Behaviour (e.g. adaptive attacks); by
      default it is built from config.attack / malicious. Its malicious count
      must equal config.malicious.
    hooks: custom trainer hooks for `behaviour` (default
      `attacks.make_hooks(behaviour)`).
    behaviour_for_subrun: optional host-side function
      (behaviour, subrun index) -> behaviour used for that sub-run (same
      shapes, so no recompilation), e.g. an attacker that poisons only some
      sub-runs. It cannot see which sub-runs are replicated.
  """
  for m in record_metrics:
    require(m in METRICS, "record_metrics",
            f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
  config.validate()
  t0 = time.perf_counter()
  ds = dataset if dataset is not None else data_lib.load_dataset(
      config.dataset, config.data_dir, max_train=config.max_train or None,
      max_len=config.max_len, vocab_size=config.vocab_size)
  config = resolve(config, ds)
  family = ATTACK_FAMILY[ds.modality]
  n, k = config.providers, config.subrun_steps
  train_lib.check_population_args(n, k, config.batch_size, ds.x_train.shape[0])
  if config.target_label >= ds.num_classes:
    raise ConfigError(f"target_label: must be in [0, {ds.num_classes - 1}] "
                      f"(or -1), got {config.target_label}")
  hostile = hostile_lib.parse_hostile(config.hostile, n)
  if behaviour is None:
    behaviour = make_behaviour(config, ds)
  require(behaviour.size == n, "behaviour",
          f"has {behaviour.size} providers, config has {n}")
  malicious = behaviour.malicious
  require(int(malicious.sum()) == config.malicious, "behaviour",
          f"has {int(malicious.sum())} malicious providers, config says "
          f"{config.malicious}")
  model = models_lib.get_model(config.model, ds.num_classes, ds.input_shape,
                               vocab_size=len(ds.vocab) if ds.vocab else None)
  trainer = train_lib.make_trainer(
      model, config.train_config(), config.divergence_config(),
      hooks if hooks is not None else family.make_hooks(behaviour))
  full_behaviour = behaviour
  div = div_lib.make_divergence(config.divergence_config(), n, config.seed)
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  probe_x = jnp.asarray(ds.x_test[:config.probe_size])
  mesh = None
  if config.devices != 1:
    require(config.devices <= jax.device_count(), "devices",
            f"{config.devices} devices requested, {jax.device_count()} "
            "available")
    mesh = sharding_lib.make_mesh(config.devices or None)
    sharding_lib.check_divisible(n, mesh, field="devices")
  # Multi-host: every process keeps a host copy of what the providers return
  # (what a client receives anyway) and runs the same host loop; training and
  # distances stay split over the global mesh.
  gather = jax.process_count() > 1
  mem = memory_plan(config, trainer, behaviour, div, x_train, y_train, mesh)
  if mem.num_chunks > 1:
    plan_note = (f"memory: {n} providers do not fit at once (estimated "
                 f"{mem.estimate['peak'] / 2**20:.1f} MiB per device for "
                 f"{mem.chunk} of them, budget {mem.budget / 2**20:.1f} MiB); "
                 f"trained in {mem.num_chunks} chunks of {mem.chunk}")

  def population_sub_run(pop, schedule, keys, behaviour_):
    """All n providers' sub-run: over the mesh if there is one, in provider
    chunks if the population does not fit in one go."""
    args = (pop, x_train, y_train, schedule, keys, div, behaviour_)
    if mem.num_chunks > 1:
      out_ = memory_lib.chunked_sub_run(trainer, *args, chunk_size=mem.chunk,
                                        mesh=mesh, to_host=gather)
    elif mesh is None:
      out_ = trainer.sub_run(*args)
    else:
      out_ = sharding_lib.sharded_sub_run(trainer, mesh, *args)
    return sharding_lib.to_host(out_) if gather else out_

  root = jax.random.key(config.seed)
  num_subruns = config.num_subruns
  replicated = np.sort(np.random.default_rng([config.seed, 0x5EED]).choice(
      num_subruns, config.replicated, replace=False))
  krum_f = None if config.krum_f < 0 else config.krum_f

  st = _initial_state(config, model, trainer, root, record_metrics)
  meta = {"next_subrun": 0, "replicated_done": 0, "notes": [], "reasons": {},
          "elapsed": 0.0}
  ckpt = None
  if workdir is not None:
    ckpt = ckpt_lib.Checkpointer(workdir, config)
    restored = ckpt.restore(st) if resume else None
    if restored is not None:
      _, st, meta = restored
      meta.pop("config", None)
      meta["notes"].append(f"resumed at sub-run {meta['next_subrun']}")
  t_resume = time.perf_counter()

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_subruns, initial=meta["next_subrun"], desc="sub-runs",
               unit="sub-run", dynamic_ncols=True)
  out = None
  for s in range(meta["next_subrun"], num_subruns):
    behaviour = (full_behaviour if behaviour_for_subrun is None
                 else behaviour_for_subrun(full_behaviour, s))
    schedule = jnp.asarray(data_lib.batch_schedule(
        config.seed, s, k, config.batch_size, ds.x_train.shape[0]))
    keys = train_lib.provider_keys(jax.random.fold_in(root, 1000 + s), n)
    client = st["client"]
    start = trainer.replicate(client["params"], client["model_state"], n,
                              opt_state=client["opt_state"])
    out, _ = population_sub_run(start, schedule, keys, behaviour)
    # What the providers return, and the client's checks of it.
    returned, odd = hostile_lib.tamper(out.params, hostile)
    active = st["active"]
    reasons = hostile_lib.check_returned(client["params"], returned, odd,
                                         active)
    for i, why in reasons.items():
      st["flagged_at"][i] = s
      meta["reasons"][str(i)] = why
    active = active & ~np.isin(np.arange(n), list(reasons))
    returned = hostile_lib.neutralize(returned, list(reasons))
    out = out._replace(params=returned)
    assign = np.random.default_rng([config.seed, 0xA551, s])
    chosen = None
    if s in replicated and active.sum() >= 2:
      r = meta["replicated_done"]
      key = jax.random.fold_in(root, 2000 + s)
      d = model_distances(config, model, client["params"], out, probe_x, key,
                          mesh)
      st["matrices"][r], st["members"][r] = d, active
      for m in record_metrics:
        st["recorded"][m][r] = d if m == config.metric else model_distances(
            dataclasses.replace(config, metric=m), model, client["params"],
            out, probe_x, key, mesh)
      if config.detector == "median" or record_metrics:
        rows = train_lib.flatten_population(
            dist_lib.updates(client["params"], out.params))
        st["median"][r] = np.asarray(detect_lib.median_distances(
            rows, jnp.asarray(active)))
        # For replay: distances to the median of ALL providers' updates.
        st["recorded_median"][r] = np.asarray(detect_lib.median_distances(
            rows, jnp.ones(n, bool)))
      meta["replicated_done"] = r + 1
      evidence = detect_lib.Evidence(list(st["matrices"][:r + 1]),
                                     list(st["members"][:r + 1]))
      verdict = detect_lib.detect(config.detector, evidence, n,
                                  alpha=config.alpha, krum_f=krum_f,
                                  ks_margin=config.ks_margin,
                                  median_evidence=list(st["median"][:r + 1]))
      st["scores"][active] = np.asarray(verdict.scores)[active]
      new = verdict.flags & active
      st["flagged_at"][new] = s
      active = active & ~new
      if active.any():
        chosen = medoid(d, active)
      else:
        meta["notes"].append(f"sub-run {s}: every provider was flagged; the "
                             "client keeps its checkpoint")
    else:
      if s in replicated:
        meta["notes"].append(f"sub-run {s}: fewer than 2 trusted providers "
                             "left, no comparison possible")
      if active.any():
        chosen = int(assign.choice(np.flatnonzero(active)))
    st["active"] = active
    if chosen is not None:
      st["client"] = {"params": _take(out.params, chosen),
                      "opt_state": _take(out.opt_state, chosen),
                      "model_state": _take(out.model_state, chosen)}
    # No defense: one provider drawn among all, accepted unchecked.
    who = int(np.random.default_rng([config.seed, 0x0DEF, s]).integers(n))
    nodef = st["nodef"]
    single = trainer.replicate(nodef["params"], nodef["model_state"], 1,
                               opt_state=nodef["opt_state"])
    single, _ = trainer.sub_run(single, x_train, y_train, schedule,
                                keys[who:who + 1], _take_slice(div, who),
                                _take_slice(behaviour, who))
    st["nodef"] = {"params": _take(single.params, 0),
                   "opt_state": _take(single.opt_state, 0),
                   "model_state": _take(single.model_state, 0)}
    if config.attack_check:
      own = train_lib.Population(**st["own"])
      own, _ = population_sub_run(own, schedule, keys, behaviour)
      st["own"] = own._asdict()
    meta["next_subrun"] = s + 1
    if ckpt is not None:
      ckpt.save(s, st, dict(meta, elapsed=meta["elapsed"] + time.perf_counter()
                            - t_resume))
    if bar is not None:
      bar.set_postfix(replicated=meta["replicated_done"],
                      flagged=int((st["flagged_at"] >= 0).sum()),
                      trusted=int(st["active"].sum()))
      bar.update(1)
  if bar is not None:
    bar.close()
  if ckpt is not None:
    ckpt.close()

  # Evaluation.
  notes = list(meta["notes"])
  if mem.num_chunks > 1:
    notes.append(plan_note)
  if config.attack_check:
    final = train_lib.Population(**st["own"])
  else:
    final = out if out is not None else trainer.replicate(
        st["client"]["params"], st["client"]["model_state"], n)
    notes.append("attack_check is off: provider metrics are of the models "
                 "returned for the last sub-run (k steps from the client's "
                 "checkpoint), not of a full run")
  behaviour = full_behaviour
  acc = train_lib.evaluate(model, final.params, final.model_state, ds.x_test,
                           ds.y_test)
  asr = family.attack_success_rate(model, final.params, final.model_state,
                                   behaviour, ds.x_test, ds.y_test)
  as_tuple = lambda c: (c["params"], c["opt_state"], c["model_state"])
  client_report = _final_model_report(model, as_tuple(st["client"]),
                                      behaviour, ds, malicious)
  nodef_report = _final_model_report(model, as_tuple(st["nodef"]), behaviour,
                                     ds, malicious)
  r = meta["replicated_done"]
  flagged_at = np.asarray(st["flagged_at"])
  reasons = {int(i): why for i, why in meta["reasons"].items()}
  return SimResult(
      config=config, malicious=malicious, attack_names=behaviour.names(),
      flags=flagged_at >= 0, flagged_at=flagged_at,
      scores=np.asarray(st["scores"]), clean_accuracy=np.asarray(acc),
      attack_success_rate=np.asarray(asr), client=client_report,
      no_defense=nodef_report, replicated_subruns=list(replicated),
      matrices=list(st["matrices"][:r]), members=list(st["members"][:r]),
      wall_seconds=meta["elapsed"] + time.perf_counter() - t_resume
      if ckpt is not None else time.perf_counter() - t0,
      notes=notes,
      recorded={m: list(v[:r]) for m, v in st["recorded"].items()},
      recorded_median=list(st["recorded_median"][:r]), reasons=reasons,
      memory=memory_report(mem))


def memory_report(plan: memory_lib.Plan) -> dict:
  """The memory plan as results.json records it (MiB per device)."""
  mib = lambda b: round(b / 2**20, 3)
  return {"providers_per_chunk": int(plan.chunk),
          "chunks": int(plan.num_chunks),
          "estimated_peak_mib": mib(plan.estimate["peak"]),
          "budget_mib": mib(plan.budget),
          "estimate_mib": {k: mib(v) for k, v in plan.estimate.items()}}


def _initial_state(config: SimConfig, model, trainer, root,
                   record_metrics) -> dict:
  """The protocol state before the first sub-run (a checkpointable pytree)."""
  n, m = config.providers, config.replicated
  params, model_state = model.init(jax.random.fold_in(root, 0))
  client = {"params": params, "opt_state": trainer.optimizer.init(params),
            "model_state": model_state}
  st = {
      "client": client,
      "nodef": dict(client),
      "active": np.ones(n, bool),
      "flagged_at": np.full(n, -1, np.int64),
      "scores": np.zeros(n),
      "matrices": np.zeros((m, n, n)),
      "members": np.zeros((m, n), bool),
      "median": np.zeros((m, n)),
      "recorded": {k: np.zeros((m, n, n)) for k in record_metrics},
      "recorded_median": np.zeros((m, n)),
  }
  if config.attack_check:
    st["own"] = trainer.replicate(params, model_state, n)._asdict()
  return st


def _final_model_report(model, state, behaviour, ds, malicious) -> dict:
  params, _, model_state = state
  one = lambda t: jax.tree_util.tree_map(lambda a: a[None], t)
  acc = float(train_lib.evaluate(model, one(params), one(model_state),
                                 ds.x_test, ds.y_test)[0])
  worst, per = _client_asr(model, params, model_state, behaviour, ds,
                           malicious)
  return {"clean_accuracy": acc, "attack_success_rate": worst,
          "attack_success_rate_per_trigger": per}


def replay(matrices: list[np.ndarray], n: int, detector: str, *,
           alpha: float = 0.01, ks_margin: float = 10.0,
           krum_f: int | None = None,
           median_distances: list[np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Replays the client's sequential detection on recorded matrices.

  Same rule as `run`: after each replicated sub-run the detector sees the
  evidence pooled so far among the still-trusted providers, and flagged
  providers are excluded from then on. Returns (flags, flagged_at index of the
  replicated sub-run or -1, scores).
  """
  active = np.ones(n, bool)
  flagged_at = np.full(n, -1)
  scores = np.zeros(n)
  evidence = detect_lib.Evidence()
  med_ev: list[np.ndarray] = []
  for r, d in enumerate(matrices):
    if active.sum() < 2:
      break
    members = active.copy()
    evidence.add(d, members)
    if median_distances is not None:
      med_ev.append(median_distances[r])
    verdict = detect_lib.detect(detector, evidence, n, alpha=alpha,
                                krum_f=krum_f, ks_margin=ks_margin,
                                median_evidence=med_ev or None)
    scores[members] = np.asarray(verdict.scores)[members]
    new = verdict.flags & active
    flagged_at[new] = r
    active &= ~new
  return flagged_at >= 0, flagged_at, scores
