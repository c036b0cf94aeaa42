"""Adaptive adversaries: attackers who know the RTTD detection scheme.

Every adaptive attacker is still data: an `Adaptive` pytree holds the plain
`Behaviour` of any attack family (image or text: trigger, target, poison
rate ...) as `base` and adds per-provider fields, so a mixed population of
benign, plain and adaptive providers trains in ONE compiled sub-run.
`Adaptive` has `size` / `malicious` / `names()` and `plain` (its base), so
the protocol and the families' `attack_success_rate` take it unchanged; its
trainer hooks (`make_hooks`) delegate poisoning and model replacement to the
base's family.

| attack       | knob (`strength`)   | what the provider does                       |
|--------------|---------------------|----------------------------------------------|
| low_rate     | poison rate         | its plain attack with a small rate           |
|              |                     | (>= 1/batch)                                 |
| sporadic     | share of sub-runs   | its plain attack in a fixed share of its     |
|              |                     | sub-runs, benign in the others (host-side)   |
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
  (`Hooks.twin_size`): only these providers pay for it. The twin's optimizer
  state is returned too, so parameters are the only channel.
* epsilon follows the training schedule: eps = c x ratio x ||clean update||,
  where ratio = (median benign-benign distance) / (median update norm) is
  measured once in a calibration sub-run (`protocol.calibration`). The
  attacker can measure that itself (replicate a sub-run it was given on its
  own stacks); a fixed absolute epsilon would be too loose late in a cosine
  schedule and too tight early.
* mimicry's noise is isotropic Gaussian with norm `noise` x ratio x
  ||clean update|| (default 1: one benign distance). Against an L2 client the
  noise only adds distance; it exists to make the deviation's direction look
  random rather than a consistent backdoor direction.
* sporadic attackers choose their poisoned sub-runs once (deterministic per
  (seed, provider)): exactly round(share x S) of the S sub-runs, at random
  places or the last ones (`placement`). They cannot see which sub-runs are
  replicated. In skipped sub-runs they are benign (poison rate 0, no update
  scaling, no twin shaping) with the same shapes, so nothing recompiles.
* colluders carry one behaviour (trigger, target, poison rate ...) copied
  from the first colluder, and agree on which examples of a batch to poison
  (and, for text, where to insert the trigger): their attack key at a step
  is one derived from the batch they all receive (`crew_key`), where every
  other attacker uses its own. So they differ only by their benign
  divergence; independent attackers differ by their poisoned examples too.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import require
from jaxrep.population.behaviour import Behaviour, Hooks

ADAPTIVE = ("low_rate", "sporadic", "constrained", "mimicry", "collusion")
TAG = {"none": 0, "low_rate": 1, "sporadic": 2, "constrained": 3,
       "mimicry": 4, "collusion": 5}
TAG_NAMES = {v: k for k, v in TAG.items()}
MODE = {"none": 0, "constrained": 1, "mimicry": 2}
PLACEMENTS = ("random", "last")


class Adaptive(NamedTuple):
  """A plain `Behaviour` plus adaptive per-provider fields (leading axis [n]).

  Attributes:
    base: the plain behaviour of any family (trigger, target, poison rate,
      scale ...).
    tag: int32, which adaptive attack (see TAG; 0 = plain or benign).
    mode: int32 return shaping (see MODE): 0 none, 1 constrained, 2 mimicry.
    strength: float32, constrained: epsilon factor c; mimicry: keep.
    ratio: float32, calibrated benign distance / update norm.
    noise: float32, mimicry noise norm in benign distances.
    share: float32, sporadic: share of sub-runs poisoned (1 = all).
  """
  base: Behaviour
  tag: jax.Array
  mode: jax.Array
  strength: jax.Array
  ratio: jax.Array
  noise: jax.Array
  share: jax.Array

  @property
  def size(self) -> int:
    return self.base.size

  @property
  def malicious(self) -> np.ndarray:
    return self.base.malicious

  @property
  def plain(self) -> Behaviour:
    """The plain behaviour, by which ASR is measured."""
    return self.base

  def names(self) -> list[str | None]:
    """Adaptive attack name where there is one, else the plain name."""
    plain = self.base.names()
    return [TAG_NAMES[int(t)] if t else p
            for t, p in zip(np.asarray(self.tag), plain)]


def wrap(base: Behaviour) -> Adaptive:
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
    ratio: benign distance / update norm from calibration (constrained and
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
    base = dataclasses.replace(
        base, poison_rate=_set(base.poison_rate, who, s, jnp.float32))
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
  """Providers `group` share ONE backdoor: every member's plain behaviour
  (trigger, target, source, poison rate, scale ...) is group[0]'s."""
  group = np.asarray(list(group), int)
  require(group.size >= 1 and bool(np.all(behaviour.malicious[group])),
          "group", "colluders must be malicious in the base behaviour")
  first = int(group[0])

  def share(leaf):
    a = np.asarray(leaf).copy()
    a[group] = a[first]
    return jnp.asarray(a, leaf.dtype)
  return behaviour._replace(
      base=jax.tree_util.tree_map(share, behaviour.base),
      tag=_set(behaviour.tag, group, TAG["collusion"], jnp.int32))


