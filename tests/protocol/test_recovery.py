"""Recovery: the client rolls back past work of providers it later flags,
keeps a ledger of who computed what, and reports its model over training."""

import dataclasses

import numpy as np
import pytest

from jaxrep import protocol
from jaxrep import report
from jaxrep.config import SimConfig

# Seed 15: the attackers are providers 0 and 4; attacker 0 computes the
# unchecked sub-runs 1 and 2; the attackers are flagged at the first
# replicated sub-run (3) by the default (replica) detector, so the backdoor
# reaches the client unless it rolls back (to before sub-run 1) and redoes
# sub-runs 1-3.
SMALL = dict(providers=6, malicious=2, steps=120, subrun_steps=20,
             replicated=2, poison_rate=0.2, seed=15)


@pytest.fixture(scope="module")
def runs(digits):
  return {rec: protocol.run(SimConfig.from_flat(**SMALL, recovery=rec),
                            progress=False, dataset=digits)
          for rec in ("rollback", "none")}


def test_rollback_removes_the_backdoor_that_reached_the_client(runs):
  kept, rolled = runs["none"].summary(), runs["rollback"].summary()
  # Without recovery the flagged attacker's unchecked work stays in the
  # client's model...
  assert kept["final_attack_success_rate"] > 0.5, kept
  assert kept["rollbacks"] == 0 and kept["overhead_reexecution_steps"] == 0
  # ...with it, the client ends near the benign base rate.
  assert rolled["tpr"] == 1.0 and rolled["fpr"] == 0.0
  assert rolled["final_attack_success_rate"] < 0.1, rolled
  assert rolled["rollbacks"] == 1
  assert abs(rolled["final_clean_accuracy"]
             - kept["final_clean_accuracy"]) < 0.05


def test_ledger_shows_who_computed_what(runs):
  for rec, r in runs.items():
    assert len(r.ledger) == 6 and all(e is not None for e in r.ledger)
    flagged = set(np.flatnonzero(r.flags).tolist())
    accepted = {e["computed_by"] for e in r.ledger}
    if rec == "rollback":
      assert not accepted & flagged, r.ledger
      assert [e["redone"] for e in r.ledger] == [0, 1, 1, 1, 0, 0]
      assert set(r.flagged_at[r.flags]) == {3}
    else:
      assert accepted & flagged
    for s, e in enumerate(r.ledger):
      assert e["subrun"] == s and len(e["digest"]) == 16
      assert e["replicated"] == (s in r.replicated_subruns)


def test_extra_steps_split_into_replication_and_reexecution(runs):
  s = runs["rollback"].summary()
  k = SMALL["subrun_steps"]
  assert s["overhead_steps"] == (s["overhead_replication_steps"]
                                 + s["overhead_reexecution_steps"])
  # Sub-runs 1, 2 (unchecked, k each) and 3 (replicated, by the 4 trusted
  # providers) are redone.
  assert s["overhead_reexecution_steps"] == 2 * k + 4 * k
  # First checks: sub-run 3 by all 6 providers, sub-run 5 by the 4 trusted.
  assert s["overhead_replication_steps"] == 5 * k + 3 * k


def test_trajectory_marks_flags_and_the_rollback(runs, tmp_path):
  r = runs["rollback"]
  t = r.trajectory
  assert len(t) == 6 + 3
  back = [p for p in t if "rollback_to" in p]
  assert len(back) == 1 and back[0]["rollback_to"] == 1
  assert back[0]["flagged"] == [0, 4]     # seed 15's attackers
  assert [p["reexecution"] for p in t].count(True) == 3
  assert t[-1]["attack_success_rate"] == r.client["attack_success_rate"]
  paths = report.write_plots(r, str(tmp_path))
  assert (tmp_path / "client_trajectory.png").stat().st_size > 10_000
  assert str(tmp_path / "client_trajectory.png") in paths


class _Stop(Exception):
  pass


def test_resume_during_reexecution_is_bitwise_identical(runs, digits,
                                                         tmp_path):
  config = SimConfig.from_flat(**SMALL, recovery="rollback")
  calls = []

  def stop_while_redoing(behaviour, s):
    calls.append(s)
    if len(calls) == 6:       # executions 0..3 | 1 2 <- here | 3 4 5
      raise _Stop
    return behaviour

  with pytest.raises(_Stop):
    protocol.run(config, progress=False, dataset=digits,
                 workdir=str(tmp_path), behaviour_for_subrun=stop_while_redoing)
  assert calls == [0, 1, 2, 3, 1, 2]
  resumed = protocol.run(config, progress=False, dataset=digits,
                         workdir=str(tmp_path))
  whole = runs["rollback"]
  assert any("resumed at sub-run 2" in n for n in resumed.notes)
  a, b = report.results_dict(resumed), report.results_dict(whole)
  for key in ("providers", "ledger", "trajectory", "client"):
    assert a[key] == b[key], key
  drop = lambda s: {k: v for k, v in s.items() if k != "wall_seconds"}
  assert drop(a["summary"]) == drop(b["summary"])
  assert dataclasses.asdict(resumed.config) == dataclasses.asdict(whole.config)
