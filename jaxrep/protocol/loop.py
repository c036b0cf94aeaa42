"""The RTTD protocol: the client's host loop over sub-runs.

A training run of T = `steps` steps is split into S = T / k sub-runs of
k = `subrun_steps` steps. Before training, the client secretly draws m =
`replicated` of them. For every sub-run s:

* the client hands its current checkpoint (parameters, optimizer and model
  state), the batch schedule of s and the hyper-parameters to the providers;
* a replicated sub-run goes to every provider still trusted; the client
  computes the distance matrix between the returned models, runs the detector
  on the evidence pooled over all replicated sub-runs so far, excludes the
  flagged providers for good, and continues from the medoid of the unflagged
  results;
* a non-replicated sub-run goes to one trusted provider, drawn at random, and
  is accepted unchecked (a malicious one poisons it; that is how a backdoor can
  reach the client despite the defense).

The simulator trains all n providers on every sub-run (one vmapped step does
that at the cost of one), but the client only *sees* and accepts what the
protocol allows. Malicious providers poison every sub-run they compute: they
cannot tell which sub-runs are replicated.

Two more chains are run for the report:
* no defense: the same client, but every sub-run is done by a provider drawn
  among all n and accepted unchecked; its final model answers "would the
  backdoor have reached the client without RTTD?";
* attack check (`attack_check=True`): every provider trains the whole run on
  its own (the model it would deliver as the only provider). Its clean
  accuracy and attack success rate show that each attack really works; a
  detected attack that does not work would prove nothing.

Extra cost of the defense: m * k * (n - 1) training steps.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.runtime import checkpoint as ckpt_lib
from jaxrep.protocol import hostile as hostile_lib
from jaxrep.runtime import memory as memory_lib
from jaxrep.runtime import sharding as sharding_lib
from jaxrep.population import build as population_lib
from jaxrep.data import datasets as data_lib
from jaxrep.detect import detectors as detect_lib
from jaxrep.distances import kernels as dist_lib
from jaxrep.population import divergence as div_lib
from jaxrep.detect import metrics as metrics_lib
from jaxrep.models import zoo as models_lib
from jaxrep.train import trainer as train_lib
from jaxrep import config as config_lib
from jaxrep.config import SimConfig
from jaxrep.core import rng
from jaxrep.train import schedule as schedule_lib
from jaxrep.core.errors import ConfigError, require

METRICS = ("l2", "cosine", "l1", "linf", "output", "cka", "zest")
PARAM_METRICS = ("l2", "cosine", "l1", "linf")
AUTO = config_lib.AUTO
# What "auto" means for --model, by the dataset's modality.
DEFAULT_MODEL = {"image": "mlp", "text": "text_cnn"}


def train_config(config: SimConfig) -> train_lib.TrainConfig:
  """The trainer's hyper-parameters of a simulation."""
  t = config.training
  return train_lib.TrainConfig(
      optimizer=t.optimizer, learning_rate=t.learning_rate,
      momentum=t.momentum, schedule=t.schedule,
      total_steps=config.protocol.steps, batch_size=t.batch_size)


def validate(config: SimConfig) -> SimConfig:
  """Every check that can be made without loading data: the config's own
  fields and the names each stage knows (model, attack and its options,
  metric, detector, hostile providers, optimizer and schedule)."""
  config.validate()
  model = config.model.name
  require(model in models_lib.MODELS + (AUTO,), "model",
          f"unknown model {model!r}; choose one of "
          f"{', '.join(models_lib.MODELS + (AUTO,))}")
  population_lib.validate_attack(config.attack)
  require(config.detector.metric in METRICS, "metric",
          f"unknown metric {config.detector.metric!r}; choose one of "
          f"{', '.join(METRICS)}")
  require(config.detector.name in detect_lib.DETECTORS, "detector",
          f"unknown detector {config.detector.name!r}; choose one of "
          f"{', '.join(detect_lib.DETECTORS)}")
  hostile_lib.parse_hostile(config.protocol.hostile, config.protocol.providers)
  train_config(config).validate()
  return config


