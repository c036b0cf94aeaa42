"""The client's steps: small named functions from (simulation, state) to a
new state. `subrun_step` is one sub-run of the protocol:

  1. `train_step`       the trusted providers train sub-run s from the
                        client's checkpoint; the client checks what comes
                        back (NaN, Inf, wrong shapes, diverged updates);
  2. `replicated_step`  (a replicated sub-run) distances between the returned
                        models, the detection step, and the client continues
                        from the medoid of the still-trusted results;
     `unchecked_step`   (any other sub-run) one trusted provider, drawn at
                        random, computed it and it is accepted unchecked;
  3. `no_defense_step`  the same client without RTTD: a provider drawn among
                        all n computes the sub-run, accepted unchecked;
  4. `attack_check_step` every provider continues its own full run (the model
                        it would deliver alone: proof that its attack works).

The simulator trains all n providers on every sub-run (one vmapped step does
that at the cost of one), but the client only sees and accepts what the
protocol allows. Malicious providers poison every sub-run they compute: they
cannot tell which sub-runs are replicated.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxrep.core import rng
from jaxrep.core import trees
from jaxrep.detect import detectors as detect_lib
from jaxrep.distances import kernels as dist_lib
from jaxrep.protocol import hostile as hostile_lib
from jaxrep.protocol.detection import detection_step, medoid
from jaxrep.protocol.simulation import Simulation
from jaxrep.protocol.state import ModelCheckpoint, ProtocolState
from jaxrep.runtime import sharding as sharding_lib
from jaxrep.train import trainer as train_lib

PARAM_METRICS = ("l2", "cosine", "l1", "linf")


def model_distances(sim: Simulation, metric: str, start_params, pop,
                    key) -> np.ndarray:
  """The [n, n] matrix of `metric` between the returned models of a sub-run
  started from `start_params` (ring kernels over the mesh if there is one)."""
  probe_x = sim.probe_x[:16] if metric == "zest" else sim.probe_x
  predict = sim.model.predict
  if sim.mesh is not None:
    d = sharding_lib.model_distances(
        metric, sim.mesh, start_params=start_params, params=pop.params,
        model_state=pop.model_state, apply_fn=predict, probe_x=probe_x,
        key=key)
    return np.asarray(sharding_lib.to_host(d), np.float64)
  if metric in PARAM_METRICS:
    d = dist_lib.pairwise_distances(
        dist_lib.updates(start_params, pop.params), metric)
  elif metric == "output":
    d = dist_lib.output_distances(predict, pop.params, pop.model_state,
                                  probe_x)
  elif metric == "cka":
    d = dist_lib.cka_distances(predict, pop.params, pop.model_state, probe_x)
  else:
    d = dist_lib.zest_distances(predict, pop.params, pop.model_state,
                                probe_x, key)
  return np.asarray(d, np.float64)


def _start(sim: Simulation, checkpoint: ModelCheckpoint, n: int):
  return sim.trainer.replicate(checkpoint.params, checkpoint.model_state, n,
                               opt_state=checkpoint.opt_state)


def _accept(pop, i: int) -> ModelCheckpoint:
  return ModelCheckpoint(trees.take(pop.params, i), trees.take(pop.opt_state, i),
                         trees.take(pop.model_state, i))


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
  recorded = {m: v.copy() for m, v in log.recorded.items()}
  for m in recorded:
    recorded[m][r] = d if m == metric else model_distances(
        sim, m, start, returned, key)
  median, median_all = log.median.copy(), log.median_all.copy()
  if config.detector.name == "median" or recorded:
    rows = train_lib.flatten_population(dist_lib.updates(start,
                                                         returned.params))
    median[r] = np.asarray(detect_lib.median_distances(
        rows, jnp.asarray(active)))
    median_all[r] = np.asarray(detect_lib.median_distances(
        rows, jnp.ones(sim.n, bool)))
  log = dataclasses.replace(log, matrices=matrices, members=members,
                            median=median, median_all=median_all,
                            recorded=recorded)
  trust = detection_step(config.detector, log.evidence(r + 1), state.trust, s,
                         list(median[:r + 1]))
  progress = dataclasses.replace(state.progress, replicated_done=r + 1)
  state = state.replace(trust=trust, log=log, progress=progress)
  if not trust.active.any():
    return state.replace(progress=progress.note(
        f"sub-run {s}: every provider was flagged; the client keeps its "
        "checkpoint"))
  return state.replace(client=_accept(returned, medoid(d, trust.active)))


def unchecked_step(sim: Simulation, state: ProtocolState, s: int,
                   returned) -> ProtocolState:
  """A sub-run the client does not check: one trusted provider, drawn at
  random, computed it."""
  active = state.trust.active
  if not active.any():
    return state
  chosen = int(rng.assignment(sim.config.seed, s).choice(
      np.flatnonzero(active)))
  return state.replace(client=_accept(returned, chosen))


def no_defense_step(sim: Simulation, state: ProtocolState, s: int, schedule,
                    keys, behaviour) -> ProtocolState:
  """The client without RTTD: a provider drawn among all n computes the
  sub-run from that client's checkpoint, accepted unchecked."""
  who = int(rng.no_defense(sim.config.seed, s).integers(sim.n))
  single, _ = sim.trainer.sub_run(
      _start(sim, state.no_defense, 1), sim.x_train, sim.y_train, schedule,
      keys[who:who + 1], trees.take_slice(sim.divergence, who),
      trees.take_slice(behaviour, who))
  return state.replace(no_defense=_accept(single, 0))


def attack_check_step(sim: Simulation, state: ProtocolState, schedule, keys,
                      behaviour) -> ProtocolState:
  """Every provider continues its own full run."""
  own, _ = sim.train_providers(state.own, schedule, keys, behaviour)
  return state.replace(own=own)


def subrun_step(sim: Simulation, state: ProtocolState, s: int
                ) -> tuple[ProtocolState, train_lib.Population]:
  """The whole of sub-run s (see module docstring); also returns what the
  providers returned for it."""
  behaviour = sim.subrun_behaviour(s)
  schedule, keys = sim.schedule(s), sim.keys(s)
  state, returned = train_step(sim, state, s, schedule, keys, behaviour)
  if s in sim.replicated and state.trust.active.sum() >= 2:
    state = replicated_step(sim, state, s, returned)
  else:
    if s in sim.replicated:
      state = state.replace(progress=state.progress.note(
          f"sub-run {s}: fewer than 2 trusted providers left, no comparison "
          "possible"))
    state = unchecked_step(sim, state, s, returned)
  state = no_defense_step(sim, state, s, schedule, keys, behaviour)
  if state.own is not None:
    state = attack_check_step(sim, state, schedule, keys, behaviour)
  progress = dataclasses.replace(state.progress, next_subrun=s + 1)
  return state.replace(progress=progress), returned
