"""The client's steps: small named functions from (simulation, state) to a
new state. `subrun_step` is one sub-run of the protocol:

  1. `train_step`       (where the client needs all n, `_needs_all`) the
                        providers train sub-run s from the client's
                        checkpoint; the client checks what comes back (NaN,
                        Inf, wrong shapes, diverged updates);
  2. `replicated_step`  (a replicated sub-run) distances between the returned
                        models, the detection step, and the client continues
                        from the medoid of the still-trusted results;
     `unchecked_step`   (any other sub-run) one trusted provider, drawn at
                        random, computed it and it is accepted unchecked
                        (`unchecked_one_step`: only that provider trains);
  3. `no_defense_step`  the same client without RTTD: a provider drawn among
                        all n computes the sub-run, accepted unchecked;
  4. `attack_check_step` every provider continues its own full run (the model
                        it would deliver alone: proof that its attack works);
  5. `recovery_step`    (recovery=rollback) when providers were flagged and
                        one of them computed an accepted sub-run, the client
                        returns to the last checkpoint none of them
                        contributed to and re-executes from there.

Steps 3 and 4 run once per sub-run; a re-executed sub-run repeats 1, 2, 5.
Every execution leaves a ledger entry and a point of the client's
trajectory (clean accuracy and ASR after it).

The simulator computes what the protocol needs: all n providers (one
vmapped, compiled sub-run) where the client compares them, and only the
chosen provider where it does not (`unchecked_step`, the no-defense chain,
re-execution after a rollback). Exceptions: a population with hostile
providers (a test facility of the client's checks) trains all n on every
sub-run, so every garbage return is caught at once; with attack_check off,
the last sub-run trains all n because the report's provider metrics are of
those models. A provider trained alone runs in a batch of one, which on
XLA:CPU can round differently from its slice of the batched run (about 1e-7
in parameters after 20 steps; see BUILD_NOTES "Computing only what the
protocol needs"). Malicious providers poison every sub-run they compute: they
cannot tell which sub-runs are replicated.
"""

from __future__ import annotations

import dataclasses
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng
from jaxrep.core import trees
from jaxrep.detect import detectors as detect_lib
from jaxrep import distances
from jaxrep.protocol import hostile as hostile_lib
from jaxrep.protocol.detection import detection_step, medoid
from jaxrep.protocol.results import model_report
from jaxrep.protocol.simulation import Simulation
from jaxrep.protocol.state import ModelCheckpoint, ProtocolState
from jaxrep.train import trainer as train_lib

def model_distances(sim: Simulation, metric: str, start_params, pop,
                    key) -> np.ndarray:
  """The [n, n] matrix of `metric` between the returned models of a sub-run
  started from `start_params` (over the mesh if there is one)."""
  return distances.model_distances(metric, sim.model.predict, start_params,
                                   pop.params, pop.model_state, sim.probe_x,
                                   key, mesh=sim.mesh)


def _start(sim: Simulation, checkpoint: ModelCheckpoint, n: int):
  return sim.trainer.replicate(checkpoint.params, checkpoint.model_state, n,
                               opt_state=checkpoint.opt_state)


def train_one(sim: Simulation, checkpoint: ModelCheckpoint, schedule, keys,
              behaviour, who: int) -> train_lib.Population:
  """Provider `who` alone computes a sub-run from `checkpoint` (its key,
  divergence and behaviour sliced from the population's): a population of
  one, on the default device."""
  out, _ = sim.trainer.sub_run(
      _start(sim, checkpoint, 1), sim.x_train, sim.y_train, schedule,
      keys[who:who + 1], trees.take_slice(sim.divergence, who),
      trees.take_slice(behaviour, who))
  return out


def _accept(pop, i: int) -> ModelCheckpoint:
  return ModelCheckpoint(trees.take(pop.params, i), trees.take(pop.opt_state, i),
                         trees.take(pop.model_state, i))


def digest(params) -> str:
  """A short fingerprint of a model's parameters (for the ledger)."""
  h = hashlib.sha256()
  for leaf in jax.tree_util.tree_leaves(params):
    h.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return h.hexdigest()[:16]


def _ledger_entry(state: ProtocolState, computed_by, replicated: bool,
                  participants: np.ndarray) -> dict:
  return {"computed_by": computed_by, "replicated": replicated,
          "participants": [int(i) for i in np.flatnonzero(participants)],
          "digest": digest(state.client.params)}


def train_step(sim: Simulation, state: ProtocolState, s: int, schedule, keys,
               behaviour) -> tuple[ProtocolState, train_lib.Population]:
  """Every provider trains sub-run s from the client's checkpoint; returns
  the state with the providers whose output fails the client's checks
  flagged (with the reason), and the returned population (failed returns
  neutralized so they touch no one else's numbers)."""
  start = _start(sim, state.client, sim.n)
  out, _ = sim.train_providers(start, schedule, keys, behaviour)
  returned, odd = hostile_lib.tamper(out.params, sim.hostile)
  reasons = hostile_lib.check_returned(state.client.params, returned, odd,
                                       state.trust.active)
  bad = np.isin(np.arange(sim.n), list(reasons))
  trust = state.trust.flag(bad, s)
  progress = dataclasses.replace(
      state.progress, reasons=state.progress.reasons + tuple(reasons.items()))
  returned = hostile_lib.neutralize(returned, list(reasons))
  return (state.replace(trust=trust, progress=progress),
          out._replace(params=returned))