def resolve(config: SimConfig, ds: data_lib.Dataset) -> SimConfig:
  """The config with "auto" model / attack made concrete for the dataset,
  checked against its modality (an image attack on text is a ConfigError)."""
  modality = ds.modality
  model = (DEFAULT_MODEL[modality] if config.model.name == AUTO
           else config.model.name)
  text_model = model in models_lib.TEXT_MODELS
  require(text_model == (modality == "text"), "model",
          f"{model} is {'a text' if text_model else 'an image'} model but "
          f"dataset {ds.name} holds "
          f"{'text' if modality == 'text' else 'images'}; use one of "
          f"{', '.join(models_lib.TEXT_MODELS if modality == 'text' else models_lib.IMAGE_MODELS)}")
  attack = population_lib.resolve_attack(config.attack.name, modality, ds.name)
  config = config.replace(model=model, attack=attack)
  return dataclasses.replace(
      config, attack=population_lib.with_defaults(config.attack))


def _take(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i], tree)


def _take_slice(tree, i):
  return jax.tree_util.tree_map(lambda a: a[i:i + 1], tree)


def model_distances(config: SimConfig, model, start_params, pop, probe_x,
                    key, mesh=None) -> np.ndarray:
  """The [n, n] distance matrix of `config.metric` for one sub-run.

  With a `mesh`, the providers stay split over its devices (ring kernels of
  `jaxrep.runtime.sharding`); the result equals the unsharded one to float32 rounding.
  """
  metric = config.metric
  if mesh is not None:
    d = sharding_lib.model_distances(
        metric, mesh, start_params=start_params, params=pop.params,
        model_state=pop.model_state, apply_fn=model.predict,
        probe_x=probe_x[:16] if metric == "zest" else probe_x, key=key)
    return np.asarray(sharding_lib.to_host(d), np.float64)
  if metric in PARAM_METRICS:
    upd = dist_lib.updates(start_params, pop.params)
    d = dist_lib.pairwise_distances(upd, metric)
  elif metric == "output":
    d = dist_lib.output_distances(model.predict, pop.params, pop.model_state,
                                  probe_x)
  elif metric == "cka":
    d = dist_lib.cka_distances(model.predict, pop.params, pop.model_state,
                               probe_x)
  else:
    d = dist_lib.zest_distances(model.predict, pop.params, pop.model_state,
                                probe_x[:16], key)
  return np.asarray(d, np.float64)


def medoid(d: np.ndarray, members: np.ndarray) -> int:
  """Member with the smallest total distance to the other members."""
  idx = np.flatnonzero(members)
  sub = d[np.ix_(idx, idx)]
  totals = np.where(np.isfinite(sub), sub, np.finfo(float).max).sum(axis=1)
  return int(idx[int(np.argmin(totals))])


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
  recorded_median: list = dataclasses.field(default_factory=list)
  reasons: dict = dataclasses.field(default_factory=dict)
  memory: dict = dataclasses.field(default_factory=dict)

  @property
  def hostile(self) -> dict[int, str]:
    return hostile_lib.parse_hostile(self.config.hostile,
                                     self.config.providers)

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
        "overhead_steps": self.config.overhead_steps,
        "training_steps": self.config.steps,
        "replicated_subruns": [int(s) for s in self.replicated_subruns],
        "wall_seconds": self.wall_seconds,
    }

  def providers(self) -> list[dict]:
    return [{
        "id": i,
        "malicious": bool(self.malicious[i]),
        "attack": self.attack_names[i],
        "hostile": self.hostile.get(i),
        "flagged": bool(self.flags[i]),
        "flagged_at_subrun": (int(self.flagged_at[i])
                              if self.flagged_at[i] >= 0 else None),
        "flag_reason": (self.reasons.get(i, f"{self.config.detector.name} on "
                                            f"{self.config.metric}")
                        if self.flagged_at[i] >= 0 else None),
        "score": _finite_or_none(self.scores[i]),
        "clean_accuracy": float(self.clean_accuracy[i]),
        "attack_success_rate": float(self.attack_success_rate[i]),
    } for i in range(len(self.malicious))]


def _mean_or_nan(x) -> float:
  return float(np.mean(x)) if np.size(x) else float("nan")


def _finite_or_none(v):
  v = float(v)
  return v if math.isfinite(v) else None


