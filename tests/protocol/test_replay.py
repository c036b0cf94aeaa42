"""`protocol.replay` re-runs the client's detection exactly as the live run
does, the median baseline included: its median is taken over the providers
the replayed client still trusts, from the recorded updates."""

import numpy as np
import pytest

from jaxrep import protocol
from jaxrep.config import SimConfig


def test_replayed_median_baseline_matches_the_live_run(digits):
  config = SimConfig.from_flat(providers=8, malicious=3, seed=2, steps=80,
                               subrun_steps=20, replicated=3,
                               attack_check=False, probe_size=64,
                               detector="median")
  r = protocol.run(config, progress=False, dataset=digits,
                   record_metrics=("l2",))
  assert len(r.recorded_updates) == 3
  # Someone is flagged before the last look, so later looks' medians are
  # over fewer providers than all of them.
  assert (r.flagged_at[r.flags] < 2).any(), r.flagged_at
  flags, at, scores = protocol.replay(r.recorded["l2"], 8, "median",
                                      updates=r.recorded_updates)
  np.testing.assert_array_equal(at, r.flagged_at)
  np.testing.assert_allclose(scores, r.scores, rtol=1e-6)


def test_replayed_median_baseline_needs_the_updates(digits):
  mats = [np.ones((4, 4)) - np.eye(4)]
  with pytest.raises(ValueError, match="median detector needs the recorded"):
    protocol.replay(mats, 4, "median")
