r"""Replication vs inspection (issue 18, items 3 and 4).

The same providers judged two ways. For every cell (dataset, case, seed) the
RTTD protocol runs for real (`jaxrep.protocol`: initial_state, subrun_step
per sub-run, evaluate; the config's default detector, `replica` on `l2`),
with half of the n providers malicious, each with its own backdoor (except
where a case says they collude). The protocol's attack check trains every
provider's own full run; those finished models are what a client that
outsources the whole run to one provider would receive, so the inspection
detectors (`jaxrep.detect.inspection`: neural_cleanse, max_margin, strip, at
their defaults, which are the papers' thresholds) judge exactly them. RTTD
judges the same providers (same behaviour, same keys) by replication.

Per cell it records TPR / FPR of RTTD and of each inspection detector, every
provider's clean accuracy and ASR (an attack that does not work proves
nothing), STRIP's separation AUROC (report only: needs the triggers), and
the client's compute: seconds per provider of each inspection detector
(wall time of the batched call / n; the first call in a process includes
compilation, so the table quotes medians over cells) against RTTD's extra
m * k * (n - 1) training steps, timed here as one warm all-n sub-run (k
steps) plus one distance matrix, so RTTD's seconds per provider are
m * (t_subrun + t_distances) / n.

Cases: every image attack (badnets, blend, label_flip, warp, scaling,
keyed_noise, secret_key, data_order) plus two where RTTD is expected to
fail: `collusion` (the malicious half share ONE BadNets backdoor, so the two
halves are symmetric in every distance) and `mimicry` (BadNets, but each
attacker returns only 1 % of its backdoor deviation plus benign-sized noise:
a perturbation at the scale of benign divergence). secret_key plants its key
into the hidden units of an MLP, so it runs with the MLP on every dataset
(CASE_MODELS; its row names the model when it is not the dataset's, and it
is left out of that dataset's cost rows). A cell recorded as not applicable
with another model than the case now uses is run again.

One JSON per cell in <out>/<dataset>/<case>/seed<S>.json (a finished cell
is skipped; a cell recorded with other settings is an error; with --fill, a
finished cell whose detector was skipped and is no longer skipped gets that
detector, and with --separation a cell with a trigger gets STRIP's separation
if it lacks it: the protocol is run again, must reproduce the recorded
providers exactly, and only what is missing runs on their models), and
<out>/table.md aggregated over every cell found under <out> (means with 95 %
t intervals over seeds; rates pooled over providers and seeds with Wilson
95 % intervals). Neural Cleanse's result for each model is kept under
<out>/cache/neural_cleanse and read back for the same model in another cell
(--nc_cache, on by default): a seed's benign providers are usually the
same models in every case (the hash decides), so a seed's later cells
reverse only their attackers.

    cd experiments
    python inspection.py --datasets=digits --out=../runs/inspection
    python inspection.py --datasets=fashion_mnist_idx --seeds=0 \
        --skip=fashion_mnist_idx:neural_cleanse --out=../runs/inspection
    python inspection.py --datasets=fashion_mnist_idx --cases=badnets \
        --seeds=0 --fill --out=../runs/inspection   # its Neural Cleanse
    python inspection.py --table_only --out=../runs/inspection

Bad flags exit with status 2 and one line, before anything trains.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags, logging
from scipy import stats

import _common
from jaxrep import cli, distances, population, protocol, report
from jaxrep.core import flops as flops_lib
from jaxrep.core import trees
from jaxrep.config import SimConfig
from jaxrep.core.errors import ConfigError
from jaxrep.detect import inspection as insp
from jaxrep.detect import metrics as metrics_lib
from jaxrep.protocol import loop
from jaxrep.protocol.results import evaluate
from jaxrep.report import results as report_results
from jaxrep.runtime import compilation
from jaxrep.protocol.steps import model_distances, subrun_step
from jaxrep.sweep import interval

ATTACKS = ("badnets", "blend", "label_flip", "warp", "scaling", "keyed_noise",
           "secret_key", "data_order")
# Cases where RTTD is expected to fail (issue 18 item 4): overrides of the
# config (attack defaults otherwise).
FAILURE_CASES = {
    "collusion": dict(attack="badnets", adaptive="collusion"),
    "mimicry": dict(attack="badnets", adaptive="mimicry"),
}
CASES = ATTACKS + tuple(FAILURE_CASES)
# Cases that need a model of their own: secret_key's planting is defined for
# an MLP's hidden units (`population.families.image.plant_key`).
CASE_MODELS = {"secret_key": "mlp"}
DETECTORS = ("neural_cleanse", "max_margin", "strip")
# Per dataset: model, run length T, sub-run length k, replicated sub-runs m
# and how many test images the protocol evaluates on (0: all). Chosen for
# the budget of a 2-core CPU (BUILD_NOTES "Replication vs inspection").
SETTINGS = {
    "digits": dict(model="mlp", steps=400, subrun_steps=20, replicated=5,
                   test_size=0),
    "fashion_mnist_idx": dict(model="cnn", steps=200, subrun_steps=20,
                              replicated=2, test_size=500),
}
# The inspection detectors' clean data: the first 180 test images (Neural
# Cleanse uses the first 64 of them), STRIP's overlays the next 179.
CLEAN, NC_CLEAN, OVERLAY = 180, 64, 179


def define_flags() -> None:
  """The script's flags. Defined only when it runs as a script: several
  names (providers, steps, out, ...) are also the main job's flags, and
  absl's flags are global to a process (tests import this module beside
  `jaxrep.simulate`)."""
  _common.define_list("datasets", ["digits", "fashion_mnist_idx"],
                      "datasets (digits: MLP, fashion_mnist_idx: CNN)",
                      choices=tuple(SETTINGS))
  _common.define_list("cases", list(CASES), "attacks and failure cases",
                      choices=CASES)
  _common.define_list("seeds", list(range(10)), "seeds", kind=int)
  _common.define_list("skip", [], "dataset:detector pairs not to run (their "
                      "cells record the detector as skipped)")
  flags.DEFINE_integer("providers", 8, "providers n")
  flags.DEFINE_integer("malicious", -1, "malicious providers (-1: n / 2)")
  flags.DEFINE_integer("steps", 0, "training steps T (0: the dataset's)")
  flags.DEFINE_integer("subrun_steps", 0, "steps k per sub-run (0: the "
                       "dataset's)")
  flags.DEFINE_integer("replicated", 0, "replicated sub-runs m (0: the "
                       "dataset's)")
  flags.DEFINE_string("out", "../runs/inspection", "output directory")
  flags.DEFINE_bool("separation", True, "also measure STRIP's separation "
                    "AUROC of triggered vs clean inputs (report only; costs "
                    "about twice STRIP itself)")
  flags.DEFINE_bool("probe_skipped", True, "time a skipped detector on one "
                    "provider in the dataset's first cell")
  flags.DEFINE_bool("fill", False, "run the detectors a finished cell "
                    "skipped (and --skip no longer skips), and STRIP's "
                    "separation if it lacks it and --separation is on, on "
                    "its providers")
  flags.DEFINE_bool("nc_cache", True, "keep each model's Neural Cleanse "
                    "result under <out>/cache/neural_cleanse and reuse it "
                    "for the same model in another cell (a seed's benign "
                    "providers are usually the same models in every case)")
  flags.DEFINE_string("compilation_cache", "", "directory of XLA's "
                      "persistent compilation cache ('': <out>/xla_cache; "
                      "'none': off); a cached program is the one XLA would "
                      "compile, so results are unchanged")
  flags.DEFINE_bool("table_only", False, "only (re)write the table from the "
                    "cells found in --out")
  flags.DEFINE_bool("flops", True, "count the client's FLOPs per provider "
                    "(by tracing, nothing runs) for the cost table")


# ----------------------------------------------------------------------------
# Settings and checks.


def settings(dataset: str, args) -> dict:
  """The protocol settings of a dataset with the flags' overrides."""
  s = dict(SETTINGS[dataset])
  for name in ("steps", "subrun_steps", "replicated"):
    if getattr(args, name):
      s[name] = getattr(args, name)
  s["providers"] = args.providers
  s["malicious"] = (args.providers // 2 if args.malicious == -1
                    else args.malicious)
  return s


