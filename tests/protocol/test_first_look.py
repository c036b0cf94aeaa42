"""First-look detection at 50 % attackers (issue 15, items 4 and 6): the
default detector (replica) flags every attacker at the FIRST replicated
sub-run, with own backdoors and with one shared trigger, location and target;
and it relies on the attackers' independence (equal poisoning slots make
shared-target attackers each other's replica, which it cannot see)."""

from unittest import mock

import numpy as np
import pytest

from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep.detect import detectors as detect_lib
from jaxrep.protocol import results as results_lib

from tests.protocol import test_independence as independence

FAST = dict(steps=40, subrun_steps=20, replicated=2, attack_check=False,
            probe_size=64)


@pytest.mark.parametrize("kwargs", [
    dict(providers=8, malicious=4, seed=3),                  # own backdoors
    dict(independence.SHARED, **FAST),                       # shared target
], ids=["own", "shared"])
def test_every_attacker_is_flagged_at_the_first_look(digits, kwargs):
  config = SimConfig.from_flat(**dict(FAST, **kwargs))
  assert config.detector.name == "replica"                   # the default
  r = protocol.run(config, progress=False, dataset=digits)
  first = r.replicated_subruns[0]
  assert r.malicious.sum() * 2 == r.malicious.size
  np.testing.assert_array_equal(r.flagged_at[r.malicious],
                                np.full(r.malicious.sum(), first))
  assert not r.flags[~r.malicious].any(), r.scores
  # Margin-10 KS at that one look does not decide at 50 %.
  ks, _, _ = protocol.replay(r.matrices[:1], r.malicious.size, "ks",
                             ks_margin=10.0)
  assert not ks[r.malicious].all()


def _first_matrix(digits, equal_slots):
  """The first sub-run's l2 matrix of test_independence's shared setting."""
  config = SimConfig.from_flat(**independence.SHARED)
  with mock.patch.object(results_lib, "attacker_spread",
                         lambda d, mal, members: np.asarray(d)):
    return independence._spread(config, digits, equal_slots=equal_slots)


def test_replica_needs_independent_attackers(digits):
  for equal_slots in (False, True):
    mal, d = _first_matrix(digits, equal_slots)
    ev = detect_lib.Evidence()
    ev.add(d, np.ones(len(mal), bool))
    flags = detect_lib.detect("replica", ev, len(mal)).flags
    if equal_slots:   # near-replicas of each other: not one is flagged
      assert not flags.any()
    else:
      np.testing.assert_array_equal(flags, mal)