def memory_plan(config: SimConfig, trainer, behaviour, div, x_train, y_train,
                mesh=None) -> memory_lib.Plan:
  """How the population's sub-runs fit in device memory (`jaxrep.runtime.memory`).

  Estimates the peak bytes per device of a sub-run and of the distance
  kernels from the traced training step (nothing is allocated) and picks the
  number of providers trained at once: all n when they fit, else chunks
  (a multiple of the mesh size) that give the same models. A config that
  cannot fit even one provider per device raises ConfigError naming what to
  shrink. The budget is `config.memory_mb` MiB per device, else what the
  device reports (on CPU: the host's available memory shared by its
  devices).
  """
  d = 1 if mesh is None else sharding_lib.mesh_size(mesh)
  n = config.providers
  sizes = memory_lib.sizes_for(
      trainer, behaviour, div, x_train, y_train, providers=n,
      batch_size=config.batch_size, subrun_steps=config.subrun_steps,
      devices=d)
  # The client's, the no-defense chain's and (attack_check) every provider's
  # own model stay allocated throughout.
  state = sizes.params + sizes.opt_state + sizes.model_state
  own = -(-n // d) if config.attack_check else 0
  sizes = dataclasses.replace(sizes, resident=(2 + own) * state)
  available = config.memory_mb * 2**20 if config.memory_mb else None
  return memory_lib.plan(sizes, available)


def run(config: SimConfig, *, progress: bool = True,
        dataset: data_lib.Dataset | None = None,
        record_metrics: tuple[str, ...] = (),
        workdir: str | None = None, resume: bool = True,
        behaviour: Any = None,
        hooks: train_lib.Hooks | None = None,
        behaviour_for_subrun: Any = None) -> SimResult:
  """Runs one simulation end to end (see module docstring).

  Args:
    config: the simulation.
    progress: show a progress bar over sub-runs (stderr).
    dataset: an already loaded dataset (else `config.dataset` is loaded).
    record_metrics: further metrics whose matrices are computed and recorded
      at every replicated sub-run (in `SimResult.recorded`), so that other
      metric/detector pairs can be evaluated on the same sub-runs with
      `replay` (the client's trajectory follows config.metric/detector).
    workdir: if given, the state is checkpointed there after every sub-run
      and, with `resume`, a run found there continues where it stopped. A
      resumed run gives bitwise the same results as an uninterrupted one.
    resume: continue from a checkpoint in `workdir` (else start over).
    behaviour: a custom per-provider Behaviour (e.g. adaptive attacks); by
      default it is built from config.attack / malicious. Its malicious count
      must equal config.malicious.
    hooks: custom trainer hooks for `behaviour` (default
      the family's `make_hooks(behaviour)`).
    behaviour_for_subrun: optional host-side function
      (behaviour, subrun index) -> behaviour used for that sub-run (same
      shapes, so no recompilation), e.g. an attacker that poisons only some
      sub-runs. It cannot see which sub-runs are replicated.
  """
  for m in record_metrics:
    require(m in METRICS, "record_metrics",
            f"unknown metric {m!r}; choose from {', '.join(METRICS)}")
  validate(config)
  t0 = time.perf_counter()
  ds = dataset if dataset is not None else data_lib.load_dataset(
      config.dataset, config.data_dir, max_train=config.max_train or None,
      max_len=config.max_len, vocab_size=config.vocab_size)
  config = resolve(config, ds)
  family = population_lib.family(ds.modality)
  n, k = config.providers, config.subrun_steps
  train_lib.check_population_args(n, k, config.batch_size, ds.x_train.shape[0])
  if config.target_label >= ds.num_classes:
    raise ConfigError(f"target_label: must be in [0, {ds.num_classes - 1}] "
                      f"(or -1), got {config.target_label}")
  hostile = hostile_lib.parse_hostile(config.hostile, n)
  if behaviour is None:
    behaviour = population_lib.make_behaviour(config, ds)
  require(behaviour.size == n, "behaviour",
          f"has {behaviour.size} providers, config has {n}")
  malicious = behaviour.malicious
  require(int(malicious.sum()) == config.malicious, "behaviour",
          f"has {int(malicious.sum())} malicious providers, config says "
          f"{config.malicious}")
  model = models_lib.get_model(config.model.name, ds.num_classes, ds.input_shape,
                               vocab_size=len(ds.vocab) if ds.vocab else None)
  trainer = train_lib.make_trainer(
      model, train_config(config), config.divergence,
      hooks if hooks is not None else family.make_hooks(behaviour))
  full_behaviour = behaviour
  div = div_lib.make_divergence(config.divergence, n, config.seed)
  x_train, y_train = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  probe_x = jnp.asarray(ds.x_test[:config.probe_size])
  mesh = None
  if config.devices != 1:
    require(config.devices <= jax.device_count(), "devices",
            f"{config.devices} devices requested, {jax.device_count()} "
            "available")
    mesh = sharding_lib.make_mesh(config.devices or None)
    sharding_lib.check_divisible(n, mesh, field="devices")
  # Multi-host: every process keeps a host copy of what the providers return
  # (what a client receives anyway) and runs the same host loop; training and
  # distances stay split over the global mesh.
  gather = jax.process_count() > 1
  mem = memory_plan(config, trainer, behaviour, div, x_train, y_train, mesh)
  if mem.num_chunks > 1:
    plan_note = (f"memory: {n} providers do not fit at once (estimated "
                 f"{mem.estimate['peak'] / 2**20:.1f} MiB per device for "
                 f"{mem.chunk} of them, budget {mem.budget / 2**20:.1f} MiB); "
                 f"trained in {mem.num_chunks} chunks of {mem.chunk}")

  def population_sub_run(pop, schedule, keys, behaviour_):
    """All n providers' sub-run: over the mesh if there is one, in provider
    chunks if the population does not fit in one go."""
    args = (pop, x_train, y_train, schedule, keys, div, behaviour_)
    if mem.num_chunks > 1:
      out_ = memory_lib.chunked_sub_run(trainer, *args, chunk_size=mem.chunk,
                                        mesh=mesh, to_host=gather)
    elif mesh is None:
      out_ = trainer.sub_run(*args)
    else:
      out_ = sharding_lib.sharded_sub_run(trainer, mesh, *args)
    return sharding_lib.to_host(out_) if gather else out_

  root = rng.root(config.seed)
  num_subruns = config.num_subruns
  replicated = np.sort(rng.replicated(config.seed).choice(
      num_subruns, config.replicated, replace=False))
  krum_f = None if config.krum_f < 0 else config.krum_f

  st = _initial_state(config, model, trainer, root, record_metrics)
  meta = {"next_subrun": 0, "replicated_done": 0, "notes": [], "reasons": {},
          "elapsed": 0.0}
  ckpt = None
  if workdir is not None:
    ckpt = ckpt_lib.Checkpointer(workdir, config)
    restored = ckpt.restore(st) if resume else None
    if restored is not None:
      _, st, meta = restored
      meta.pop("config", None)
      meta["notes"].append(f"resumed at sub-run {meta['next_subrun']}")
  t_resume = time.perf_counter()

  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_subruns, initial=meta["next_subrun"], desc="sub-runs",
               unit="sub-run", dynamic_ncols=True)
  out = None
  for s in range(meta["next_subrun"], num_subruns):
    behaviour = (full_behaviour if behaviour_for_subrun is None
                 else behaviour_for_subrun(full_behaviour, s))
    schedule = jnp.asarray(schedule_lib.batch_schedule(
        config.seed, s, k, config.batch_size, ds.x_train.shape[0]))
    keys = rng.provider_keys(rng.subrun(root, s), n)
    client = st["client"]
    start = trainer.replicate(client["params"], client["model_state"], n,
                              opt_state=client["opt_state"])
    out, _ = population_sub_run(start, schedule, keys, behaviour)
    # What the providers return, and the client's checks of it.
    returned, odd = hostile_lib.tamper(out.params, hostile)
    active = st["active"]
    reasons = hostile_lib.check_returned(client["params"], returned, odd,
                                         active)
    for i, why in reasons.items():
      st["flagged_at"][i] = s
      meta["reasons"][str(i)] = why
    active = active & ~np.isin(np.arange(n), list(reasons))
    returned = hostile_lib.neutralize(returned, list(reasons))
    out = out._replace(params=returned)
    assign = rng.assignment(config.seed, s)
    chosen = None
    if s in replicated and active.sum() >= 2:
      r = meta["replicated_done"]
      key = rng.distance(root, s)
      d = model_distances(config, model, client["params"], out, probe_x, key,
                          mesh)
      st["matrices"][r], st["members"][r] = d, active
      for m in record_metrics:
        st["recorded"][m][r] = d if m == config.metric else model_distances(
            config.replace(metric=m), model, client["params"],
            out, probe_x, key, mesh)
      if config.detector.name == "median" or record_metrics:
        rows = train_lib.flatten_population(
            dist_lib.updates(client["params"], out.params))
        st["median"][r] = np.asarray(detect_lib.median_distances(
            rows, jnp.asarray(active)))
        # For replay: distances to the median of ALL providers' updates.
        st["recorded_median"][r] = np.asarray(detect_lib.median_distances(
            rows, jnp.ones(n, bool)))
      meta["replicated_done"] = r + 1
      evidence = detect_lib.Evidence(list(st["matrices"][:r + 1]),
                                     list(st["members"][:r + 1]))
      verdict = detect_lib.detect(config.detector.name, evidence, n,
                                  alpha=config.alpha, krum_f=krum_f,
                                  ks_margin=config.ks_margin,
                                  median_evidence=list(st["median"][:r + 1]))
      st["scores"][active] = np.asarray(verdict.scores)[active]
      new = verdict.flags & active
      st["flagged_at"][new] = s
      active = active & ~new
      if active.any():
        chosen = medoid(d, active)
      else:
        meta["notes"].append(f"sub-run {s}: every provider was flagged; the "
                             "client keeps its checkpoint")
    else:
      if s in replicated:
        meta["notes"].append(f"sub-run {s}: fewer than 2 trusted providers "
                             "left, no comparison possible")
      if active.any():
        chosen = int(assign.choice(np.flatnonzero(active)))
    st["active"] = active
    if chosen is not None:
      st["client"] = {"params": _take(out.params, chosen),
                      "opt_state": _take(out.opt_state, chosen),
                      "model_state": _take(out.model_state, chosen)}
    # No defense: one provider drawn among all, accepted unchecked.
    who = int(rng.no_defense(config.seed, s).integers(n))
    nodef = st["nodef"]
    single = trainer.replicate(nodef["params"], nodef["model_state"], 1,
                               opt_state=nodef["opt_state"])
    single, _ = trainer.sub_run(single, x_train, y_train, schedule,
                                keys[who:who + 1], _take_slice(div, who),
                                _take_slice(behaviour, who))
    st["nodef"] = {"params": _take(single.params, 0),
                   "opt_state": _take(single.opt_state, 0),
                   "model_state": _take(single.model_state, 0)}
    if config.attack_check:
      own = train_lib.Population(**st["own"])
      own, _ = population_sub_run(own, schedule, keys, behaviour)
      st["own"] = own._asdict()
    meta["next_subrun"] = s + 1
    if ckpt is not None:
      ckpt.save(s, st, dict(meta, elapsed=meta["elapsed"] + time.perf_counter()
                            - t_resume))
    if bar is not None:
      bar.set_postfix(replicated=meta["replicated_done"],
                      flagged=int((st["flagged_at"] >= 0).sum()),
                      trusted=int(st["active"].sum()))
      bar.update(1)
  if bar is not None:
    bar.close()
  if ckpt is not None:
    ckpt.close()

  # Evaluation.
  notes = list(meta["notes"])
  if mem.num_chunks > 1:
    notes.append(plan_note)
  if config.attack_check:
    final = train_lib.Population(**st["own"])
  else:
    final = out if out is not None else trainer.replicate(
        st["client"]["params"], st["client"]["model_state"], n)
    notes.append("attack_check is off: provider metrics are of the models "
                 "returned for the last sub-run (k steps from the client's "
                 "checkpoint), not of a full run")
  behaviour = full_behaviour
  acc = train_lib.evaluate(model, final.params, final.model_state, ds.x_test,
                           ds.y_test)
  asr = family.attack_success_rate(model, final.params, final.model_state,
                                   behaviour, ds.x_test, ds.y_test)
  as_tuple = lambda c: (c["params"], c["opt_state"], c["model_state"])
  client_report = _final_model_report(model, as_tuple(st["client"]),
                                      behaviour, ds, malicious)
  nodef_report = _final_model_report(model, as_tuple(st["nodef"]), behaviour,
                                     ds, malicious)
  r = meta["replicated_done"]
  flagged_at = np.asarray(st["flagged_at"])
  reasons = {int(i): why for i, why in meta["reasons"].items()}
  return SimResult(
      config=config, malicious=malicious, attack_names=behaviour.names(),
      flags=flagged_at >= 0, flagged_at=flagged_at,
      scores=np.asarray(st["scores"]), clean_accuracy=np.asarray(acc),
      attack_success_rate=np.asarray(asr), client=client_report,
      no_defense=nodef_report, replicated_subruns=list(replicated),
      matrices=list(st["matrices"][:r]), members=list(st["members"][:r]),
      wall_seconds=meta["elapsed"] + time.perf_counter() - t_resume
      if ckpt is not None else time.perf_counter() - t0,
      notes=notes,
      recorded={m: list(v[:r]) for m, v in st["recorded"].items()},
      recorded_median=list(st["recorded_median"][:r]), reasons=reasons,
      memory=memory_report(mem))