def cell_config(dataset: str, case: str, seed: int, s: dict) -> SimConfig:
  """The simulation of one cell (everything else at the main job's
  defaults: replica detector on l2, rollback recovery, attack check on)."""
  overrides = dict(FAILURE_CASES.get(case, {}))
  attack = overrides.pop("attack", case)
  return SimConfig.from_flat(
      dataset=dataset, model=CASE_MODELS.get(case, s["model"]),
      attack=attack, seed=seed,
      providers=s["providers"], malicious=s["malicious"], steps=s["steps"],
      subrun_steps=s["subrun_steps"], replicated=s["replicated"],
      **overrides)


def parse_skip(pairs) -> set[tuple[str, str]]:
  out = set()
  for pair in pairs:
    dataset, _, detector = pair.partition(":")
    if dataset not in SETTINGS or detector not in DETECTORS:
      raise ConfigError(f"skip: {pair!r} is not dataset:detector with "
                        f"dataset in {', '.join(SETTINGS)} and detector in "
                        f"{', '.join(DETECTORS)}")
    out.add((dataset, detector))
  return out


def check_args(args) -> None:
  """Every flag error before anything trains (ConfigError naming it)."""
  if args.providers < 4:
    raise ConfigError(f"providers: must be >= 4, got {args.providers}")
  if not (args.malicious == -1 or 1 <= args.malicious < args.providers):
    raise ConfigError(f"malicious: must be -1 or in [1, {args.providers - 1}"
                      f"], got {args.malicious}")
  for name in ("steps", "subrun_steps", "replicated"):
    if getattr(args, name) < 0:
      raise ConfigError(f"{name}: must be >= 0, got {getattr(args, name)}")
  if not args.seeds or any(s < 0 for s in args.seeds):
    raise ConfigError(f"seeds: must be >= 0, got {args.seeds}")
  parse_skip(args.skip)
  for dataset in args.datasets:
    s = settings(dataset, args)
    for case in args.cases:
      protocol.validate(cell_config(dataset, case, args.seeds[0], s))


# ----------------------------------------------------------------------------
# Rates and intervals.


def wilson(hits: int, total: int, z: float = 1.959964) -> tuple[float, float,
                                                                  float]:
  """(rate, low, high): the Wilson score 95 % interval of hits / total
  (NaNs for total 0)."""
  if total <= 0:
    return math.nan, math.nan, math.nan
  p = hits / total
  d = 1 + z * z / total
  centre = (p + z * z / (2 * total)) / d
  half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / d
  return p, max(0.0, centre - half), min(1.0, centre + half)


