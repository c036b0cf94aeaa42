"""Adaptive adversaries: attackers who know the RTTD detection scheme.

Every adaptive attacker is still data: an `Adaptive` pytree wraps the plain
`attacks.Behaviour` (trigger, target, poison rate ...) and adds per-provider
fields, so a mixed population of benign, plain and adaptive providers trains
in ONE compiled sub-run. `Adaptive` forwards the `Behaviour` fields and
`size` / `malicious` / `names()`, so `protocol.run` and
`attacks.attack_success_rate` take it unchanged.

| attack       | knob (`strength`)   | what the provider does                       |
|--------------|---------------------|----------------------------------------------|
| low_rate     | poison rate         | plain BadNets with a small rate (>= 1/batch) |
| sporadic     | share of sub-runs   | BadNets in a fixed share of its sub-runs,    |
|              |                     | benign in the others (host-side schedule)    |
| constrained  | c (epsilon factor)  | returns clean_end + clip(poisoned_end -      |
|              |                     | clean_end, eps), eps = c x benign distance   |
| mimicry      | keep                | returns clean_end + keep x (poisoned_end -   |
|              |                     | clean_end) + noise of the benign scale       |
| collusion    | share of n          | that many providers share ONE backdoor       |

Design decisions:

* constrained and mimicry project per SUB-RUN, not per step: the provider
  trains a poisoned run and its own clean twin over the k steps (same keys and
  divergence, so the twin is bitwise what it would return if honest) and
  shapes only what it returns. That is the stronger adversary with respect to
  the client's distance (the bound holds on the returned model, which is what
  is compared, while per-step bounds compound over k steps), and its clean
  reference includes its own benign divergence. The twin is a cohort
  (`train.Hooks.twin_size`): only these providers pay for it. The twin's
  optimizer state is returned too, so parameters are the only channel.
* epsilon follows the training schedule: eps = c x ratio x ||clean update||,
  where ratio = (median benign-benign distance) / (median update norm) is
  measured once in a calibration sub-run (`calibrate`). The attacker can
  measure that itself (replicate a sub-run it was given on its own stacks);
  a fixed absolute epsilon would be too loose late in a cosine schedule and
  too tight early.
* mimicry's noise is isotropic Gaussian with norm `noise` x ratio x
  ||clean update|| (default 1: one benign distance). Against an L2 client the
  noise only adds distance; it exists to make the deviation's direction look
  random rather than a consistent backdoor direction.
* sporadic attackers choose their poisoned sub-runs once (deterministic per
  (seed, provider)): exactly round(share x S) of the S sub-runs, at random
  places or the last ones (`placement`). They cannot see which sub-runs are
  replicated. In skipped sub-runs they are benign (poison rate 0, no update
  scaling, no twin shaping) with the same shapes, so nothing recompiles.
* colluders are built with one trigger (mask, pattern, target) copied from
  the first colluder; they differ only by their benign divergence.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.population import image_attacks as attacks_lib
from jaxrep.data import datasets as data_lib
from jaxrep.distances import kernels as dist_lib
from jaxrep.population import divergence as div_lib
from jaxrep.models import zoo as models_lib
from jaxrep.train import trainer as train_lib
from jaxrep.core import rng as rng_lib
from jaxrep.train import schedule as schedule_lib
from jaxrep.core.errors import require

ADAPTIVE = ("low_rate", "sporadic", "constrained", "mimicry", "collusion")
TAG = {"none": 0, "low_rate": 1, "sporadic": 2, "constrained": 3,
       "mimicry": 4, "collusion": 5}
TAG_NAMES = {v: k for k, v in TAG.items()}
MODE = {"none": 0, "constrained": 1, "mimicry": 2}
PLACEMENTS = ("random", "last")


class Adaptive(NamedTuple):
  """A `Behaviour` plus adaptive per-provider fields (leading axis [n]).

  Attributes:
    base: the plain behaviour (trigger, target, poison rate, scale ...).
    tag: int32, which adaptive attack (see TAG; 0 = plain or benign).
    mode: int32 return shaping (see MODE): 0 none, 1 constrained, 2 mimicry.
    strength: float32, constrained: epsilon factor c; mimicry: keep.
    ratio: float32, calibrated benign distance / update norm.
    noise: float32, mimicry noise norm in benign distances.
    share: float32, sporadic: share of sub-runs poisoned (1 = all).
  """
  base: attacks_lib.Behaviour
  tag: jax.Array
  mode: jax.Array
  strength: jax.Array
  ratio: jax.Array
  noise: jax.Array
  share: jax.Array

  # The protocol and attacks.attack_success_rate read these.
  @property
  def size(self) -> int:
    return self.base.size

  @property
  def malicious(self) -> np.ndarray:
    return self.base.malicious

  def names(self) -> list[str | None]:
    """Adaptive attack name where there is one, else the plain name."""
    plain = self.base.names()
    return [TAG_NAMES[int(t)] if t else p
            for t, p in zip(np.asarray(self.tag), plain)]

  kind = property(lambda self: self.base.kind)
  poison_rate = property(lambda self: self.base.poison_rate)
  target = property(lambda self: self.base.target)
  source = property(lambda self: self.base.source)
  mask = property(lambda self: self.base.mask)
  pattern = property(lambda self: self.base.pattern)
  alpha = property(lambda self: self.base.alpha)
  warp = property(lambda self: self.base.warp)
  scale = property(lambda self: self.base.scale)


def wrap(base: attacks_lib.Behaviour) -> Adaptive:
  """A plain behaviour as an `Adaptive` with no adaptive provider."""
  n = base.size
  zeros_f = jnp.zeros((n,), jnp.float32)
  return Adaptive(base=base, tag=jnp.zeros((n,), jnp.int32),
                  mode=jnp.zeros((n,), jnp.int32), strength=zeros_f,
                  ratio=zeros_f, noise=zeros_f,
                  share=jnp.ones((n,), jnp.float32))


def _set(arr, who, value, dtype):
  a = np.asarray(arr).copy()
  a[np.asarray(who)] = value
  return jnp.asarray(a, dtype)


def adapt(behaviour: Adaptive, who: Sequence[int], attack: str,
          strength: float, *, ratio: float = 0.0, noise: float = 1.0
          ) -> Adaptive:
  """Makes providers `who` run adaptive `attack` with knob `strength`.

  The providers must already be malicious in `behaviour.base` (their trigger
  is what they plant).

  Args:
    behaviour: the population.
    who: provider indices.
    attack: one of ADAPTIVE.
    strength: the knob (see the module table). low_rate: poison rate;
      sporadic: share of sub-runs in (0, 1]; constrained: c > 0; mimicry:
      keep in [0, 1]; collusion: ignored (use `collude`).
    ratio: benign distance / update norm from `calibrate` (constrained and
      mimicry need it > 0).
    noise: mimicry noise norm in benign distances (>= 0).
  """
  require(attack in ADAPTIVE, "attack",
          f"unknown adaptive attack {attack!r}; choose one of "
          f"{', '.join(ADAPTIVE)}")
  who = np.asarray(list(who), int)
  require(bool(np.all(behaviour.malicious[who])), "who",
          "adaptive providers must be malicious in the base behaviour")
  s = float(strength)
  require(np.isfinite(s), "strength", f"must be finite, got {strength!r}")
  b = behaviour
  base = b.base
  if attack == "low_rate":
    require(0.0 < s <= 1.0, "strength", f"low_rate: poison rate in (0, 1], "
            f"got {s}")
    base = base._replace(poison_rate=_set(base.poison_rate, who, s,
                                          jnp.float32))
  if attack == "sporadic":
    require(0.0 < s <= 1.0, "strength", f"sporadic: share of sub-runs in "
            f"(0, 1], got {s}")
  if attack in ("constrained", "mimicry"):
    require(np.isfinite(ratio) and ratio > 0, "ratio",
            f"{attack} needs the calibrated benign ratio > 0, got {ratio!r}")
    require(np.isfinite(noise) and noise >= 0, "noise",
            f"must be >= 0, got {noise!r}")
  if attack == "constrained":
    require(s > 0, "strength", f"constrained: c must be > 0, got {s}")
  if attack == "mimicry":
    require(0.0 <= s <= 1.0, "strength", f"mimicry: keep in [0, 1], got {s}")
  mode = MODE.get(attack, 0)
  return b._replace(
      base=base,
      tag=_set(b.tag, who, TAG[attack], jnp.int32),
      mode=_set(b.mode, who, mode, jnp.int32),
      strength=_set(b.strength, who, s if mode else 0.0, jnp.float32),
      ratio=_set(b.ratio, who, ratio if mode else 0.0, jnp.float32),
      noise=_set(b.noise, who, noise if attack == "mimicry" else 0.0,
                 jnp.float32),
      share=_set(b.share, who, s if attack == "sporadic" else 1.0,
                 jnp.float32))


def collude(behaviour: Adaptive, group: Sequence[int]) -> Adaptive:
  """Providers `group` share ONE backdoor: the first member's trigger.

  Mask, pattern, blend alpha, warp field, target, source and poison rate of
  every member are copied from group[0].
  """
  group = np.asarray(list(group), int)
  require(group.size >= 1 and bool(np.all(behaviour.malicious[group])),
          "group", "colluders must be malicious in the base behaviour")
  base = behaviour.base
  first = int(group[0])
  shared = {}
  for field in ("kind", "poison_rate", "target", "source", "mask", "pattern",
                "alpha", "warp", "scale"):
    a = np.asarray(getattr(base, field)).copy()
    a[group] = a[first]
    shared[field] = jnp.asarray(a, getattr(base, field).dtype)
  return behaviour._replace(base=base._replace(**shared),
                            tag=_set(behaviour.tag, group, TAG["collusion"],
                                     jnp.int32))


# ----------------------------------------------------------------------------
# Inside the sub-run (pure, one provider; vmapped by the trainer).


def _tree_norm(tree):
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


def _unit_noise(key, like):
  """Isotropic Gaussian tree shaped like `like`, with norm 1."""
  leaves, treedef = jax.tree_util.tree_flatten(like)
  keys = jax.random.split(key, len(leaves))
  noise = [jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)]
  norm = jnp.sqrt(sum(jnp.sum(jnp.square(z)) for z in noise))
  return jax.tree_util.tree_unflatten(treedef, [z / norm for z in noise])


def shape_return(b: Adaptive, key, start, end, clean_end):
  """What a constrained / mimicry provider returns (one provider).

  With the benign scale sigma = ratio x ||clean_end - start|| and the
  deviation dev = end - clean_end:
    constrained: clean_end + min(1, c sigma / ||dev||) dev  (||.|| <= c sigma)
    mimicry:     clean_end + keep dev + noise x sigma x unit Gaussian
    otherwise:   end.
  """
  dev = jax.tree_util.tree_map(lambda e, c: e - c, end, clean_end)
  sigma = b.ratio * _tree_norm(jax.tree_util.tree_map(lambda c, s: c - s,
                                                      clean_end, start))
  dev_norm = _tree_norm(dev)
  clip = jnp.minimum(1.0, b.strength * sigma / jnp.maximum(dev_norm, 1e-30))
  factor = jnp.where(b.mode == MODE["constrained"], clip,
                     jnp.where(b.mode == MODE["mimicry"], b.strength, 1.0))
  amount = jnp.where(b.mode == MODE["mimicry"], b.noise * sigma, 0.0)
  unit = _unit_noise(rng_lib.return_noise(key), dev)
  shaped = jax.tree_util.tree_map(lambda c, d, u: c + factor * d + amount * u,
                                  clean_end, dev, unit)
  return jax.tree_util.tree_map(
      lambda s, e: jnp.where(b.mode == MODE["none"], e, s), shaped, end)


def make_hooks(behaviour: Adaptive) -> train_lib.Hooks:
  """Trainer hooks for an `Adaptive` population.

  Poisoning and model replacement are those of `attacks` (on the base);
  providers with a return mode get a clean-twin cohort of exactly their
  number (0: no twin compiled in).
  """
  plain = attacks_lib.make_hooks(behaviour.base)
  twins = int(np.sum(np.asarray(behaviour.mode) != MODE["none"]))
  return train_lib.Hooks(
      poison_batch=lambda b, k, x, y: plain.poison_batch(b.base, k, x, y),
      finalize=lambda b, s, e: plain.finalize(b.base, s, e),
      twin_size=twins,
      needs_twin=lambda b: b.mode != MODE["none"],
      finalize_twin=shape_return)


# ----------------------------------------------------------------------------
# Host side: sporadic schedules and calibration.


def poison_plan(behaviour: Adaptive, num_subruns: int, seed: int, *,
                placement: str = "random") -> np.ndarray:
  """[n, S] bool: which sub-runs each provider poisons.

  Malicious providers with share < 1 poison exactly round(share x S) (at
  least 1) sub-runs: a random subset drawn from (seed, provider), or the last
  ones; every other malicious provider poisons all; benign ones none.
  """
  require(placement in PLACEMENTS, "placement",
          f"unknown placement {placement!r}; choose one of "
          f"{', '.join(PLACEMENTS)}")
  n = behaviour.size
  plan = np.zeros((n, num_subruns), bool)
  share = np.asarray(behaviour.share)
  for i in np.flatnonzero(behaviour.malicious):
    if share[i] >= 1.0:
      plan[i] = True
      continue
    count = max(1, int(round(share[i] * num_subruns)))
    if placement == "last":
      chosen = np.arange(num_subruns - count, num_subruns)
    else:
      rng = rng_lib.sporadic(seed, i)
      chosen = rng.permutation(num_subruns)[:count]
    plan[i, chosen] = True
  return plan


def subrun_behaviour(plan: np.ndarray) -> Callable[[Adaptive, int], Adaptive]:
  """`behaviour_for_subrun` for `protocol.run` from a poison plan.

  In sub-run s, providers with plan[i, s] False are benign: poison rate 0,
  update scale 1 and no return shaping; shapes are unchanged.
  """
  plan = np.asarray(plan, bool)

  def for_subrun(b: Adaptive, s: int) -> Adaptive:
    on = jnp.asarray(plan[:, s])
    base = b.base._replace(
        poison_rate=jnp.where(on, b.base.poison_rate, 0.0),
        scale=jnp.where(on, b.base.scale, 1.0))
    return b._replace(base=base, mode=jnp.where(on, b.mode, MODE["none"]))
  return for_subrun


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


def calibrate(config, dataset: data_lib.Dataset, *, subrun: int = 0,
              providers: int | None = None) -> Calibration:
  """Measures the benign divergence the way an attacker could.

  Replays sub-run `subrun` of the protocol's schedule from the protocol's
  initial checkpoint (for subrun 0 that is exactly the first sub-run the
  providers receive) with `providers` benign replicas (default config's n)
  and config's divergence.
  """
  from jaxrep.protocol import loop as protocol  # pylint: disable=g-import-not-at-top
  config = protocol.resolve(config, dataset)
  n = providers or config.providers
  model = models_lib.get_model(config.model.name, dataset.num_classes,
                               dataset.input_shape)
  trainer = train_lib.make_trainer(model, protocol.train_config(config),
                                   config.divergence)
  root = rng_lib.root(config.seed)
  params, model_state = model.init(rng_lib.model_init(root))
  pop = trainer.replicate(params, model_state, n)
  schedule = jnp.asarray(schedule_lib.batch_schedule(
      config.seed, subrun, config.subrun_steps, config.batch_size,
      dataset.x_train.shape[0]))
  keys = rng_lib.provider_keys(rng_lib.subrun(root, subrun), n)
  div = div_lib.make_divergence(config.divergence, n, config.seed)
  benign = attacks_lib.benign(n, dataset.input_shape, dataset.num_classes)
  out, _ = trainer.sub_run(pop, jnp.asarray(dataset.x_train),
                           jnp.asarray(dataset.y_train), schedule, keys, div,
                           benign)
  upd = dist_lib.updates(params, out.params)
  d = np.asarray(dist_lib.pairwise_distances(upd, "l2"), np.float64)
  dist = float(np.median(d[np.triu_indices(n, 1)]))
  norms = np.asarray(jax.vmap(_tree_norm)(upd), np.float64)
  norm = float(np.median(norms))
  return Calibration(distance=dist, update_norm=norm,
                     ratio=dist / max(norm, 1e-30))


# ----------------------------------------------------------------------------
# Whole populations for protocol.run.


class Setup(NamedTuple):
  """Arguments for `protocol.run` (behaviour, hooks, behaviour_for_subrun)."""
  behaviour: Adaptive
  hooks: train_lib.Hooks
  behaviour_for_subrun: Any
  malicious: int


def population(config, dataset: data_lib.Dataset, attack: str,
               strength: float, *, malicious: int | None = None,
               calibration: Calibration | None = None,
               placement: str = "random", poison_rate: float = 0.1,
               noise: float = 1.0) -> Setup:
  """A population of config.providers with adaptive attackers first.

  Args:
    config: the `protocol.SimConfig` (providers, seed, trigger_size ...).
    dataset: the dataset.
    attack: one of ADAPTIVE.
    strength: the knob; for collusion the colluding SHARE of n (the number
      of colluders is round(share x n), at least 1).
    malicious: how many adaptive attackers (ignored for collusion; default
      config.malicious). Each has its own BadNets backdoor (own random
      target, location and pattern), except colluders, who share one.
    calibration: needed by constrained and mimicry (default: `calibrate`).
    placement: sporadic: "random" or "last" sub-runs.
    poison_rate: base BadNets poison rate (low_rate overrides it).
    noise: mimicry noise norm in benign distances.

  Returns:
    a `Setup`; pass `config.replace(malicious=setup.malicious)`.
  """
  require(attack in ADAPTIVE, "attack",
          f"unknown adaptive attack {attack!r}; choose one of "
          f"{', '.join(ADAPTIVE)}")
  n = config.providers
  if attack == "collusion":
    require(0.0 < strength <= 1.0, "strength",
            f"collusion: share of providers in (0, 1], got {strength!r}")
    count = max(1, int(round(strength * n)))
  else:
    count = config.malicious if malicious is None else int(malicious)
  require(0 <= count <= n, "malicious", f"must be in [0, {n}], got {count}")
  specs = attacks_lib.population_specs(
      n, count, "badnets", own_backdoor=True, num_classes=dataset.num_classes,
      seed=config.seed, poison_rate=poison_rate, size=config.trigger_size)
  base = attacks_lib.make_behaviour(specs, dataset.input_shape,
                                    dataset.num_classes, seed=config.seed)
  b = wrap(base)
  who = list(range(count))
  for_subrun = None
  if attack == "collusion":
    b = collude(b, who)
  elif count:
    ratio = 0.0
    if attack in ("constrained", "mimicry"):
      calibration = calibration or calibrate(config, dataset)
      ratio = calibration.ratio
    b = adapt(b, who, attack, strength, ratio=ratio, noise=noise)
    if attack == "sporadic":
      plan = poison_plan(b, config.num_subruns, config.seed,
                         placement=placement)
      for_subrun = subrun_behaviour(plan)
  return Setup(b, make_hooks(b), for_subrun, count)
