r"""Times the replicated sub-run of one model: n providers, k=10, batch 32.

    python experiments/time_subrun.py --model=cnn --providers=16
    python experiments/time_subrun.py --model=text_cnn --providers=16
    python experiments/time_subrun.py --model=text_transformer --providers=16 \
        --attackers

Image models train on Fashion-MNIST (Debian's IDX files, 10000 examples),
text models on the fortunes corpus (max_len 64, vocabulary 10000). With
--attackers, half of the providers poison (image: BadNets; text: a quarter
rare-token and a quarter phrase triggers), so the cost of the poisoning
branch is included. The sub-run is the protocol's first one
(`protocol.setup`). Prints compile time and provider-steps/s (median of
--repeats sub-runs after the compiling one).
"""

from __future__ import annotations

import os
import time

import jax
from absl import flags

import _common
from jaxrep import data, models, population, protocol
from jaxrep.config import SimConfig

flags.DEFINE_enum("model", None, models.MODELS, "the model to time")
flags.DEFINE_integer("providers", None, "providers n", lower_bound=1)
flags.DEFINE_integer("steps", 10, "k")
flags.DEFINE_integer("repeats", 3, "timed sub-runs")
flags.DEFINE_bool("attackers", False, "half of the providers poison")
flags.mark_flags_as_required(["model", "providers"])


def simulation(name: str, n: int, k: int, attackers: bool):
  """The Simulation whose first sub-run is timed: at least 2 providers (the
  protocol's minimum), of which the first n are timed."""
  text = name in models.TEXT_MODELS
  if text:
    ds = data.load_dataset("fortunes", max_len=64, vocab_size=10000)
  else:
    ds = data.load_dataset("fashion_mnist_idx", max_train=10000, max_test=10)
  providers, behaviour, malicious = max(n, 2), None, 0
  if attackers and text:
    specs = [population.TokenTrigger(target=1),
             population.PhraseTrigger(target=2)] * (n // 4)
    malicious = len(specs)
    behaviour = population.TEXT.make_behaviour(
        specs + [None] * (providers - malicious), ds.input_shape,
        ds.num_classes, len(ds.vocab))
  elif attackers:
    malicious = n // 2
  config = SimConfig.from_flat(
      model=name, providers=providers, malicious=malicious, steps=k,
      subrun_steps=k, replicated=1, schedule="constant", attack_check=False)
  return protocol.setup(config, dataset=ds, behaviour=behaviour)


def main() -> None:
  args = _common.script_args()
  n, k = args.providers, args.steps
  sim = simulation(args.model, n, k, args.attackers)
  inputs = _common.subrun_inputs(sim, n)
  t = time.perf_counter()
  jax.block_until_ready(sim.trainer.sub_run(*inputs))
  compile_s = time.perf_counter() - t
  median, _ = _common.median_time(
      lambda: jax.block_until_ready(sim.trainer.sub_run(*inputs)),
      args.repeats)
  print(f"{args.model} n={n} k={k} batch 32 "
        f"{'with' if args.attackers else 'no'} attackers: compile+run "
        f"{compile_s:.1f} s, {n * k / median:.0f} provider-steps/s "
        f"(median of {args.repeats}; load "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())})")


if __name__ == "__main__":
  _common.run(main)