def memory_report(plan: memory_lib.Plan) -> dict:
  """The memory plan as results.json records it (MiB per device)."""
  mib = lambda b: round(b / 2**20, 3)
  return {"providers_per_chunk": int(plan.chunk),
          "chunks": int(plan.num_chunks),
          "estimated_peak_mib": mib(plan.estimate["peak"]),
          "budget_mib": mib(plan.budget),
          "estimate_mib": {k: mib(v) for k, v in plan.estimate.items()}}


def _initial_state(config: SimConfig, model, trainer, root,
                   record_metrics) -> dict:
  """The protocol state before the first sub-run (a checkpointable pytree)."""
  n, m = config.providers, config.replicated
  params, model_state = model.init(rng.model_init(root))
  client = {"params": params, "opt_state": trainer.optimizer.init(params),
            "model_state": model_state}
  st = {
      "client": client,
      "nodef": dict(client),
      "active": np.ones(n, bool),
      "flagged_at": np.full(n, -1, np.int64),
      "scores": np.zeros(n),
      "matrices": np.zeros((m, n, n)),
      "members": np.zeros((m, n), bool),
      "median": np.zeros((m, n)),
      "recorded": {k: np.zeros((m, n, n)) for k in record_metrics},
      "recorded_median": np.zeros((m, n)),
  }
  if config.attack_check:
    st["own"] = trainer.replicate(params, model_state, n)._asdict()
  return st