def replicated_step(sim: Simulation, state: ProtocolState, s: int,
                    returned) -> ProtocolState:
  """A replicated sub-run: distances, detection, continue from the medoid."""
  config, log = sim.config, state.log
  r = state.progress.replicated_done
  active = state.trust.active
  start = state.client.params
  key = rng.distance(sim.root, s)
  metric = config.detector.metric
  d = model_distances(sim, metric, start, returned, key)
  matrices, members = log.matrices.copy(), log.members.copy()
  matrices[r], members[r] = d, active
  floors = log.floors.copy()
  floors[r] = distances.resolution(metric, returned.params)
  recorded = {m: v.copy() for m, v in log.recorded.items()}
  for m in recorded:
    recorded[m][r] = d if m == metric else model_distances(
        sim, m, start, returned, key)
  median, updates = log.median.copy(), dict(log.updates)
  if config.detector.name == "median" or updates:
    rows = train_lib.flatten_population(distances.updates(start,
                                                         returned.params))
    median[r] = np.asarray(detect_lib.median_distances(
        rows, jnp.asarray(active)))
    if updates:
      updates["rows"] = updates["rows"].copy()
      updates["rows"][r] = np.asarray(rows)
  log = dataclasses.replace(log, matrices=matrices, members=members,
                            median=median, recorded=recorded, updates=updates,
                            floors=floors)
  trust, note = detection_step(config.detector, log.evidence(r + 1),
                               state.trust, s, list(median[:r + 1]))
  progress = dataclasses.replace(state.progress, replicated_done=r + 1)
  if note:
    progress = progress.note(f"sub-run {s}: {note}")
  state = state.replace(trust=trust, log=log, progress=progress)
  if not trust.active.any():
    state = state.replace(progress=progress.note(
        f"sub-run {s}: every provider was flagged; the client keeps its "
        "checkpoint"))
    chosen = None
  else:
    chosen = medoid(d, trust.active)
    state = state.replace(client=_accept(returned, chosen))
  return state.replace(progress=state.progress.record(
      s, _ledger_entry(state, chosen, True, active)))


def unchecked_step(sim: Simulation, state: ProtocolState, s: int,
                   returned) -> ProtocolState:
  """A sub-run the client does not check: one trusted provider, drawn at
  random, computed it (`returned`: what all n returned)."""
  active = state.trust.active
  chosen = None
  if active.any():
    chosen = int(rng.assignment(sim.config.seed, s).choice(
        np.flatnonzero(active)))
    state = state.replace(client=_accept(returned, chosen))
  return state.replace(progress=state.progress.record(
      s, _ledger_entry(state, chosen, False, active)))


def unchecked_one_step(sim: Simulation, state: ProtocolState, s: int,
                       schedule, keys, behaviour) -> ProtocolState:
  """`unchecked_step` computing only what the client uses: the provider it
  draws (the same draw) trains alone from the client's checkpoint. The
  client checks that one return for NaN or Inf (on the host: no program to
  compile for one model; with nothing to compare with, a diverged update
  cannot be told, and only hostile providers, which train all n, return odd
  shapes); a provider failing it is flagged and the client draws again
  among the rest."""
  active = state.trust.active
  draw = rng.assignment(sim.config.seed, s)
  chosen = None
  while active.any():
    who = int(draw.choice(np.flatnonzero(active)))
    out = train_one(sim, state.client, schedule, keys, behaviour, who)
    if all(np.isfinite(np.asarray(leaf)).all()
           for leaf in jax.tree_util.tree_leaves(out.params)):
      chosen = who
      state = state.replace(client=_accept(out, 0))
      break
    bad = np.arange(sim.n) == who
    state = state.replace(
        trust=state.trust.flag(bad, s),
        progress=dataclasses.replace(
            state.progress, reasons=state.progress.reasons + (
                (who, "returned NaN or Inf parameters"),)))
    active = state.trust.active
  return state.replace(progress=state.progress.record(
      s, _ledger_entry(state, chosen, False, active)))


def no_defense_step(sim: Simulation, state: ProtocolState, s: int, schedule,
                    keys, behaviour) -> ProtocolState:
  """The client without RTTD: a provider drawn among all n computes the
  sub-run from that client's checkpoint, accepted unchecked."""
  who = int(rng.no_defense(sim.config.seed, s).integers(sim.n))
  single = train_one(sim, state.no_defense, schedule, keys, behaviour, who)
  return state.replace(no_defense=_accept(single, 0))


def attack_check_step(sim: Simulation, state: ProtocolState, schedule, keys,
                      behaviour) -> ProtocolState:
  """Every provider continues its own full run."""
  own, _ = sim.train_providers(state.own, schedule, keys, behaviour)
  return state.replace(own=own)