def rates(flags_, malicious) -> dict:
  f, m = np.asarray(flags_, bool), np.asarray(malicious, bool)
  return {"tp": int((f & m).sum()), "malicious": int(m.sum()),
          "fp": int((f & ~m).sum()), "benign": int((~m).sum()),
          "tpr": metrics_lib.tpr(f, m), "fpr": metrics_lib.fpr(f, m)}


# ----------------------------------------------------------------------------
# One cell.


def _truncated(ds, test_size: int):
  if not test_size or test_size >= len(ds.y_test):
    return ds
  return dataclasses.replace(ds, x_test=ds.x_test[:test_size],
                             y_test=ds.y_test[:test_size])


def _timed(fn):
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def run_protocol(config: SimConfig, ds):
  """The RTTD protocol of `config` end to end, as `protocol.run` runs it
  (without checkpoints); returns (sim, final state, SimResult)."""
  config = protocol.validate(config)
  start = time.perf_counter()
  sim = loop.simulation(config, dataset=ds)
  state = protocol.initial_state(sim)
  returned = None
  while state.progress.next_subrun < sim.config.num_subruns:
    state, returned = subrun_step(sim, state, state.progress.next_subrun)
  result = evaluate(sim, state, returned, time.perf_counter() - start)
  return sim, state, result


def inspection_inputs(ds_full) -> tuple[np.ndarray, np.ndarray]:
  """(x_clean, x_overlay): the inspection detectors' clean test images and
  STRIP's overlays (see CLEAN, OVERLAY)."""
  x = np.asarray(ds_full.x_test)
  return x[:CLEAN], x[CLEAN:CLEAN + OVERLAY]


# ----------------------------------------------------------------------------
# Neural Cleanse per model, reused across cells.
#
# A seed's benign providers usually train the same models in every case
# (the same keys, stacks and data), and Neural Cleanse on the CNN costs
# about 4,000 provider-steps per model, so a model's result is kept in one
# file under <out>/cache/neural_cleanse named by a hash of everything it
# depends on: the model's own params and state (bytes, shapes, dtypes), the
# clean images, the key, the config, the source of the detector and of the
# models, and the jax version and backend. A provider's reversal does not
# depend on the other providers of its call (the same program runs on each
# model, in blocks on the provider axis), so a hit is that model's result.

NC_FIELDS = ("norms", "last_norms", "success")
_MODELS_DIR = os.path.join(os.path.dirname(os.path.dirname(insp.__file__)),
                           "models")
_NC_SOURCES = (insp.__file__,) + tuple(
    os.path.join(_MODELS_DIR, f) for f in sorted(os.listdir(_MODELS_DIR))
    if f.endswith(".py"))


def _digest(h, a) -> None:
  a = np.ascontiguousarray(np.asarray(a))
  h.update(f"{a.shape}{a.dtype.str};".encode())
  h.update(a.tobytes())


def nc_cache_names(model, params, model_state, x, key,
                   config: insp.NeuralCleanseConfig) -> list[str]:
  """One file name per provider of the population (`params`, `model_state`
  with leading provider axis n): the hash of its model and of the call."""
  common = hashlib.sha256()
  for path in _NC_SOURCES:
    with open(path, "rb") as fh:
      common.update(fh.read())
  common.update(f"{model.name}{tuple(model.input_shape)}{model.num_classes}"
                f"{config!r}{jax.__version__}{jax.default_backend()}"
                .encode())
  _digest(common, x)
  _digest(common, jax.random.key_data(key))
  # One host copy per leaf, then provider slices of it.
  leaves = [np.asarray(a) for a in
            jax.tree_util.tree_leaves((params, model_state))]
  names = []
  for i in range(leaves[0].shape[0]):
    h = common.copy()
    for leaf in leaves:
      _digest(h, leaf[i])
    names.append(h.hexdigest() + ".npz")
  return names


def cached_neural_cleanse(model, params, model_state, x, key, cache: str,
                          config: insp.NeuralCleanseConfig =
                          insp.NeuralCleanseConfig()
                          ) -> tuple[insp.Inspection, np.ndarray]:
  """`insp.neural_cleanse` on the providers whose model has no file in
  `cache`, the others read from it; returns (the n providers' Inspection,
  bool [n]: read from the cache). New results are written (atomically)."""
  names = nc_cache_names(model, params, model_state, x, key, config)
  paths = [os.path.join(cache, name) for name in names]
  hit = np.array([os.path.exists(p) for p in paths])
  rows = [None] * len(paths)
  for i in np.flatnonzero(hit):
    try:
      with np.load(paths[i]) as f:
        rows[i] = {k: f[k] for k in NC_FIELDS + ("score", "classes")}
    except (OSError, ValueError, KeyError) as e:
      raise ConfigError(f"nc_cache: {paths[i]} is not a Neural Cleanse "
                        f"result ({e}); delete it or run with "
                        "--nonc_cache") from e
  todo = np.flatnonzero(~hit)
  if todo.size:
    res = insp.neural_cleanse(model, trees.take(params, todo),
                              trees.take(model_state, todo), x, key,
                              config=config)
    os.makedirs(cache, exist_ok=True)
    for j, i in enumerate(todo):
      rows[i] = dict({k: np.asarray(res.details[k][j]) for k in NC_FIELDS},
                     score=np.asarray(res.scores[j]),
                     classes=np.asarray(res.details["classes"]))
      tmp = f"{paths[i]}.{os.getpid()}.tmp.npz"
      np.savez(tmp, **rows[i])
      os.replace(tmp, paths[i])
  scores = np.array([float(r["score"]) for r in rows], np.float64)
  details = {k: np.stack([r[k] for r in rows]) for k in NC_FIELDS}
  details["classes"] = rows[0]["classes"]
  return insp.Inspection("neural_cleanse", scores,
                         scores > config.threshold, float(config.threshold),
                         details), hit