def _final_model_report(model, state, behaviour, ds, malicious) -> dict:
  params, _, model_state = state
  one = lambda t: jax.tree_util.tree_map(lambda a: a[None], t)
  acc = float(train_lib.evaluate(model, one(params), one(model_state),
                                 ds.x_test, ds.y_test)[0])
  worst, per = population_lib.client_asr(model, params, model_state, behaviour, ds,
                           malicious)
  return {"clean_accuracy": acc, "attack_success_rate": worst,
          "attack_success_rate_per_trigger": per}


def replay(matrices: list[np.ndarray], n: int, detector: str, *,
           alpha: float = 0.01, ks_margin: float = 10.0,
           krum_f: int | None = None,
           median_distances: list[np.ndarray] | None = None
           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Replays the client's sequential detection on recorded matrices.

  Same rule as `run`: after each replicated sub-run the detector sees the
  evidence pooled so far among the still-trusted providers, and flagged
  providers are excluded from then on. Returns (flags, flagged_at index of the
  replicated sub-run or -1, scores).
  """
  active = np.ones(n, bool)
  flagged_at = np.full(n, -1)
  scores = np.zeros(n)
  evidence = detect_lib.Evidence()
  med_ev: list[np.ndarray] = []
  for r, d in enumerate(matrices):
    if active.sum() < 2:
      break
    members = active.copy()
    evidence.add(d, members)
    if median_distances is not None:
      med_ev.append(median_distances[r])
    verdict = detect_lib.detect(detector, evidence, n, alpha=alpha,
                                krum_f=krum_f, ks_margin=ks_margin,
                                median_evidence=med_ev or None)
    scores[members] = np.asarray(verdict.scores)[members]
    new = verdict.flags & active
    flagged_at[new] = r
    active &= ~new
  return flagged_at >= 0, flagged_at, scores
