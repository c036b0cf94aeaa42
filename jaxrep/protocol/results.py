"""What a simulation ends with: every provider's verdict and model quality,
the client's final model with and without the defense, and the evidence."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from jaxrep.config import SimConfig
from jaxrep.core import trees
from jaxrep.detect import metrics as metrics_lib
from jaxrep.population import build as population_lib
from jaxrep.population import divergence as div_lib
from jaxrep.protocol import hostile as hostile_lib
from jaxrep.protocol.simulation import Simulation
from jaxrep.protocol.state import ModelCheckpoint, ProtocolState
from jaxrep.runtime import memory as memory_lib
from jaxrep.train import trainer as train_lib


@dataclasses.dataclass
class SimResult:
  """Everything the report needs."""
  config: SimConfig
  malicious: np.ndarray
  attack_names: list
  flags: np.ndarray
  flagged_at: np.ndarray
  scores: np.ndarray
  clean_accuracy: np.ndarray
  attack_success_rate: np.ndarray
  client: dict
  no_defense: dict
  replicated_subruns: list
  matrices: list
  members: list
  wall_seconds: float
  notes: list
  recorded: dict = dataclasses.field(default_factory=dict)
  recorded_updates: list = dataclasses.field(default_factory=list)
  floors: list = dataclasses.field(default_factory=list)  # per look
  reasons: dict = dataclasses.field(default_factory=dict)
  memory: dict = dataclasses.field(default_factory=dict)
  ledger: list = dataclasses.field(default_factory=list)
  trajectory: list = dataclasses.field(default_factory=list)
  replication_steps: int = 0
  reexecution_steps: int = 0
  stacks: list = dataclasses.field(default_factory=list)  # profile per provider

  @property
  def hostile(self) -> dict[int, str]:
    p = self.config.protocol
    return hostile_lib.parse_hostile(p.hostile, p.providers)

  def summary(self) -> dict:
    """Detection metrics exclude hostile providers (reported separately)."""
    mal = self.malicious
    keep = ~np.isin(np.arange(len(mal)), list(self.hostile))
    return {
        "tpr": metrics_lib.tpr(self.flags[keep], mal[keep]),
        "fpr": metrics_lib.fpr(self.flags[keep], mal[keep]),
        "auroc": metrics_lib.auroc(self.scores[keep], mal[keep]),
        "hostile_flagged": int(self.flags[~keep].sum()),
        "hostile": int((~keep).sum()),
        "final_clean_accuracy": self.client["clean_accuracy"],
        "final_attack_success_rate": self.client["attack_success_rate"],
        "no_defense_clean_accuracy": self.no_defense["clean_accuracy"],
        "no_defense_attack_success_rate":
            self.no_defense["attack_success_rate"],
        "malicious_mean_attack_success_rate":
            _mean_or_nan(self.attack_success_rate[mal]),
        "benign_mean_clean_accuracy":
            _mean_or_nan(self.clean_accuracy[~mal]),
        "malicious_mean_clean_accuracy":
            _mean_or_nan(self.clean_accuracy[mal]),
        "overhead_steps": self.replication_steps + self.reexecution_steps,
        "overhead_replication_steps": self.replication_steps,
        "overhead_reexecution_steps": self.reexecution_steps,
        "rollbacks": sum(1 for p in self.trajectory if "rollback_to" in p),
        "training_steps": self.config.protocol.steps,
        "replicated_subruns": [int(s) for s in self.replicated_subruns],
        "attacker_spread": [attacker_spread(d, mal, m) for d, m in
                            zip(self.matrices, self.members)],
        "wall_seconds": self.wall_seconds,
    }

  def providers(self) -> list[dict]:
    detector = self.config.detector
    return [{
        "id": i,
        "malicious": bool(self.malicious[i]),
        "attack": self.attack_names[i],
        "stack": self.stacks[i] if self.stacks else None,
        "hostile": self.hostile.get(i),
        "flagged": bool(self.flags[i]),
        "flagged_at_subrun": (int(self.flagged_at[i])
                              if self.flagged_at[i] >= 0 else None),
        "flag_reason": (self.reasons.get(i, f"{detector.name} on "
                                            f"{detector.metric}")
                        if self.flagged_at[i] >= 0 else None),
        "score": _finite_or_none(self.scores[i]),
        "clean_accuracy": float(self.clean_accuracy[i]),
        "attack_success_rate": float(self.attack_success_rate[i]),
    } for i in range(len(self.malicious))]


def attacker_spread(matrix, malicious, members) -> float:
  """How far apart the attackers are, in units of benign divergence: the
  median distance over pairs of malicious members of a look divided by the
  median over pairs of benign members (nan without two of each). About 1 or
  less: the attackers are as close as honest replicas (they look like one
  cluster); far above 1: they are independent of each other."""
  d = np.asarray(matrix, np.float64)
  upper = np.triu(np.ones(d.shape, bool), 1)
  both = lambda who: upper & np.outer(who, who)
  mal = np.asarray(malicious, bool) & np.asarray(members, bool)
  ben = ~np.asarray(malicious, bool) & np.asarray(members, bool)
  if mal.sum() < 2 or ben.sum() < 2:
    return float("nan")
  with np.errstate(divide="ignore", invalid="ignore"):   # benign at 0: inf
    return float(np.median(d[both(mal)]) / np.median(d[both(ben)]))


def _mean_or_nan(x) -> float:
  return float(np.mean(x)) if np.size(x) else float("nan")


def _finite_or_none(v):
  v = float(v)
  return v if math.isfinite(v) else None


def memory_report(plan: memory_lib.Plan) -> dict:
  """The memory plan as results.json records it (MiB per device)."""
  mib = lambda b: round(b / 2**20, 3)
  return {"providers_per_chunk": int(plan.chunk),
          "chunks": int(plan.num_chunks),
          "estimated_peak_mib": mib(plan.estimate["peak"]),
          "budget_mib": mib(plan.budget),
          "estimate_mib": {k: mib(v) for k, v in plan.estimate.items()}}


def model_report(sim: Simulation, checkpoint: ModelCheckpoint) -> dict:
  """Clean accuracy and worst ASR (over every malicious trigger) of one
  model."""
  ds = sim.dataset
  acc = float(train_lib.evaluate(
      sim.model, trees.expand(checkpoint.params),
      trees.expand(checkpoint.model_state), ds.x_test, ds.y_test)[0])
  worst, per = population_lib.client_asr(
      sim.model, checkpoint.params, checkpoint.model_state, sim.behaviour,
      ds, sim.behaviour.malicious)
  return {"clean_accuracy": acc, "attack_success_rate": worst,
          "attack_success_rate_per_trigger": per}


def evaluate(sim: Simulation, state: ProtocolState, last_returned,
             wall_seconds: float) -> SimResult:
  """The result of a finished protocol: provider models are each provider's
  own full run (attack check), else those returned for the last sub-run."""
  notes = list(state.progress.notes)
  if sim.memory.num_chunks > 1:
    m = sim.memory
    notes.append(f"memory: {sim.n} providers do not fit at once (estimated "
                 f"{m.estimate['peak'] / 2**20:.1f} MiB per device for "
                 f"{m.chunk} of them, budget {m.budget / 2**20:.1f} MiB); "
                 f"trained in {m.num_chunks} chunks of {m.chunk}")
  if state.own is not None:
    final = state.own
  else:
    client = state.client
    final = last_returned if last_returned is not None else (
        sim.trainer.replicate(client.params, client.model_state, sim.n))
    notes.append("attack_check is off: provider metrics are of the models "
                 "returned for the last sub-run (k steps from the client's "
                 "checkpoint), not of a full run")
  ds = sim.dataset
  acc = train_lib.evaluate(sim.model, final.params, final.model_state,
                           ds.x_test, ds.y_test)
  asr = population_lib.attack_success_rate(
      sim.model, final.params, final.model_state, sim.behaviour, ds)
  r = state.progress.replicated_done
  log, trust = state.log, state.trust
  return SimResult(
      config=sim.config, malicious=sim.behaviour.malicious,
      attack_names=sim.behaviour.names(), flags=trust.flagged_at >= 0,
      flagged_at=np.asarray(trust.flagged_at), scores=np.asarray(trust.scores),
      clean_accuracy=np.asarray(acc), attack_success_rate=np.asarray(asr),
      client=model_report(sim, state.client),
      no_defense=model_report(sim, state.no_defense),
      replicated_subruns=list(sim.replicated), matrices=list(log.matrices[:r]),
      members=list(log.members[:r]), wall_seconds=wall_seconds, notes=notes,
      recorded={m: list(v[:r]) for m, v in log.recorded.items()},
      recorded_updates=list(log.updates["rows"][:r]) if log.updates else [],
      floors=[float(f) for f in log.floors[:r]],
      reasons=dict(state.progress.reasons),
      memory=memory_report(sim.memory), ledger=list(state.progress.ledger),
      trajectory=list(state.progress.trajectory),
      replication_steps=state.progress.replication_steps,
      reexecution_steps=state.progress.reexecution_steps,
      stacks=div_lib.provider_stacks(sim.config.divergence, sim.n,
                                     sim.config.seed))
