r"""Benign distance between hardware profiles, next to a backdoor's distance.

For each setting (digits/MLP, Fashion-MNIST/CNN, fortunes/text-CNN) and seed:

1. Pre-training: `--pretrain` sub-runs of k steps in float32 (all providers
   fp32, the attacker's model discarded); the checkpoint is a benign
   provider's model, optimizer and model state (RTTD replicates sub-runs
   mid-training, not from a random init).
2. One sub-run (the next one: new batches, new keys) from that checkpoint,
   replicated twice:
   * all benign under mixed stacks: `--per_profile` providers per profile
     (fp32, tf32, bf16), each with its own reduction order;
   * all fp32: one attacker (badnets for images, phrase for text, the CLI's
     other defaults) and `--benign` benign providers.
3. Distances in parameter space, relative to the update norm of the
   sub-run: ||theta_i - theta_j|| / median_i ||theta_end_i - theta_start||
   (median over the benign providers of that replication), in float64.

Printed: a markdown table, per setting, of the median (and min - max) of
that ratio over every pair of the pair type and every seed.

    python experiments/stack_divergence.py --seeds=0,1,2
    python experiments/stack_divergence.py --settings=digits --seeds=0 \
        --pretrain=2          # smoke run
"""

from __future__ import annotations

import itertools
import json

import jax
import numpy as np
from absl import flags

import _common
from jaxrep import protocol
from jaxrep.config import SimConfig
from jaxrep.population import divergence as div_lib
from jaxrep.runtime import compilation
from jaxrep.train import trainer as train_lib

SETTINGS = {
    "digits": dict(dataset="digits", model="mlp", attack="badnets"),
    "fashion": dict(dataset="fashion_mnist_idx", model="cnn",
                    attack="badnets", max_train=20000),
    "fortunes": dict(dataset="fortunes", model="text_cnn", attack="phrase"),
}
PROFILES = tuple(div_lib.PROFILES)

_common.define_list("settings", ",".join(SETTINGS), "settings to run",
                    choices=tuple(SETTINGS))
_common.define_list("seeds", "0,1,2", "seeds of the runs", kind=int)
flags.DEFINE_integer("per_profile", 2, "benign providers per profile")
flags.DEFINE_integer("benign", 2, "benign fp32 providers beside the attacker")
flags.DEFINE_integer("subrun_steps", 20, "steps k of the measured sub-run")
flags.DEFINE_integer("pretrain", 5, "float32 sub-runs before the measured one")
flags.DEFINE_string("json", None, "write every ratio and the table here")
flags.DEFINE_string("cache", "/tmp/jaxrep_xla_cache",
                    "XLA persistent compilation cache (seeds share programs)")


def _config(setting: dict, seed: int, n: int, malicious: int, stacks: str,
            args) -> SimConfig:
  k = args.subrun_steps
  return SimConfig.from_flat(
      dataset=setting["dataset"], model=setting["model"],
      attack=setting["attack"], max_train=setting.get("max_train", 0),
      providers=n, malicious=malicious, stacks=stacks, seed=seed,
      subrun_steps=k, steps=k * (args.pretrain + 1), replicated=1)


def _sub_run(sim, pop, s: int):
  return sim.trainer.sub_run(pop, sim.x_train, sim.y_train, sim.schedule(s),
                             sim.keys(s), sim.divergence,
                             sim.subrun_behaviour(s))[0]


def _flat(tree) -> np.ndarray:
  return np.asarray(train_lib.flatten_population(tree), np.float64)


def _replicate(sim, checkpoint, s: int):
  """Every provider of `sim` trains sub-run s from `checkpoint`; returns
  (start, end) parameter matrices [n, P] in float64."""
  params, opt_state, model_state = checkpoint
  pop = sim.trainer.replicate(params, model_state, sim.n, opt_state=opt_state)
  end = _sub_run(sim, pop, s)
  return _flat(pop.params), _flat(end.params)