def inspect(sim, own, ds_full, seed: int, skip=(),
            probe_skipped: bool = False, separation: bool = True,
            cache: str | None = None) -> dict:
  """Every inspection detector on the providers' finished models `own`,
  timed, plus STRIP's separation (report only). A detector in `skip` is not
  run, except (probe_skipped) on one provider to time it. With `cache` (a
  directory), Neural Cleanse reuses the results of models it has seen
  (`cached_neural_cleanse`); its seconds per provider are then per model
  it ran on."""
  model, n = sim.model, sim.n
  p, s = own.params, own.model_state
  x_clean, x_overlay = inspection_inputs(ds_full)
  key = jax.random.fold_in(jax.random.key(seed), 18)
  from_cache = np.zeros(n, bool)

  def neural_cleanse():
    nonlocal from_cache
    if cache is None:
      return insp.neural_cleanse(model, p, s, x_clean[:NC_CLEAN], key)
    res, from_cache = cached_neural_cleanse(model, p, s, x_clean[:NC_CLEAN],
                                            key, cache)
    return res

  calls = {
      "neural_cleanse": neural_cleanse,
      "max_margin": lambda: insp.max_margin(model, p, s, key),
      "strip": lambda: insp.strip(model, p, s, x_clean, x_overlay, key)}
  plain = sim.behaviour.plain
  mal = np.asarray(sim.behaviour.malicious)
  target = np.asarray(plain.target)
  out = {}
  for name in DETECTORS:
    if name in skip:
      out[name] = {"skipped": True}
      if probe_skipped:
        # Its cost on ONE provider (the first attacker), for the cost table.
        i = int(np.flatnonzero(mal)[0])
        one = lambda t: jax.tree_util.tree_map(lambda a: a[i:i + 1], t)
        p1, s1 = one(p), one(s)
        fn = {"neural_cleanse": lambda: insp.neural_cleanse(
                  model, p1, s1, x_clean[:NC_CLEAN], key),
              "max_margin": lambda: insp.max_margin(model, p1, s1, key),
              "strip": lambda: insp.strip(model, p1, s1, x_clean, x_overlay,
                                          key)}[name]
        res, seconds = _timed(fn)
        out[name]["probe"] = dict(provider=i, seconds_per_provider=seconds,
                                  score=float(res.scores[0]),
                                  flag=bool(res.flags[0]))
      continue
    res, seconds = _timed(calls[name])
    row = dict(rates(res.flags, mal), scores=res.scores, flags=res.flags,
               threshold=res.threshold, seconds=seconds,
               seconds_per_provider=seconds / n)
    if name == "neural_cleanse":
      classes = res.details["classes"]
      row["smallest_mask_class"] = classes[np.argmin(res.details["norms"], 1)]
      if cache is not None:
        # Timed on the models it ran on; none: no timing.
        ran = n - int(from_cache.sum())
        row["from_cache"] = from_cache
        row["seconds_per_provider"] = seconds / ran if ran else None
    elif name == "max_margin":
      row["largest_margin_class"] = res.details["top_class"]
    if "smallest_mask_class" in row or "largest_margin_class" in row:
      found = row.get("smallest_mask_class", row.get("largest_margin_class"))
      row["finds_target"] = [bool(found[i] == target[i]) if mal[i] else None
                             for i in range(n)]
    out[name] = row
  no_trigger = np.any([np.asarray(plain.is_attack(a)) for a in NO_TRIGGER],
                      axis=0)
  has_trigger = not bool(no_trigger[mal].any())
  if has_trigger and separation:
    trig = jax.vmap(population.IMAGE.trigger_for(plain),
                    in_axes=(0, None, None))(plain, key, jnp.asarray(x_clean))
    sep = insp.strip_separation(model, p, s, x_clean, np.asarray(trig),
                                x_overlay, key)
    out[SEPARATION] = {"auroc": sep["auroc"], "tpr": sep["tpr"],
                               "frr": sep["frr"]}
  return out


def rttd_cost(sim, state) -> dict:
  """RTTD's extra compute, timed warm: one all-n sub-run of k steps (the
  program the protocol compiled) and one distance matrix of the detection
  metric."""
  n, k = sim.n, sim.config.protocol.subrun_steps
  m = sim.config.protocol.replicated
  run = lambda: sim.train_providers(state.own, sim.schedule(0), sim.keys(0),
                                    sim.subrun_behaviour(0))[0]
  jax.block_until_ready(run())
  _, t_train = _timed(run)
  metric = sim.config.detector.metric
  dist = lambda: model_distances(sim, metric, state.client.params, state.own,
                                 jax.random.key(0))
  dist()
  _, t_dist = _timed(dist)
  return {"subrun_seconds": t_train, "distance_seconds": t_dist,
          "seconds_per_provider_step": t_train / (n * k),
          "extra_steps": m * k * (n - 1),
          "rttd_seconds_per_provider": m * (t_train + t_dist) / n}


