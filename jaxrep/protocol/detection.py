"""The client's detection step, shared by the protocol and by `replay`.

After each replicated sub-run the detector sees the evidence pooled over the
replicated sub-runs so far, each among the providers trusted at the time;
the providers it flags are trusted no more. `replay` re-runs exactly this on
recorded matrices, so other metric / detector pairs can be scored on the same
sub-runs without training again.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxrep.config import DetectorConfig
from jaxrep.detect import detectors as detect_lib
from jaxrep.protocol.state import Trust


def detection_step(detector: DetectorConfig, evidence: detect_lib.Evidence,
                   trust: Trust, when: int,
                   median_evidence: list[np.ndarray] | None = None
                   ) -> tuple[Trust, str | None]:
  """Runs the detector on `evidence` and flags (at `when`) those it finds
  among the trusted providers; scores of the trusted ones are updated.
  Returns the new trust and the detector's note (None unless it declined
  to decide, see `detect.Verdict`)."""
  n = trust.active.shape[0]
  verdict = detect_lib.detect(
      detector.name, evidence, n, alpha=detector.alpha,
      krum_f=None if detector.krum_f < 0 else detector.krum_f,
      ks_margin=detector.ks_margin, replica_margin=detector.replica_margin,
      median_evidence=median_evidence)
  scores = np.where(trust.active, np.asarray(verdict.scores), trust.scores)
  trust = Trust(trust.active, trust.flagged_at, scores)
  return trust.flag(verdict.flags & trust.active, when), verdict.note


def medoid(d: np.ndarray, members: np.ndarray) -> int:
  """Member with the smallest total distance to the other members."""
  idx = np.flatnonzero(members)
  sub = d[np.ix_(idx, idx)]
  totals = np.where(np.isfinite(sub), sub, np.finfo(float).max).sum(axis=1)
  return int(idx[int(np.argmin(totals))])


def replay(matrices: list[np.ndarray], n: int, detector: str, *,
           alpha: float = 0.01, ks_margin: float = 10.0,
           krum_f: int | None = None, replica_margin: float | None = None,
           updates: list[np.ndarray] | None = None,
           floors: list[float] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Replays the client's sequential detection on recorded matrices.

  `updates` ([n, P] flattened updates per look, `SimResult.recorded_updates`)
  `floors` (`SimResult.floors`) are the detection metric's resolution per
  look, which the replica detector uses as its smallest scale; they belong
  to the run's own metric (other recorded metrics replay with 0.0).
  `updates` is needed by the median baseline only: at each look it measures every
  provider's distance to the coordinate-wise median of the providers the
  replayed client still trusts, as the live protocol does.

  Returns (flags, flagged_at index of the replicated sub-run or -1, scores).
  """
  if detector == "median" and (updates is None
                               or len(updates) < len(matrices)):
    raise ValueError("replay: the median detector needs the recorded updates "
                     "of every look (run with record_metrics to keep them)")
  config = DetectorConfig(name=detector, alpha=alpha, ks_margin=ks_margin,
                          krum_f=-1 if krum_f is None else krum_f)
  if replica_margin is not None:
    config = dataclasses.replace(config, replica_margin=replica_margin)
  trust = Trust.everyone(n)
  evidence = detect_lib.Evidence()
  med = []
  for r, d in enumerate(matrices):
    if trust.active.sum() < 2:
      break
    evidence.add(d, trust.active.copy(),
                 0.0 if floors is None else floors[r])
    if detector == "median":
      med.append(np.asarray(detect_lib.median_distances(
          jnp.asarray(updates[r]), jnp.asarray(trust.active))))
    trust, _ = detection_step(config, evidence, trust, r,
                              med if detector == "median" else None)
  return trust.flagged_at >= 0, trust.flagged_at, trust.scores
