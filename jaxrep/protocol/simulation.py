"""What stays fixed during a simulation: the resolved config, the data, the
model and trainer, the providers' behaviour and divergence, the device mesh,
the memory plan and the client's secret choice of replicated sub-runs.

`setup` builds it once (nothing here is checkpointed: it is a function of the
config); the protocol's steps read it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep import config as config_lib
from jaxrep.config import SimConfig
from jaxrep.core import rng
from jaxrep.core.errors import ConfigError, require
from jaxrep import data as data_lib
from jaxrep import distances
from jaxrep.detect import detectors as detect_lib
from jaxrep import models as models_lib
from jaxrep.population import adaptive as adaptive_lib
from jaxrep.population import build as population_lib
from jaxrep.population import divergence as div_lib
from jaxrep.protocol import hostile as hostile_lib
from jaxrep.runtime import memory as memory_lib
from jaxrep.runtime import mesh as mesh_lib
from jaxrep.train import schedule as schedule_lib
from jaxrep.train import trainer as train_lib

METRICS = distances.METRICS
AUTO = config_lib.AUTO
# What "auto" means for --model, by the dataset's modality.
DEFAULT_MODEL = {"image": "mlp", "text": "text_cnn"}


def train_config(config: SimConfig) -> train_lib.TrainConfig:
  """The trainer's hyper-parameters of a simulation."""
  t = config.training
  return train_lib.TrainConfig(
      optimizer=t.optimizer, learning_rate=t.learning_rate,
      momentum=t.momentum, schedule=t.schedule,
      total_steps=config.protocol.steps, batch_size=t.batch_size)


def validate(config: SimConfig) -> SimConfig:
  """Every check that can be made without loading data: the config's own
  fields and the names each stage knows (model, attack and its options,
  metric, detector, hostile providers, optimizer and schedule)."""
  config.validate()
  model = config.model.name
  require(model in models_lib.MODELS + (AUTO,), "model",
          f"unknown model {model!r}; choose one of "
          f"{', '.join(models_lib.MODELS + (AUTO,))}")
  population_lib.validate_attack(config.attack)
  div_lib.parse_stacks(config.divergence)
  require(config.attack.adaptive in ("none",) + adaptive_lib.ADAPTIVE,
          "adaptive", f"unknown adaptive attack {config.attack.adaptive!r}; "
          f"choose one of {', '.join(('none',) + adaptive_lib.ADAPTIVE)}")
  if config.attack.adaptive == "collusion":
    require(config.attack.adaptive_strength == -1, "adaptive_strength",
            "collusion has no strength: the colluders are the --malicious "
            "providers")
  require(config.detector.metric in METRICS, "metric",
          f"unknown metric {config.detector.metric!r}; choose one of "
          f"{', '.join(METRICS)}")
  require(config.detector.name in detect_lib.DETECTORS, "detector",
          f"unknown detector {config.detector.name!r}; choose one of "
          f"{', '.join(detect_lib.DETECTORS)}")
  hostile_lib.parse_hostile(config.protocol.hostile, config.protocol.providers)
  train_config(config).validate()
  return config


def resolve(config: SimConfig, ds: data_lib.Dataset) -> SimConfig:
  """The config with "auto" model / attack made concrete for the dataset and
  every attack option filled in, checked against the dataset's modality (an
  image attack on text is a ConfigError)."""
  modality = ds.modality
  model = (DEFAULT_MODEL[modality] if config.model.name == AUTO
           else config.model.name)
  text_model = model in models_lib.TEXT_MODELS
  fitting = (models_lib.TEXT_MODELS if modality == "text"
             else models_lib.IMAGE_MODELS)
  require(text_model == (modality == "text"), "model",
          f"{model} is {'a text' if text_model else 'an image'} model but "
          f"dataset {ds.name} holds "
          f"{'text' if modality == 'text' else 'images'}; use one of "
          f"{', '.join(fitting)}")
  attack = population_lib.resolve_attack(config.attack.name, modality, ds.name)
  config = config.replace(model=model, attack=attack)
  return dataclasses.replace(
      config, attack=population_lib.with_defaults(config.attack))


@dataclasses.dataclass(frozen=True)
class Simulation:
  """The fixed context of one simulation (see module docstring)."""
  config: SimConfig
  dataset: data_lib.Dataset
  model: models_lib.Model
  trainer: train_lib.Trainer
  behaviour: Any                 # every provider's behaviour (a pytree [n])
  divergence: div_lib.Divergence
  x_train: jax.Array
  y_train: jax.Array
  train_examples: int            # batches draw from x_train[:train_examples]
  probe_x: jax.Array             # x_train[train_examples:], held out
  mesh: Any                      # jax.sharding.Mesh or None
  memory: memory_lib.Plan
  replicated: np.ndarray         # sorted indices of the replicated sub-runs
  root: jax.Array                # root PRNG key
  hostile: dict
  record_metrics: tuple
  behaviour_for_subrun: Callable | None

  @property
  def n(self) -> int:
    return self.config.protocol.providers

  @property
  def gather(self) -> bool:
    """Multi-host: every process keeps a host copy of what the providers
    return (what a client receives anyway) and runs the same host loop."""
    return jax.process_count() > 1

  def subrun_behaviour(self, s: int):
    if self.behaviour_for_subrun is None:
      return self.behaviour
    return self.behaviour_for_subrun(self.behaviour, s)

  def schedule(self, s: int) -> jax.Array:
    """The batch schedule of sub-run s (never the held-out probe inputs)."""
    return jnp.asarray(schedule_lib.batch_schedule(
        self.config.seed, s, self.config.protocol.subrun_steps,
        self.config.training.batch_size, self.train_examples))

  def keys(self, s: int) -> jax.Array:
    return rng.provider_keys(rng.subrun(self.root, s), self.n)

  def train_providers(self, pop, schedule, keys, behaviour):
    """All n providers' sub-run: over the mesh if there is one, in provider
    chunks if the population does not fit in one go."""
    args = (pop, self.x_train, self.y_train, schedule, keys, self.divergence,
            behaviour)
    if self.memory.num_chunks > 1:
      out = memory_lib.chunked_sub_run(self.trainer, *args,
                                       chunk_size=self.memory.chunk,
                                       mesh=self.mesh, to_host=self.gather)
    elif self.mesh is None:
      out = self.trainer.sub_run(*args)
    else:
      out = mesh_lib.sharded_sub_run(self.trainer, self.mesh, *args)
    return mesh_lib.to_host(out) if self.gather else out