def dataset_flops(dataset: str, s: dict, ds_full) -> dict:
  """The client's compute per provider in FLOPs (`jaxrep.core.flops`:
  counted by tracing, loops by their trip counts, nothing runs), for the
  cost table: one provider-step of training, RTTD's m * (one all-n sub-run +
  one distance matrix) / n, and each inspection detector on one provider's
  model with the inputs `inspect` gives it. Shapes only: the same for every
  case and seed of a dataset (a badnets cell's simulation is built)."""
  config = protocol.validate(cell_config(dataset, "badnets", 0, s))
  sim = loop.simulation(config, dataset=_truncated(ds_full, s["test_size"]))
  state = protocol.initial_state(sim)
  n, k = sim.n, sim.config.protocol.subrun_steps
  m = sim.config.protocol.replicated
  train = flops_lib.count_flops(
      lambda *a: sim.trainer.sub_run(*a)[0], state.own, sim.x_train,
      sim.y_train, sim.schedule(0), sim.keys(0), sim.divergence,
      sim.subrun_behaviour(0))
  dist = flops_lib.count_flops(
      lambda c, p, st: distances.distance_matrix(
          sim.config.detector.metric, sim.model.predict, c, p, st,
          sim.probe_x, jax.random.key(0)),
      state.client.params, state.own.params, state.own.model_state)
  x_clean, x_overlay = inspection_inputs(ds_full)
  p, st = state.own.params, state.own.model_state
  out = {"provider_step": train / (n * k),
         "rttd": m * (train + dist) / n,
         "neural_cleanse": insp.flops_per_provider(
             "neural_cleanse", sim.model, p, st, x_clean=x_clean[:NC_CLEAN]),
         "max_margin": insp.flops_per_provider("max_margin", sim.model, p,
                                               st),
         "strip": insp.flops_per_provider("strip", sim.model, p, st,
                                          x_clean=x_clean,
                                          x_overlay=x_overlay)}
  return {name: float(v) for name, v in out.items()}


def run_cell(dataset: str, case: str, seed: int, s: dict, ds_full,
             skip=(), probe_skipped: bool = False,
             separation: bool = True, cache: str | None = None) -> dict:
  """One cell: the protocol, the inspection detectors (`cache`: see
  `inspect`), the costs."""
  t0 = time.perf_counter()
  config = cell_config(dataset, case, seed, s)
  base = dict(dataset=dataset, case=case, seed=seed, settings=s,
              config=config.flat())
  ds = _truncated(ds_full, s["test_size"])
  try:
    sim, state, result = run_protocol(config, ds)
  except ConfigError as e:
    if case != "secret_key":
      raise
    return dict(base, not_applicable=str(e))
  mal = np.asarray(result.malicious, bool)
  summary = result.summary()
  cell = dict(
      base, malicious=mal, attack_names=result.attack_names,
      clean_accuracy=result.clean_accuracy,
      attack_success_rate=result.attack_success_rate,
      rttd=dict(rates(result.flags, mal), flags=result.flags,
                scores=result.scores, flagged_at=result.flagged_at,
                detector=f"{config.detector.name} on {config.detector.metric}",
                client_clean_accuracy=summary["final_clean_accuracy"],
                client_asr=summary["final_attack_success_rate"],
                no_defense_clean_accuracy=summary["no_defense_clean_accuracy"],
                no_defense_asr=summary["no_defense_attack_success_rate"],
                replication_steps=summary["overhead_replication_steps"],
                reexecution_steps=summary["overhead_reexecution_steps"],
                protocol_seconds=result.wall_seconds),
      inspection=inspect(sim, state.own, ds_full, seed, skip, probe_skipped,
                         separation and "strip" not in skip, cache),
      cost=rttd_cost(sim, state))
  cell["seconds"] = time.perf_counter() - t0
  cell["load_average"] = os.getloadavg()
  return cell


# Attacks without a trigger: STRIP's separation does not apply to them.
NO_TRIGGER = ("label_flip", "data_order")
SEPARATION = "strip_separation"


def stale(cell: dict, dataset: str, case: str, seed: int, s: dict) -> bool:
  """Whether a finished cell is to be run again: it was recorded as not
  applicable with another model than the case now runs with (CASE_MODELS)."""
  return ("not_applicable" in cell and cell["config"].get("model")
          != cell_config(dataset, case, seed, s).flat()["model"])


def missing_detectors(cell: dict, skipped, separation: bool = False
                      ) -> list[str]:
  """The detectors `cell` recorded as skipped that are not in `skipped`,
  and (`separation`) SEPARATION if the cell has a trigger, kept STRIP and
  lacks it."""
  if "not_applicable" in cell:
    return []
  found = cell["inspection"]
  out = [d for d in DETECTORS
         if found.get(d, {}).get("skipped") and d not in skipped]
  has_trigger = not any(name in NO_TRIGGER for name in cell["attack_names"])
  if (separation and has_trigger and SEPARATION not in found
      and "strip" not in skipped):
    out.append(SEPARATION)
  return out


# What the protocol must reproduce for a filled cell to judge the same
# providers: the recorded providers' own models enter through these.
REPRODUCED = ("malicious", "attack_success_rate", "clean_accuracy")


