"""Independent attackers (issue 15): attackers with the same trigger, target
and rate are not replicas of each other, because each draws the examples it
poisons from its own randomness; which providers attack is drawn from the
seed; the probe inputs are held out of training."""

import jax
import numpy as np

from jaxrep import distances
from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep.core import rng
from jaxrep.population import build as population_lib
from jaxrep.protocol import results as results_lib

# The shared-target / shared-location setting of the issue, small.
SHARED = dict(providers=12, malicious=6, attack="badnets", trigger_size=2,
              trigger_location="top_left", target_label=7, steps=20,
              subrun_steps=20, replicated=1, attack_check=False,
              probe_size=64, seed=0)


def _spread(config, ds, *, equal_slots=False):
  """attacker_spread (as results.json reports it) after the first sub-run.

  equal_slots: the old behaviour, for contrast: every attacker poisons the
  same examples (its choice ignores its own key)."""
  hooks = None
  if equal_slots:
    b = population_lib.make_behaviour(protocol.resolve(config, ds), ds)
    plain = population_lib.family("image").make_hooks(b)
    same = jax.random.key(0)
    hooks = plain._replace(
        poison_batch=lambda bi, key, x, y: plain.poison_batch(bi, same, x, y))
  sim = protocol.setup(config, dataset=ds, hooks=hooks)
  params, model_state = sim.model.init(rng.model_init(sim.root))
  pop = sim.trainer.replicate(params, model_state, sim.n)
  pop, _ = sim.train_providers(pop, sim.schedule(0), sim.keys(0),
                               sim.behaviour)
  d = distances.model_distances("l2", sim.model.predict, params,
                                pop.params, pop.model_state, sim.probe_x,
                                jax.random.key(0))
  mal = sim.behaviour.malicious
  return mal, results_lib.attacker_spread(d, mal, np.ones(sim.n, bool))


def test_attackers_with_one_backdoor_are_not_replicas(digits):
  config = SimConfig.from_flat(**SHARED)
  mal, spread = _spread(config, digits)
  assert mal.sum() == 6 and not mal[:6].all()     # drawn, not the lowest ids
  _, same = _spread(config, digits, equal_slots=True)
  print(f"attacker spread: independent {spread:.3g}, equal slots {same:.3g}")
  assert same < 10                    # equal slots: near-replicas
  assert spread > 1e4                 # far above benign divergence


def test_attacker_spread_is_malicious_over_benign_medians():
  d = np.array([[0, 1, 5, 9], [1, 0, 7, 3], [5, 7, 0, 2], [9, 3, 2, 0.]])
  mal = np.array([False, False, True, True])
  assert results_lib.attacker_spread(d, mal, np.ones(4, bool)) == 2.0
  members = np.array([True, True, True, False])
  assert np.isnan(results_lib.attacker_spread(d, mal, members))


def test_probe_inputs_are_held_out_of_training(digits):
  sim = protocol.setup(SimConfig.from_flat(**SHARED), dataset=digits)
  n = digits.x_train.shape[0]
  assert sim.train_examples == n - 64
  np.testing.assert_array_equal(sim.probe_x, digits.x_train[n - 64:])
  scheduled = np.concatenate([np.asarray(sim.schedule(s)).ravel()
                              for s in range(sim.config.num_subruns)])
  assert scheduled.max() < n - 64