def _count_steps(sim: Simulation, state: ProtocolState, s: int,
                 participants: int, replicated: bool) -> ProtocolState:
  """Adds the extra training steps of this execution: a first replicated run
  costs k * (participants - 1) beyond the client's own k steps; re-executing
  a sub-run costs k steps per provider that redoes it."""
  k, p = sim.config.protocol.subrun_steps, state.progress
  if s < p.frontier:
    p = dataclasses.replace(p, reexecution_steps=p.reexecution_steps + k * (
        participants if replicated else 1))
  elif replicated:
    p = dataclasses.replace(p, replication_steps=p.replication_steps
                            + k * (participants - 1))
  return state.replace(progress=p)


def _trajectory_point(sim: Simulation, state: ProtocolState, s: int,
                      first: bool, newly_flagged: np.ndarray) -> dict:
  client = model_report(sim, state.client)
  point = {"subrun": s, "execution": state.progress.executions,
           "reexecution": not first,
           "clean_accuracy": client["clean_accuracy"],
           "attack_success_rate": client["attack_success_rate"],
           "flagged": [int(i) for i in np.flatnonzero(newly_flagged)]}
  if first:
    nodef = model_report(sim, state.no_defense)
    point.update(no_defense_clean_accuracy=nodef["clean_accuracy"],
                 no_defense_attack_success_rate=nodef["attack_success_rate"])
  return point


def _keep_history(state: ProtocolState, s: int) -> ProtocolState:
  """Stores the client's checkpoint before sub-run s (recovery)."""
  if state.history is None:
    return state
  return state.replace(history=trees.put(state.history, s, state.client))


def recovery_step(sim: Simulation, state: ProtocolState, s: int
                  ) -> ProtocolState:
  """Rollback: if a flagged provider computed an accepted sub-run j <= s,
  the client returns to its checkpoint before j (parameters, optimizer and
  model state) and sub-runs j.. are executed again by trusted providers."""
  if state.history is None:
    return state
  flagged = set(np.flatnonzero(state.trust.flagged_at >= 0).tolist())
  tainted = [j for j in range(s + 1)
             if state.progress.ledger[j] is not None
             and state.progress.ledger[j]["computed_by"] in flagged]
  if not tainted:
    return state
  j = tainted[0]
  p = state.progress
  p = dataclasses.replace(
      p, next_subrun=j,
      replicated_done=int(np.sum(sim.replicated < j)),
      trajectory=p.trajectory[:-1] + (dict(p.trajectory[-1], rollback_to=j),))
  p = p.note(f"sub-run {s}: rolled back to the checkpoint before sub-run {j} "
             f"(computed by flagged provider "
             f"{p.ledger[j]['computed_by']}); sub-runs {j}..{s} re-executed")
  return state.replace(client=trees.take(state.history, j), progress=p)


def _needs_all(sim: Simulation, state: ProtocolState, s: int) -> bool:
  """Whether sub-run s is computed by every provider (see module
  docstring): it is replicated and at least 2 providers are trusted, the
  population has hostile providers, or it is the last sub-run and the
  report's provider metrics are of the models returned for it."""
  return ((s in sim.replicated and state.trust.active.sum() >= 2)
          or bool(sim.hostile)
          or (state.own is None and s == sim.config.num_subruns - 1))


def subrun_step(sim: Simulation, state: ProtocolState, s: int
                ) -> tuple[ProtocolState, train_lib.Population | None]:
  """One execution of sub-run s (see module docstring); also returns what
  the providers returned for it (None where only one provider computed
  it)."""
  first = s >= state.progress.frontier
  flagged_before = state.trust.flagged_at >= 0
  behaviour = sim.subrun_behaviour(s)
  schedule, keys = sim.schedule(s), sim.keys(s)
  state = _keep_history(state, s)
  participants = state.trust.active
  returned = None
  if _needs_all(sim, state, s):
    state, returned = train_step(sim, state, s, schedule, keys, behaviour)
  replicated = s in sim.replicated and state.trust.active.sum() >= 2
  if replicated:
    state = replicated_step(sim, state, s, returned)
  else:
    if s in sim.replicated:
      state = state.replace(progress=state.progress.note(
          f"sub-run {s}: fewer than 2 trusted providers left, no comparison "
          "possible"))
    if returned is None:
      state = unchecked_one_step(sim, state, s, schedule, keys, behaviour)
    else:
      state = unchecked_step(sim, state, s, returned)
  state = _count_steps(sim, state, s, int(participants.sum()), replicated)
  if first:
    state = no_defense_step(sim, state, s, schedule, keys, behaviour)
    if state.own is not None:
      state = attack_check_step(sim, state, schedule, keys, behaviour)
  newly = (state.trust.flagged_at >= 0) & ~flagged_before
  p = state.progress
  p = dataclasses.replace(
      p, next_subrun=s + 1, frontier=max(p.frontier, s + 1),
      executions=p.executions + 1)
  state = state.replace(progress=p)
  state = state.replace(progress=state.progress.point(
      _trajectory_point(sim, state, s, first, newly)))
  if newly.any():
    state = recovery_step(sim, state, s)
  return state, returned
