"""The client's protocol state: everything that changes from one sub-run to
the next, in one object that is checkpointed as a whole.

    ProtocolState
      client       the client's accepted checkpoint (params, opt, model state)
      no_defense   the same client without RTTD (every sub-run unchecked)
      own          (attack check) every provider's own full run, or None
      trust        who is still trusted, when each was flagged, last scores
      log          the evidence of the replicated sub-runs so far
      history      (recovery) the client's checkpoint before every sub-run
      progress     next sub-run, replicated sub-runs done, notes, reasons,
                   the ledger (who computed each accepted sub-run), the
                   client's trajectory and the extra steps spent

Steps (`jaxrep.protocol.steps`) take a state and return a new one; nothing
here is mutated in place.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np

from jaxrep.detect import detectors as detect_lib


class ModelCheckpoint(NamedTuple):
  """One model as the client holds it."""
  params: Any
  opt_state: Any
  model_state: Any


@dataclasses.dataclass(frozen=True)
class Trust:
  """Per-provider arrays [n]: trusted now, sub-run flagged at (-1: never),
  the detector's latest score."""
  active: np.ndarray
  flagged_at: np.ndarray
  scores: np.ndarray

  @classmethod
  def everyone(cls, n: int) -> "Trust":
    return cls(active=np.ones(n, bool), flagged_at=np.full(n, -1, np.int64),
               scores=np.zeros(n))

  def flag(self, who: np.ndarray, when: int) -> "Trust":
    """`who` (bool [n]) are flagged at sub-run `when` and trusted no more."""
    flagged_at = np.where(who, when, self.flagged_at)
    return dataclasses.replace(self, active=self.active & ~who,
                               flagged_at=flagged_at)


@dataclasses.dataclass(frozen=True)
class EvidenceLog:
  """Distance matrices of the m replicated sub-runs (filled in order):
  [m, n, n] of the detection metric, the members [m, n] of each, the
  metric's float32 resolution at each [m] (`floors`), distances to
  the coordinate-wise median of the members' updates [m, n], and, recorded
  for replay, matrices of further metrics and the flattened updates
  (`updates["rows"]`, [m, n, P]) from which a replayed median baseline
  computes the median of the providers it still trusts."""
  matrices: np.ndarray
  members: np.ndarray
  median: np.ndarray
  recorded: dict
  updates: dict
  floors: np.ndarray

  @classmethod
  def empty(cls, m: int, n: int, record_metrics=(),
            num_params: int = 0) -> "EvidenceLog":
    """`num_params` > 0 (with record_metrics) also records the updates."""
    rows = ({"rows": np.zeros((m, n, num_params), np.float32)}
            if record_metrics and num_params else {})
    return cls(matrices=np.zeros((m, n, n)), members=np.zeros((m, n), bool),
               median=np.zeros((m, n)),
               recorded={k: np.zeros((m, n, n)) for k in record_metrics},
               updates=rows, floors=np.zeros(m))

  def evidence(self, count: int) -> detect_lib.Evidence:
    """The evidence of the first `count` replicated sub-runs."""
    return detect_lib.Evidence(list(self.matrices[:count]),
                               list(self.members[:count]),
                               [float(f) for f in self.floors[:count]])


@dataclasses.dataclass(frozen=True)
class Progress:
  """Host-side bookkeeping (JSON in the checkpoint).

  ledger[s] (None until sub-run s is first done) records the accepted result
  of sub-run s: `computed_by` (the provider whose model the client took),
  `replicated`, `participants` (who was compared), `redone` (how often it was
  re-executed after a rollback) and `digest` (of the accepted parameters).
  `frontier` counts the sub-runs done at least once; `executions` every
  sub-run execution (re-executions included).
  """
  next_subrun: int = 0
  replicated_done: int = 0
  notes: tuple = ()
  reasons: tuple = ()       # (provider, why flagged) pairs
  elapsed: float = 0.0
  ledger: tuple = ()
  trajectory: tuple = ()
  frontier: int = 0
  executions: int = 0
  replication_steps: int = 0
  reexecution_steps: int = 0

  def note(self, text: str) -> "Progress":
    return dataclasses.replace(self, notes=self.notes + (text,))

  def record(self, s: int, entry: dict) -> "Progress":
    ledger = list(self.ledger)
    previous = ledger[s]
    entry = dict(entry, subrun=s,
                 redone=0 if previous is None else previous["redone"] + 1)
    ledger[s] = entry
    return dataclasses.replace(self, ledger=tuple(ledger))

  def point(self, entry: dict) -> "Progress":
    return dataclasses.replace(self, trajectory=self.trajectory + (entry,))


@dataclasses.dataclass(frozen=True)
class ProtocolState:
  client: ModelCheckpoint
  no_defense: ModelCheckpoint
  own: Any                  # train.Population of every provider, or None
  trust: Trust
  log: EvidenceLog
  progress: Progress
  history: Any = None       # ModelCheckpoint stacked [S + 1], or None

  def replace(self, **changes) -> "ProtocolState":
    return dataclasses.replace(self, **changes)

  # -- checkpoint form: a pytree of arrays + a JSON-able dict -------------

  def arrays(self) -> dict:
    tree = {"client": self.client._asdict(),
            "no_defense": self.no_defense._asdict(),
            "trust": dataclasses.asdict(self.trust),
            "log": {f.name: getattr(self.log, f.name)
                    for f in dataclasses.fields(self.log)}}
    if self.own is not None:
      tree["own"] = self.own._asdict()
    if self.history is not None:
      tree["history"] = self.history._asdict()
    return tree

  def meta(self) -> dict:
    p = self.progress
    return {"next_subrun": p.next_subrun,
            "replicated_done": p.replicated_done, "notes": list(p.notes),
            "reasons": {str(i): why for i, why in p.reasons},
            "elapsed": p.elapsed, "ledger": list(p.ledger),
            "trajectory": list(p.trajectory), "frontier": p.frontier,
            "executions": p.executions,
            "replication_steps": p.replication_steps,
            "reexecution_steps": p.reexecution_steps}

  def restored(self, tree: dict, meta: dict) -> "ProtocolState":
    """This state (the template) with the checkpointed values."""
    progress = Progress(
        next_subrun=int(meta["next_subrun"]),
        replicated_done=int(meta["replicated_done"]),
        notes=tuple(meta["notes"]),
        reasons=tuple((int(i), why) for i, why in meta["reasons"].items()),
        elapsed=float(meta["elapsed"]), ledger=tuple(meta["ledger"]),
        trajectory=tuple(meta["trajectory"]), frontier=int(meta["frontier"]),
        executions=int(meta["executions"]),
        replication_steps=int(meta["replication_steps"]),
        reexecution_steps=int(meta["reexecution_steps"]))
    own = None if self.own is None else type(self.own)(**tree["own"])
    history = (None if self.history is None
               else ModelCheckpoint(**tree["history"]))
    as_np = lambda d: {k: np.asarray(v) if not isinstance(v, dict) else
                       {m: np.asarray(a) for m, a in v.items()}
                       for k, v in d.items()}
    return ProtocolState(
        client=ModelCheckpoint(**tree["client"]),
        no_defense=ModelCheckpoint(**tree["no_defense"]), own=own,
        trust=Trust(**as_np(tree["trust"])),
        log=EvidenceLog(**as_np(tree["log"])), progress=progress,
        history=history)
