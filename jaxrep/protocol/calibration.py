"""Adaptive attackers in a simulation: what they measure and who they are.

`calibrate` measures the benign divergence the way an attacker could, by
replaying a sub-run of the protocol with benign replicas: constrained and
mimicry attackers (`population.adaptive`) size their deviation by it.
`population` builds a whole population of adaptive attackers for
`protocol.run` (`Setup`: behaviour, hooks and sporadic schedule), on images
or text: each attacker plants the config's attack (auto: the modality's
default, BadNets or a token trigger) with its own backdoor.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep import data as data_lib
from jaxrep import distances as dist_lib
from jaxrep import models as models_lib
from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import require
from jaxrep.population import adaptive
from jaxrep.population import build as population_lib
from jaxrep.population import divergence as div_lib
from jaxrep.population.behaviour import Hooks
from jaxrep.protocol import simulation
from jaxrep.train import schedule as schedule_lib
from jaxrep.train import trainer as train_lib


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Benign divergence measured in one all-benign sub-run.

  Attributes:
    distance: median benign-benign L2 distance of the updates.
    update_norm: median L2 norm of the updates.
    ratio: distance / update_norm.
  """
  distance: float
  update_norm: float
  ratio: float


def _vocab_size(dataset: data_lib.Dataset) -> int | None:
  return len(dataset.vocab) if dataset.vocab else None


def calibrate(config, dataset: data_lib.Dataset, *, subrun: int = 0,
              providers: int | None = None) -> Calibration:
  """Measures the benign divergence the way an attacker could.

  Replays sub-run `subrun` of the protocol's schedule from the protocol's
  initial checkpoint (for subrun 0 that is exactly the first sub-run the
  providers receive) with `providers` benign replicas (default config's n)
  and config's divergence.
  """
  config = simulation.resolve(config, dataset)
  n = providers or config.protocol.providers
  vocab_size = _vocab_size(dataset)
  model = models_lib.get_model(config.model.name, dataset.num_classes,
                               dataset.input_shape, vocab_size=vocab_size)
  trainer = train_lib.make_trainer(model, simulation.train_config(config),
                                   config.divergence,
                                   provider_block=config.runtime.provider_block)
  root = rng_lib.root(config.seed)
  params, model_state = model.init(rng_lib.model_init(root))
  pop = trainer.replicate(params, model_state, n)
  train_examples, _ = dataset.probe_split(config.detector.probe_size,
                                         config.training.batch_size)
  schedule = jnp.asarray(schedule_lib.batch_schedule(
      config.seed, subrun, config.protocol.subrun_steps,
      config.training.batch_size, train_examples))
  keys = rng_lib.provider_keys(rng_lib.subrun(root, subrun), n)
  div = div_lib.make_divergence(config.divergence, n, config.seed)
  benign = population_lib.family(dataset.modality).benign(
      n, dataset.input_shape, dataset.num_classes, vocab_size)
  out, _ = trainer.sub_run(pop, jnp.asarray(dataset.x_train),
                           jnp.asarray(dataset.y_train), schedule, keys, div,
                           benign)
  upd = dist_lib.updates(params, out.params)
  d = np.asarray(dist_lib.pairwise_distances(upd, "l2"), np.float64)
  dist = float(np.median(d[np.triu_indices(n, 1)]))
  norms = np.asarray(jax.vmap(adaptive.tree_norm)(upd), np.float64)
  norm = float(np.median(norms))
  return Calibration(distance=dist, update_norm=norm,
                     ratio=dist / max(norm, 1e-30))


class Setup(NamedTuple):
  """Arguments for `protocol.run` (behaviour, hooks, behaviour_for_subrun)."""
  behaviour: adaptive.Adaptive
  hooks: Hooks
  behaviour_for_subrun: Any
  malicious: int


def population(config, dataset: data_lib.Dataset, attack: str,
               strength: float, *, malicious: int | None = None,
               calibration: Calibration | None = None,
               placement: str = "random", poison_rate: float = 0.1,
               noise: float = 1.0) -> Setup:
  """A population of config's n providers with adaptive attackers (which
  providers attack is drawn from the seed, as in `make_behaviour`).

  Args:
    config: the `SimConfig` (providers, seed, the attack and its options).
    dataset: the dataset (images or text).
    attack: one of `adaptive.ADAPTIVE`.
    strength: the knob; for collusion the colluding SHARE of n (the number
      of colluders is round(share x n), at least 1).
    malicious: how many adaptive attackers (ignored for collusion; default
      config's). Each has its own backdoor of config's attack (own random
      target and trigger), except colluders, who share one.
    calibration: needed by constrained and mimicry (default: `calibrate`).
    placement: sporadic: "random" or "last" sub-runs.
    poison_rate: base poison rate (low_rate overrides it; -1: the attack's
      default).
    noise: mimicry noise norm in benign distances.

  Returns:
    a `Setup`; pass `config.replace(malicious=setup.malicious)`.
  """
  require(attack in adaptive.ADAPTIVE, "attack",
          f"unknown adaptive attack {attack!r}; choose one of "
          f"{', '.join(adaptive.ADAPTIVE)}")
  config = simulation.resolve(config, dataset)
  n = config.protocol.providers
  if attack == "collusion":
    require(0.0 < strength <= 1.0, "strength",
            f"collusion: share of providers in (0, 1], got {strength!r}")
    count = max(1, int(round(strength * n)))
  else:
    count = config.attack.malicious if malicious is None else int(malicious)
  require(0 <= count <= n, "malicious", f"must be in [0, {n}], got {count}")
  base = population_lib.make_behaviour(
      config.replace(malicious=count, poison_rate=poison_rate), dataset)
  b = adaptive.wrap(base)
  who = [int(i) for i in np.flatnonzero(base.malicious)]
  for_subrun = None
  if attack == "collusion":
    b = adaptive.collude(b, who)
  elif count:
    ratio = 0.0
    if attack in ("constrained", "mimicry"):
      calibration = calibration or calibrate(config, dataset)
      ratio = calibration.ratio
    b = adaptive.adapt(b, who, attack, strength, ratio=ratio, noise=noise)
    if attack == "sporadic":
      plan = adaptive.poison_plan(b, config.protocol.num_subruns, config.seed,
                                  placement=placement)
      for_subrun = adaptive.subrun_behaviour(plan)
  return Setup(b, adaptive.make_hooks(b), for_subrun, count)


# The adaptive attacks' knob when the config leaves it at -1.
DEFAULT_STRENGTH = {"low_rate": 1 / 32, "sporadic": 0.25, "constrained": 10.0,
                    "mimicry": 0.01}


def from_config(config, dataset: data_lib.Dataset) -> Setup | None:
  """The adaptive population the config's attack section asks for
  (`adaptive`, `adaptive_strength`), or None for plain attackers. The
  malicious providers are config's; colluders are all of them."""
  a = config.attack
  if a.adaptive == "none":
    return None
  strength = a.adaptive_strength
  if a.adaptive == "collusion":
    n = config.protocol.providers
    require(a.malicious >= 1, "malicious", "collusion needs at least one "
            "malicious provider")
    strength = a.malicious / n
  elif strength == -1:
    strength = DEFAULT_STRENGTH[a.adaptive]
  return population(config, dataset, a.adaptive, strength,
                    poison_rate=a.poison_rate)