# ----------------------------------------------------------------------------
# Inside the sub-run (pure, one provider; vmapped by the trainer).


def tree_norm(tree):
  """The L2 norm of a pytree (all leaves as one vector)."""
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
  sigma = b.ratio * tree_norm(jax.tree_util.tree_map(lambda c, s: c - s,
                                                     clean_end, start))
  dev_norm = tree_norm(dev)
  clip = jnp.minimum(1.0, b.strength * sigma / jnp.maximum(dev_norm, 1e-30))
  factor = jnp.where(b.mode == MODE["constrained"], clip,
                     jnp.where(b.mode == MODE["mimicry"], b.strength, 1.0))
  amount = jnp.where(b.mode == MODE["mimicry"], b.noise * sigma, 0.0)
  unit = _unit_noise(rng_lib.return_noise(key), dev)
  shaped = jax.tree_util.tree_map(lambda c, d, u: c + factor * d + amount * u,
                                  clean_end, dev, unit)
  return jax.tree_util.tree_map(
      lambda s, e: jnp.where(b.mode == MODE["none"], e, s), shaped, end)


def crew_key(x, y) -> jax.Array:
  """The attack key colluders share at a step: a function of the batch they
  all receive (before any provider's poisoning or permutation), so it is
  the same for all of them and new at every step."""
  flat = jnp.concatenate([x.reshape(-1).astype(jnp.float32),
                          y.reshape(-1).astype(jnp.float32)])
  weights = (jnp.arange(flat.shape[0], dtype=jnp.uint32) % 65521 + 1
             ).astype(jnp.float32)
  digest = jax.lax.bitcast_convert_type(jnp.sum(flat * weights), jnp.uint32)
  return rng_lib.crew(digest)


def make_hooks(behaviour: Adaptive) -> Hooks:
  """Trainer hooks for an `Adaptive` population.

  Poisoning, model replacement, planting and data ordering are those of the
  base's family (on the base); providers with a return mode get a clean-twin cohort of exactly
  their number (0: no twin compiled in).
  """
  base = behaviour.base
  plain = base.family.make_hooks(base)
  twins = int(np.sum(np.asarray(behaviour.mode) != MODE["none"]))

  def poison_batch(b, key, x, y):
    key = jax.random.wrap_key_data(jnp.where(
        b.tag == TAG["collusion"], jax.random.key_data(crew_key(x, y)),
        jax.random.key_data(key)))
    return plain.poison_batch(b.base, key, x, y)

  reorder = None
  if plain.reorder is not None:
    def reorder(b, key, schedule, y_train):
      # Colluders agree on the order too: a key from the sub-run's schedule.
      crew = crew_key(schedule, y_train[schedule])
      key = jax.random.wrap_key_data(jnp.where(
          b.tag == TAG["collusion"], jax.random.key_data(crew),
          jax.random.key_data(key)))
      return plain.reorder(b.base, key, schedule, y_train)

  finalize_state = None
  if plain.finalize_state is not None:
    finalize_state = lambda b, p, o: plain.finalize_state(b.base, p, o)

  return Hooks(
      poison_batch=poison_batch,
      finalize=lambda b, s, e: plain.finalize(b.base, s, e),
      twin_size=twins,
      needs_twin=lambda b: b.mode != MODE["none"],
      finalize_twin=shape_return,
      reorder=reorder,
      finalize_state=finalize_state)


# ----------------------------------------------------------------------------
# Host side: sporadic schedules.


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

  In sub-run s, providers with plan[i, s] False are benign: kind 0 (no
  reordering, no planted key), poison rate 0, update scale 1 and no return
  shaping; shapes are unchanged.
  """
  plan = np.asarray(plan, bool)

  def for_subrun(b: Adaptive, s: int) -> Adaptive:
    on = jnp.asarray(plan[:, s])
    base = dataclasses.replace(
        b.base, kind=jnp.where(on, b.base.kind, 0),
        poison_rate=jnp.where(on, b.base.poison_rate, 0.0),
        scale=jnp.where(on, b.base.scale, 1.0))
    return b._replace(base=base, mode=jnp.where(on, b.mode, MODE["none"]))
  return for_subrun