def fill_cell(cell: dict, ds_full, detectors: list[str],
              cache: str | None = None) -> dict:
  """`cell` with `detectors` run on its providers' models: the protocol is
  run again (deterministic) and must give the recorded providers (their
  ASR, clean accuracy and RTTD flags and scores, exactly), else
  ConfigError; the cell's other numbers are kept (`cache`: see
  `inspect`)."""
  t0 = time.perf_counter()
  s = cell["settings"]
  config = cell_config(cell["dataset"], cell["case"], cell["seed"], s)
  sim, state, result = run_protocol(config, _truncated(ds_full,
                                                       s["test_size"]))
  now = report_results.clean(dict(
      malicious=np.asarray(result.malicious, bool),
      attack_success_rate=result.attack_success_rate,
      clean_accuracy=result.clean_accuracy,
      rttd=dict(flags=result.flags, scores=result.scores)))
  where = (f"{cell['dataset']} {cell['case']} seed {cell['seed']} (recorded "
           f"at commit {str(cell.get('commit'))[:8]})")
  pairs = [(name, now[name], cell[name]) for name in REPRODUCED] + [
      (f"RTTD {name}", now["rttd"][name], cell["rttd"][name])
      for name in ("flags", "scores")]
  for name, a, b in pairs:
    if not np.array_equal(np.asarray(a, float), np.asarray(b, float),
                          equal_nan=True):
      raise ConfigError(f"fill: {where}: the protocol no longer reproduces "
                        f"the recorded {name}; run the cell in a new --out")
  others = set(DETECTORS) - set(detectors)
  found = inspect(sim, state.own, ds_full, cell["seed"], others,
                  separation=SEPARATION in detectors, cache=cache)
  out = dict(cell, inspection=dict(cell["inspection"]))
  for name in detectors:
    out["inspection"][name] = found[name]
  out["filled"] = list(cell.get("filled", [])) + [dict(
      detectors=detectors, seconds=time.perf_counter() - t0,
      load_average=os.getloadavg(), commit=_commit(),
      command=" ".join(sys.argv))]
  return out


# ----------------------------------------------------------------------------
# Table.


def _pct(r) -> str:
  rate, low, high = r
  if math.isnan(rate):
    return "-"
  return f"{100 * rate:.0f} [{100 * low:.0f}, {100 * high:.0f}]"


def _mean(values, scale=100.0, digits=1) -> str:
  mean, low, high, count = interval(values)
  if count == 0:
    return "-"
  if count == 1 or math.isnan(low):
    return f"{scale * mean:.{digits}f}"
  return f"{scale * mean:.{digits}f} ± {scale * (high - low) / 2:.{digits}f}"


def aggregate(cells: list[dict]) -> list[dict]:
  """Rows of the table, one per (dataset, case) in CASES order: pooled
  rates with Wilson intervals, means over seeds, median seconds."""
  rows = []
  datasets = sorted({c["dataset"] for c in cells},
                    key=lambda d: list(SETTINGS).index(d)
                    if d in SETTINGS else 99)
  for dataset in datasets:
    for case in CASES:
      group = [c for c in cells if c["dataset"] == dataset
               and c["case"] == case]
      if not group:
        # No row is left out: a case without cells says so.
        rows.append({"dataset": dataset, "case": case, "seeds": [],
                     "not_run": True})
        continue
      row = {"dataset": dataset, "case": case,
             "seeds": sorted(c["seed"] for c in group)}
      # A case with a model of its own (CASE_MODELS) on this dataset.
      models = {c["config"]["model"] for c in group if "config" in c} - {
          c["settings"]["model"] for c in group if "settings" in c}
      if models:
        row["model"] = ", ".join(sorted(models))
      na = [c for c in group if "not_applicable" in c]
      if na:
        row["not_applicable"] = na[0]["not_applicable"]
        rows.append(row)
        continue
      mal = [np.asarray(c["malicious"], bool) for c in group]
      asr = [np.asarray(c["attack_success_rate"], float) for c in group]
      acc = [np.asarray(c["clean_accuracy"], float) for c in group]
      row["attacker_asr"] = [float(a[m].mean()) for a, m in zip(asr, mal)]
      row["attacker_asr_min"] = float(min(a[m].min() for a, m in
                                          zip(asr, mal)))
      row["attacker_acc"] = [float(a[m].mean()) for a, m in zip(acc, mal)]
      row["benign_acc"] = [float(a[~m].mean()) for a, m in zip(acc, mal)]
      row["client_asr"] = [c["rttd"]["client_asr"] for c in group]
      row["no_defense_asr"] = [c["rttd"]["no_defense_asr"] for c in group]
      for name in ("rttd",) + DETECTORS:
        parts = [c["rttd"] if name == "rttd" else c["inspection"][name]
                 for c in group]
        probes = [p["probe"]["seconds_per_provider"] for p in parts
                  if "probe" in p]
        if probes:
          row.setdefault("probes", {})[name] = float(np.median(probes))
        # Pooled over the cells where the detector ran (a detector too
        # costly for every seed may have run on some: the table says on
        # how many).
        parts = [p for p in parts if not p.get("skipped")]
        if not parts:
          row[name] = None
          continue
        tp, pos = sum(p["tp"] for p in parts), sum(p["malicious"] for p in
                                                   parts)
        fp, neg = sum(p["fp"] for p in parts), sum(p["benign"] for p in parts)
        row[name] = {"tpr": wilson(tp, pos), "fpr": wilson(fp, neg),
                     "counts": (tp, pos, fp, neg), "seeds": len(parts)}
        if name != "rttd":
          timed = [p["seconds_per_provider"] for p in parts
                   if p["seconds_per_provider"] is not None]
          row[name]["seconds_per_provider"] = (float(np.median(timed))
                                               if timed else math.nan)
      row["rttd_seconds_per_provider"] = float(np.median(
          [c["cost"]["rttd_seconds_per_provider"] for c in group]))
      row["seconds_per_provider_step"] = float(np.median(
          [c["cost"]["seconds_per_provider_step"] for c in group]))
      row["extra_steps"] = group[0]["cost"]["extra_steps"]
      seps = [np.asarray(c["inspection"][SEPARATION]["auroc"])[m]
              for c, m in zip(group, mal)
              if SEPARATION in c["inspection"]]
      row["strip_auroc"] = [float(a.mean()) for a in seps]
      rows.append(row)
  return rows