def measure(name: str, seed: int, args, dataset=None) -> dict:
  """Ratios of one setting and seed: {pair type: [ratio, ...]}."""
  setting = SETTINGS[name]
  attack_sim = protocol.setup(
      _config(setting, seed, args.benign + 1, 1, "fp32:1", args),
      dataset=dataset)
  ds = attack_sim.dataset
  mixed_sim = protocol.setup(
      _config(setting, seed, args.per_profile * len(PROFILES), 0,
              ",".join(f"{p}:1/{len(PROFILES)}" for p in PROFILES), args),
      dataset=ds)
  # Pre-training in float32; the checkpoint is a benign provider's state.
  init = protocol.initial_state(attack_sim).client
  pop = attack_sim.trainer.replicate(init.params, init.model_state,
                                     attack_sim.n, opt_state=init.opt_state)
  for s in range(args.pretrain):
    pop = _sub_run(attack_sim, pop, s)
  mal = np.asarray(attack_sim.behaviour.malicious, bool)
  b = int(np.flatnonzero(~mal)[0])
  checkpoint = jax.tree_util.tree_map(lambda a: a[b], tuple(pop))
  s = args.pretrain
  ratios: dict[str, list[float]] = {}

  start, end = _replicate(mixed_sim, checkpoint, s)
  u = end - start
  norm = float(np.median(np.linalg.norm(u, axis=1)))
  names = div_lib.provider_stacks(mixed_sim.config.divergence, mixed_sim.n,
                                  seed)
  for i, j in itertools.combinations(range(mixed_sim.n), 2):
    pair = "-".join(sorted((names[i], names[j]), key=PROFILES.index))
    ratios.setdefault(pair, []).append(
        float(np.linalg.norm(end[i] - end[j])) / norm)

  start, end = _replicate(attack_sim, checkpoint, s)
  u = end - start
  norm = float(np.median(np.linalg.norm(u[~mal], axis=1)))
  attack = attack_sim.config.attack.name
  for i, j in itertools.combinations(range(attack_sim.n), 2):
    if mal[i] or mal[j]:
      pair = f"{attack} attacker-fp32 (backdoor)"
    else:
      pair = "fp32-fp32 (attack run)"
    ratios.setdefault(pair, []).append(
        float(np.linalg.norm(end[i] - end[j])) / norm)
  return ratios, ds


def table(results: dict) -> str:
  """Markdown: one row per pair type, one column per setting."""
  settings = list(results)
  pairs = []
  for r in results.values():
    pairs += [p for p in r if p not in pairs]
  order = [f"{a}-{b}" for a, b in itertools.combinations_with_replacement(
      PROFILES, 2)]
  pairs = ([p for p in order if p in pairs]
           + [p for p in pairs if p not in order])
  head = "| pair | " + " | ".join(settings) + " |"
  lines = [head, "|" + "---|" * (len(settings) + 1)]
  for p in pairs:
    cells = []
    for s in settings:
      v = results[s].get(p)
      cells.append("-" if not v else
                   f"{np.median(v):.2e} ({min(v):.1e} - {max(v):.1e}, "
                   f"{len(v)})")
    lines.append(f"| {p} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main():
  args = _common.script_args()
  compilation.enable_cache(args.cache)
  results = {}
  for name in args.settings:
    merged: dict[str, list[float]] = {}
    ds = None
    for seed in args.seeds:
      ratios, ds = measure(name, seed, args, dataset=ds)
      for pair, v in ratios.items():
        merged.setdefault(pair, []).extend(v)
      print(f"{name} seed {seed}: " + ", ".join(
          f"{p} {np.median(v):.2e}" for p, v in ratios.items()), flush=True)
    results[name] = merged
  print()
  print("||theta_i - theta_j|| / median update norm of the sub-run: median "
        "(min - max, number of pairs) over pairs and seeds "
        f"{','.join(map(str, args.seeds))}")
  print()
  print(table(results))
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"ratios": results, "table": table(results),
                 "flags": {k: v for k, v in vars(args).items()}}, f,
                indent=1)


if __name__ == "__main__":
  _common.run(main)
