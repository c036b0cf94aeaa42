"""The RTTD protocol: the client's host loop over sub-runs.

A training run of T = `steps` steps is split into S = T / k sub-runs of
k = `subrun_steps` steps. Before training, the client secretly draws m =
`replicated` of them. For every sub-run s the client hands its current
checkpoint, the batch schedule of s and the hyper-parameters to the
providers; a replicated sub-run goes to every provider still trusted and is
checked (distances, detector, continue from the medoid of the unflagged
results); any other sub-run goes to one trusted provider and is accepted
unchecked (`jaxrep.protocol.steps`). Two more chains are run for the report:
the same client without the defense, and (attack check) every provider's
own full run. Extra cost of the defense: m * k * (n - 1) training steps.

    state = initial_state(sim)                 # or restored from a checkpoint
    while state.progress.next_subrun < S:       # a rollback moves it back
      state, _ = subrun_step(sim, state, state.progress.next_subrun)
      checkpoint(state)
    result = evaluate(sim, state)
"""

from __future__ import annotations

import time
from typing import Any, Callable

from jaxrep.config import SimConfig
from jaxrep.core import rng
from jaxrep.core import trees
from jaxrep import data as data_lib
from jaxrep import models as models_lib
from jaxrep.protocol import calibration
from jaxrep.protocol.results import SimResult, evaluate
from jaxrep.protocol.simulation import Simulation, load, setup, validate
from jaxrep.protocol.state import (EvidenceLog, ModelCheckpoint, Progress,
                                   ProtocolState, Trust)
from jaxrep.protocol.steps import subrun_step
from jaxrep.runtime import checkpoint as ckpt_lib


def initial_state(sim: Simulation) -> ProtocolState:
  """The protocol state before the first sub-run."""
  params, model_state = sim.model.init(rng.model_init(sim.root))
  client = ModelCheckpoint(params, sim.trainer.optimizer.init(params),
                           model_state)
  p = sim.config.protocol
  own = (sim.trainer.replicate(params, model_state, sim.n)
         if p.attack_check else None)
  history = (trees.stack(client, p.num_subruns + 1)
             if p.recovery == "rollback" else None)
  return ProtocolState(
      client=client, no_defense=client, own=own, trust=Trust.everyone(sim.n),
      log=EvidenceLog.empty(p.replicated, sim.n, sim.record_metrics,
                            models_lib.num_params(params)),
      progress=Progress(ledger=(None,) * p.num_subruns), history=history)


def _progress_bar(sim: Simulation, state: ProtocolState):
  from tqdm.auto import tqdm  # pylint: disable=g-import-not-at-top
  return tqdm(total=sim.config.num_subruns,
              initial=state.progress.next_subrun, desc="sub-runs",
              unit="sub-run", dynamic_ncols=True)


def simulation(config: SimConfig, *,
               dataset: data_lib.Dataset | None = None,
               record_metrics: tuple[str, ...] = (), behaviour: Any = None,
               hooks: Any = None,
               behaviour_for_subrun: Callable | None = None) -> Simulation:
  """The `Simulation` that `run` runs (arguments as in `run`): `setup`, with
  the config's adaptive attackers (`--adaptive`) built on the loaded dataset
  when no behaviour is given."""
  if behaviour is None and config.attack.adaptive != "none":
    validate(config)
    dataset = dataset if dataset is not None else load(config)
    adv = calibration.from_config(config, dataset)
    behaviour, hooks = adv.behaviour, adv.hooks
    behaviour_for_subrun = adv.behaviour_for_subrun
  return setup(config, dataset=dataset, behaviour=behaviour, hooks=hooks,
               behaviour_for_subrun=behaviour_for_subrun,
               record_metrics=record_metrics)


def run(config: SimConfig, *, progress: bool = True,
        dataset: data_lib.Dataset | None = None,
        record_metrics: tuple[str, ...] = (),
        workdir: str | None = None, resume: bool = True,
        behaviour: Any = None, hooks: Any = None,
        behaviour_for_subrun: Callable | None = None) -> SimResult:
  """Runs one simulation end to end (see module docstring).

  Args:
    config: the simulation.
    progress: show a progress bar over sub-runs (stderr).
    dataset: an already loaded dataset (else `config.data` is loaded).
    record_metrics: further metrics whose matrices are computed and recorded
      at every replicated sub-run (in `SimResult.recorded`), so that other
      metric/detector pairs can be evaluated on the same sub-runs with
      `replay` (the client's trajectory follows the config's metric and
      detector).
    workdir: if given, the state is checkpointed there after every sub-run
      and, with `resume`, a run found there continues where it stopped. A
      resumed run gives bitwise the same results as an uninterrupted one.
    resume: continue from a checkpoint in `workdir` (else start over).
    behaviour: a custom per-provider behaviour (e.g. adaptive attacks); by
      default it is built from the config's attack section (adaptive
      attackers too, `config.attack.adaptive`). Its malicious
      count must equal the config's.
    hooks: custom trainer hooks for `behaviour` (default: its family's).
    behaviour_for_subrun: optional host-side function
      (behaviour, subrun index) -> behaviour used for that sub-run (same
      shapes, so no recompilation), e.g. an attacker that poisons only some
      sub-runs. It cannot see which sub-runs are replicated.
  """
  t0 = time.perf_counter()
  sim = simulation(config, dataset=dataset, record_metrics=record_metrics,
                   behaviour=behaviour, hooks=hooks,
                   behaviour_for_subrun=behaviour_for_subrun)
  state = initial_state(sim)
  ckpt = None
  if workdir is not None:
    ckpt = ckpt_lib.Checkpointer(workdir, sim.config)
    restored = ckpt.restore(state.arrays()) if resume else None
    if restored is not None:
      _, tree, meta = restored
      state = state.restored(tree, meta)
      state = state.replace(progress=state.progress.note(
          f"resumed at sub-run {state.progress.next_subrun}"))
  t_resume = time.perf_counter()
  bar = _progress_bar(sim, state) if progress else None
  returned = None
  while state.progress.next_subrun < sim.config.num_subruns:
    s = state.progress.next_subrun
    state, returned = subrun_step(sim, state, s)
    if ckpt is not None:
      elapsed = state.progress.elapsed + time.perf_counter() - t_resume
      ckpt.save(state.progress.executions, state.arrays(),
                dict(state.meta(), elapsed=elapsed))
    if bar is not None:
      bar.set_postfix(replicated=state.progress.replicated_done,
                      flagged=int((state.trust.flagged_at >= 0).sum()),
                      trusted=int(state.trust.active.sum()),
                      redone=state.progress.reexecution_steps)
      bar.n = state.progress.next_subrun
      bar.refresh()
  if bar is not None:
    bar.close()
  if ckpt is not None:
    ckpt.close()
    wall = state.progress.elapsed + time.perf_counter() - t_resume
  else:
    wall = time.perf_counter() - t0
  return evaluate(sim, state, returned, wall)
