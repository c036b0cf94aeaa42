"""Times the replicated sub-run of one model: n providers, k=10, batch 32.

    python experiments/time_subrun.py cnn 16            # Fashion-MNIST (IDX)
    python experiments/time_subrun.py text_cnn 16       # fortunes, L=64
    python experiments/time_subrun.py text_transformer 16 --attackers

Image models train on Fashion-MNIST (Debian's IDX files, 10000 examples),
text models on the fortunes corpus (max_len 64, vocabulary 10000). With
--attackers, half of the providers poison (image: BadNets; text: a quarter
rare-token and a quarter phrase triggers), so the cost of the poisoning
branch is included. Prints compile time and provider-steps/s (median of
--repeats sub-runs after the compiling one).
"""

from __future__ import annotations

import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.population import image_attacks as attacks
from jaxrep.models import zoo as models
from jaxrep.train import trainer as train
from jaxrep.population import text_attacks
from jaxrep.data import datasets as data_lib
from jaxrep.population import divergence as div_lib


def setup(name: str, n: int, attackers: bool):
  """(trainer, population, data, behaviour) for model `name`."""
  text = name in models.TEXT_MODELS
  if text:
    ds = data_lib.load_dataset("fortunes", max_len=64, vocab_size=10000)
  else:
    ds = data_lib.load_dataset("fashion_mnist_idx", max_train=10000,
                               max_test=10)
  vocab = len(ds.vocab) if text else None
  model = models.get_model(name, ds.num_classes, ds.input_shape,
                           vocab_size=vocab)
  if text:
    specs = ([text_attacks.TokenTrigger(target=1),
              text_attacks.PhraseTrigger(target=2)] * (n // 4)
             if attackers else [])
    specs += [None] * (n - len(specs))
    behaviour = text_attacks.make_behaviour(specs, ds.input_shape,
                                            ds.num_classes, vocab)
    hooks = text_attacks.make_hooks(behaviour)
  else:
    specs = attacks.population_specs(n, n // 2 if attackers else 0, "badnets",
                                     num_classes=ds.num_classes)
    behaviour = attacks.make_behaviour(specs, ds.input_shape, ds.num_classes)
    hooks = attacks.make_hooks(behaviour)
  trainer = train.make_trainer(model, train.TrainConfig(), hooks=hooks)
  pop = trainer.init(jax.random.key(0), n)
  return trainer, pop, ds, behaviour


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("model", choices=models.MODELS)
  ap.add_argument("providers", type=int)
  ap.add_argument("--steps", type=int, default=10, help="k")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--attackers", action="store_true")
  args = ap.parse_args()
  n, k = args.providers, args.steps
  trainer, pop, ds, behaviour = setup(args.model, n, args.attackers)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n)
  keys = train.provider_keys(jax.random.key(1), n)
  schedule = jnp.asarray(data_lib.batch_schedule(0, 0, k, 32, len(ds.y_train)))
  t = time.perf_counter()
  out, _ = trainer.sub_run(pop, x, y, schedule, keys, div, behaviour)
  jax.block_until_ready(out)
  compile_s = time.perf_counter() - t
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    out, _ = trainer.sub_run(out, x, y, schedule, keys, div, behaviour)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - t)
  print(f"{args.model} n={n} k={k} batch 32 "
        f"{'with' if args.attackers else 'no'} attackers: compile+run "
        f"{compile_s:.1f} s, {n * k / np.median(times):.0f} provider-steps/s "
        f"(median of {args.repeats}; load "
        f"{', '.join(f'{v:.1f}' for v in os.getloadavg())})")


if __name__ == "__main__":
  main()