def memory_plan(config: SimConfig, trainer, behaviour, div, x_train, y_train,
                mesh=None) -> memory_lib.Plan:
  """How the population's sub-runs fit in device memory (`runtime.memory`).

  Estimates the peak bytes per device of a sub-run and of the distance
  kernels from the traced training step (nothing is allocated) and picks the
  number of providers trained at once: all n when they fit, else chunks
  (a multiple of the mesh size) that give the same models. A config that
  cannot fit even one provider per device raises ConfigError naming what to
  shrink. The budget is `config.memory_mb` MiB per device, else what the
  device reports (on CPU: the host's available memory shared by its
  devices).
  """
  d = 1 if mesh is None else mesh_lib.mesh_size(mesh)
  n = config.protocol.providers
  sizes = memory_lib.sizes_for(
      trainer, behaviour, div, x_train, y_train, providers=n,
      batch_size=config.training.batch_size,
      subrun_steps=config.protocol.subrun_steps, devices=d)
  # The client's, the no-defense chain's and (attack_check) every provider's
  # own model stay allocated throughout.
  state = sizes.params + sizes.opt_state + sizes.model_state
  own = -(-n // d) if config.protocol.attack_check else 0
  sizes = dataclasses.replace(
      sizes, resident=(2 + own) * state,
      distance_bytes=distances.working_set_bytes(n, d, sizes.params))
  mb = config.runtime.memory_mb
  return memory_lib.plan(sizes, mb * 2**20 if mb else None)


def _mesh(config: SimConfig, n: int):
  devices = config.runtime.devices
  if devices == 1:
    return None
  require(devices <= jax.device_count(), "devices",
          f"{devices} devices requested, {jax.device_count()} available")
  mesh = mesh_lib.make_mesh(devices or None)
  mesh_lib.check_divisible(n, mesh, field="devices")
  return mesh


def load(config: SimConfig) -> data_lib.Dataset:
  """The dataset of a config's data section."""
  d = config.data
  return data_lib.load_dataset(d.dataset, d.data_dir,
                               max_train=d.max_train or None,
                               max_len=d.max_len, vocab_size=d.vocab_size)


def setup(config: SimConfig, *, dataset: data_lib.Dataset | None = None,
          behaviour: Any = None, hooks: Any = None,
          behaviour_for_subrun: Callable | None = None,
          record_metrics: tuple[str, ...] = ()) -> Simulation:
  """Loads, resolves and builds everything a simulation holds fixed."""
  for m in record_metrics:
    require(m in METRICS, "record_metrics",
            f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
  validate(config)
  ds = dataset if dataset is not None else load(config)
  config = resolve(config, ds)
  n = config.protocol.providers
  train_lib.check_population_args(n, config.protocol.subrun_steps,
                                  config.training.batch_size,
                                  ds.x_train.shape[0])
  # The probe inputs of output/CKA/Zest: the last probe_size training
  # examples, held out of every batch.
  train_examples, probe_x = ds.probe_split(config.detector.probe_size,
                                           config.training.batch_size)
  target = config.attack.target_label
  if target >= ds.num_classes:
    raise ConfigError(f"target_label: must be in [0, {ds.num_classes - 1}] "
                      f"(or -1), got {target}")
  if behaviour is None:
    behaviour = population_lib.make_behaviour(config, ds)
  require(behaviour.size == n, "behaviour",
          f"has {behaviour.size} providers, config has {n}")
  malicious = int(behaviour.malicious.sum())
  require(malicious == config.attack.malicious, "behaviour",
          f"has {malicious} malicious providers, config says "
          f"{config.attack.malicious}")
  model = models_lib.get_model(config.model.name, ds.num_classes,
                               ds.input_shape,
                               vocab_size=len(ds.vocab) if ds.vocab else None)
  if hooks is None:
    hooks = population_lib.family(ds.modality).make_hooks(behaviour)
  trainer = train_lib.make_trainer(model, train_config(config),
                                   config.divergence, hooks,
                                   config.runtime.provider_block)
  div = div_lib.make_divergence(config.divergence, n, config.seed)
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  mesh = _mesh(config, n)
  p = config.protocol
  replicated = np.sort(rng.replicated(config.seed).choice(
      p.num_subruns, p.replicated, replace=False))
  return Simulation(
      config=config, dataset=ds, model=model, trainer=trainer,
      behaviour=behaviour, divergence=div, x_train=x_train, y_train=y_train,
      train_examples=train_examples, probe_x=jnp.asarray(probe_x), mesh=mesh,
      memory=memory_plan(config, trainer, behaviour, div, x_train, y_train,
                         mesh),
      replicated=replicated, root=rng.root(config.seed),
      hostile=hostile_lib.parse_hostile(p.hostile, n),
      record_metrics=tuple(record_metrics),
      behaviour_for_subrun=behaviour_for_subrun)