def markdown(rows: list[dict], flops: dict | None = None) -> str:
  """The detection table and the cost tables (markdown): seconds, and, for
  the datasets in `flops` (`dataset_flops` by dataset), FLOPs."""
  lines = ["| dataset | case | seeds | attackers' ASR (min) | attackers' / "
           "benign clean acc | RTTD TPR / FPR | Neural Cleanse TPR / FPR | "
           "MM-BD TPR / FPR | STRIP TPR / FPR (separation AUROC) | client "
           "ASR with RTTD / without |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    name = r["case"] + (f" ({r['model']})" if "model" in r else "")
    seeds = len(r["seeds"])
    if r.get("not_run"):
      lines.append(f"| {r['dataset']} | {name} | 0 | not run (no cell in "
                   "this output) |  |  |  |  |  |  |")
      continue
    if "not_applicable" in r:
      lines.append(f"| {r['dataset']} | {name} | {seeds} | not applicable: "
                   f"{r['not_applicable']} |  |  |  |  |  |  |")
      continue

    def rate(d):
      if r[d] is None:
        return "not run (cost, below)"
      partial = (f" ({r[d]['seeds']} of {seeds} seeds)"
                 if r[d]["seeds"] < seeds else "")
      return f"{_pct(r[d]['tpr'])} / {_pct(r[d]['fpr'])}{partial}"

    measured = len(r["strip_auroc"])
    auroc = (f" ({_mean(r['strip_auroc'], 1, 2)}"
             + (f"; {measured} of {seeds} seeds" if measured < seeds else "")
             + ")" if measured
             else " (no trigger)" if r["case"] in NO_TRIGGER
             else " (not measured)")
    lines.append(
        f"| {r['dataset']} | {name} | {seeds} | "
        f"{_mean(r['attacker_asr'])} ({100 * r['attacker_asr_min']:.0f}) | "
        f"{_mean(r['attacker_acc'])} / {_mean(r['benign_acc'])} | "
        f"{rate('rttd')} | {rate('neural_cleanse')} | {rate('max_margin')} | "
        f"{rate('strip')}{auroc} | "
        f"{_mean(r['client_asr'])} / {_mean(r['no_defense_asr'])} |")
  lines += ["", "| dataset | RTTD extra steps m·k·(n−1) | RTTD s / provider | "
            "Neural Cleanse s / provider | MM-BD s / provider | STRIP s / "
            "provider | one provider-step (ms) |", "|---|---|---|---|---|---|---|"]
  for dataset in dict.fromkeys(r["dataset"] for r in rows):
    group = [r for r in rows if r["dataset"] == dataset and "model" not in r
             and "not_applicable" not in r and not r.get("not_run")]
    if not group:
      continue
    step = float(np.median([r["seconds_per_provider_step"] for r in group]))

    def cost(name):
      vals = [r[name]["seconds_per_provider"] for r in group
              if r[name] is not None
              and not math.isnan(r[name]["seconds_per_provider"])]
      if not vals:
        probes = [r["probes"][name] for r in group
                  if name in r.get("probes", {})]
        if not probes:
          return "not run"
        t = float(np.median(probes))
        return f"{t:.2f} (= {t / step:,.0f} steps; one provider, timed only)"
      t = float(np.median(vals))
      return f"{t:.2f} (= {t / step:,.0f} steps)"

    rttd = float(np.median([r["rttd_seconds_per_provider"] for r in group]))
    lines.append(f"| {dataset} | {group[0]['extra_steps']} | {rttd:.2f} "
                 f"(= {rttd / step:,.0f} steps) | {cost('neural_cleanse')} | "
                 f"{cost('max_margin')} | {cost('strip')} | "
                 f"{1e3 * step:.2f} |")
  if flops:
    lines += ["", "| dataset | one provider-step (MFLOP) | RTTD GFLOP / "
              "provider | Neural Cleanse GFLOP / provider | MM-BD GFLOP / "
              "provider | STRIP GFLOP / provider |", "|---|---|---|---|---|---|"]
    for dataset, f in flops.items():
      step = f["provider_step"]
      cells = [f"{f[name] / 1e9:,.2f} (= {f[name] / step:,.0f} steps)"
               for name in ("rttd",) + DETECTORS]
      lines.append(f"| {dataset} | {step / 1e6:,.1f} | " + " | ".join(cells)
                   + " |")
  lines += ["", "Rates in % pooled over providers and seeds, [Wilson 95 % "
            "interval]; ASR, accuracy and AUROC: mean ± half-width of the "
            "95 % t interval over seeds (ASR and accuracy in %). Seconds: "
            "median over cells of wall time / n (one batched call per "
            "detector; RTTD: m·(one all-n sub-run + one distance matrix) / "
            "n), and in training provider-steps of the same model."
            + (" FLOPs: counted from the programs' traces (jaxrep.core."
               "flops: loops by their trip counts, padding counted), per "
               "provider at the same settings, and in provider-steps by "
               "FLOPs." if flops else "")]
  return "\n".join(lines) + "\n"


def load_cells(out: str) -> list[dict]:
  import json  # pylint: disable=g-import-not-at-top
  cells = []
  for root, _, files in os.walk(out):
    for f in sorted(files):
      if f.startswith("seed") and f.endswith(".json"):
        with open(os.path.join(root, f)) as fh:
          cells.append(json.load(fh))
  return cells


# ----------------------------------------------------------------------------
# Main.


def cell_path(out: str, dataset: str, case: str, seed: int) -> str:
  return os.path.join(out, dataset, case, f"seed{seed}.json")


def _counts(name: str, row: dict) -> str:
  """A detector's verdicts in a progress line: name TP/P FP/N (STRIP's
  separation: its AUROC per provider)."""
  if name == SEPARATION:
    return f"{name} AUROC {np.round(row['auroc'], 2).tolist()}"
  return (f"{name} {row['tp']}/{row['malicious']} {row['fp']}/"
          f"{row['benign']}")


def _commit() -> str | None:
  try:
    return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True,
                          cwd=os.path.dirname(os.path.abspath(__file__))
                          ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None


def main(args) -> None:
  import json  # pylint: disable=g-import-not-at-top
  check_args(args)
  skip = parse_skip(args.skip)
  cache = (os.path.join(args.out, "cache", "neural_cleanse")
           if args.nc_cache else None)
  if not args.table_only:
    if args.compilation_cache != "none":
      compilation.enable_cache(args.compilation_cache
                               or os.path.join(args.out, "xla_cache"))
    commit, t0 = _commit(), time.time()
    todo = [(d, c, s) for d in args.datasets for c in args.cases
            for s in args.seeds]
    loaded, probed = {}, set()

    def dataset_of(name: str):
      if name not in loaded:
        loaded[name] = protocol.load(SimConfig.from_flat(dataset=name))
      return loaded[name]

    for i, (dataset, case, seed) in enumerate(todo, 1):
      path = cell_path(args.out, dataset, case, seed)
      st = settings(dataset, args)
      skipped = {det for d, det in skip if d == dataset}
      if os.path.exists(path):
        with open(path) as fh:
          old = json.load(fh)
        if old["settings"] != st:
          raise ConfigError(f"out: {path} was run with {old['settings']}, "
                            f"not {st}; use another --out")
      if os.path.exists(path) and not stale(old, dataset, case, seed, st):
        missing = missing_detectors(old, skipped, args.separation)
        if args.fill and missing:
          cell = fill_cell(old, dataset_of(dataset), missing, cache)
          report.write_json_atomic(path, report_results.clean(cell))
          found = ", ".join(_counts(n, cell["inspection"][n])
                            for n in missing)
          print(f"[{i}/{len(todo)}] {dataset} {case} seed {seed}: filled "
                f"{found} (TP/P FP/N); {cell['filled'][-1]['seconds']:.0f} "
                f"s ({time.time() - t0:.0f} s in all)", file=sys.stderr,
                flush=True)
          continue
        print(f"[{i}/{len(todo)}] {dataset} {case} seed {seed}: done "
              "before, skipped", file=sys.stderr, flush=True)
        continue
      # A skipped detector is timed on one provider in the dataset's first
      # cell of this invocation.
      probe = (args.probe_skipped and bool(skipped)
               and dataset not in probed)
      cell = run_cell(dataset, case, seed, st, dataset_of(dataset), skipped,
                      probe, args.separation, cache)
      if probe and "not_applicable" not in cell:
        probed.add(dataset)
      cell.update(commit=commit, versions=report.versions(),
                  command=" ".join(sys.argv))
      report.write_json_atomic(path, report_results.clean(cell))
      if "not_applicable" in cell:
        msg = f"not applicable ({cell['not_applicable']})"
      else:
        inspected = ", ".join(_counts(n, v) for n, v in
                              cell["inspection"].items() if "tp" in v)
        msg = (f"ASR {100 * np.mean(cell['attack_success_rate'][cell['malicious']]):.0f} %"
               f"; TP/P FP/N: rttd {cell['rttd']['tp']}/"
               f"{cell['rttd']['malicious']} {cell['rttd']['fp']}/"
               f"{cell['rttd']['benign']}, {inspected}; "
               f"{cell['seconds']:.0f} s, load "
               f"{cell['load_average'][0]:.1f}")
      print(f"[{i}/{len(todo)}] {dataset} {case} seed {seed}: {msg} "
            f"({time.time() - t0:.0f} s in all)", file=sys.stderr, flush=True)
  cells = load_cells(args.out)
  if not cells:
    raise ConfigError(f"out: no cells under {args.out}")
  flops = None
  if args.flops:
    flops = {}
    for dataset in [d for d in SETTINGS if any(c["dataset"] == d
                                                for c in cells)]:
      s = settings(dataset, args)
      if not any(c["dataset"] == dataset and c["settings"] == s
                 for c in cells):
        print(f"{dataset}: no cell at the flags' settings {s}; no FLOP "
              "count", file=sys.stderr)
        continue
      flops[dataset] = dataset_flops(dataset, s, protocol.load(
          SimConfig.from_flat(dataset=dataset)))
  table = markdown(aggregate(cells), flops)
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "table.md"), "w") as fh:
    fh.write(table)
  print(table)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  define_flags()
  argv = cli.parse_flags(sys.argv)
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; every option is a --flag")
  try:
    main(_common.script_args())
  except ConfigError as e:
    cli.fail(str(e).splitlines()[0])
