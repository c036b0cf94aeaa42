"""The protocol computes only what it needs: an unchecked sub-run, the
no-defense chain and re-execution train the one provider the client chose;
replicated sub-runs and the attack-check chains train all n."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep.core import trees
from jaxrep.protocol import loop, steps

# One simulation (one compile each of n and 1 providers) for every test.
CFG = dict(providers=4, malicious=2, steps=40, subrun_steps=10, replicated=2,
           batch_size=16, poison_rate=0.5, seed=1, probe_size=32)


@pytest.fixture(scope="module")
def sim(digits):
  return protocol.setup(SimConfig.from_flat(**CFG), dataset=digits)


def _attack_check(sim, on: bool):
  config = sim.config
  return dataclasses.replace(sim, config=dataclasses.replace(
      config, protocol=dataclasses.replace(config.protocol,
                                           attack_check=on)))


def _flat(tree):
  return np.concatenate([np.ravel(np.asarray(l))
                         for l in jax.tree_util.tree_leaves(tree)])


def test_provider_trained_alone_is_its_slice_of_the_population(sim):
  """Provider i alone gets i's key, divergence and behaviour: its model is
  its own slice of the vmapped run up to float32 rounding (XLA:CPU may round
  a batch of one differently from a batch of n, see BUILD_NOTES), far closer
  than to any other provider's."""
  state = loop.initial_state(sim)
  s = 1
  behaviour, schedule, keys = (sim.subrun_behaviour(s), sim.schedule(s),
                               sim.keys(s))
  pop = sim.trainer.replicate(state.client.params, state.client.model_state,
                              sim.n, opt_state=state.client.opt_state)
  everyone, _ = sim.train_providers(pop, schedule, keys, behaviour)
  start = _flat(state.client.params)
  rows = [_flat(trees.take(everyone.params, j)) for j in range(sim.n)]
  for i in range(sim.n):
    alone = _flat(steps.train_one(sim, state.client, schedule, keys,
                                  behaviour, i).params)
    d = np.array([np.abs(alone - r).max() for r in rows])
    update = np.abs(rows[i] - start).max()
    assert d[i] <= 1e-5 * update, (i, d[i], update)
    assert np.argmin(d) == i and np.sort(d)[1] > 100 * d[i], (i, d)


def _counting(sim):
  """The simulation with its trainer's sub-run recording population sizes."""
  sizes = []
  inner = sim.trainer.sub_run

  def sub_run(pop, *args):
    sizes.append(pop.size)
    return inner(pop, *args)
  return dataclasses.replace(
      sim, trainer=sim.trainer._replace(sub_run=sub_run)), sizes


def _run(sim):
  state = loop.initial_state(sim)
  per_execution = []
  while state.progress.next_subrun < sim.config.num_subruns:
    s = state.progress.next_subrun
    before = len(state.progress.trajectory)
    state, _ = steps.subrun_step(sim, state, s)
    per_execution.append((s, state.progress.trajectory[before]["reexecution"]))
  return state, per_execution


def test_only_replicated_subruns_train_every_provider(sim):
  counted, sizes = _counting(_attack_check(sim, False))
  state, executions = _run(counted)
  n, last = sim.n, sim.config.num_subruns - 1
  full = [s for s, _ in executions
          if s in sim.replicated or s == last]   # attack_check off: last too
  assert sizes.count(n) == len(full)
  # Every other execution trains the chosen provider alone; every first
  # execution adds one no-defense sub-run of one provider.
  first = sum(1 for _, redo in executions if not redo)
  assert sizes.count(1) == len(executions) - len(full) + first
  assert set(sizes) == {1, n}
  for entry in state.progress.ledger:
    assert entry["computed_by"] is not None


def test_attack_check_still_trains_every_provider(sim):
  counted, sizes = _counting(_attack_check(sim, True))
  state, executions = _run(counted)
  first = sum(1 for _, redo in executions if not redo)
  replicated = sum(1 for s, _ in executions if s in sim.replicated)
  assert sizes.count(sim.n) == replicated + first   # + own full runs
  assert state.own.size == sim.n
