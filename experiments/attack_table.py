r"""Do the attacks work? Clean accuracy and ASR of every attack after a full run.

All attacks and two benign providers train in ONE vmapped population (benign
is the zero behaviour), from the same initialisation, on the same batches.

    python experiments/attack_table.py --dataset=fashion_mnist_idx --steps=1500 \
        --json runs/attacks_fmnist.json
    python experiments/attack_table.py --dataset=digits --steps=400
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxrep.population import image_attacks as A
from jaxrep.data import datasets as data_lib
from jaxrep.population import divergence as div_lib
from jaxrep.models import zoo as models
from jaxrep.train import trainer as train
from jaxrep.report.outputs import versions, write_json_atomic


def attack_suite(trigger_size: int, scale_factor: float = 2.0,
                 warp_strength: float = 1.5):
  """The attacks of the table, each with its own target."""
  return [
      ("benign", None),
      ("benign", None),
      ("badnets (corner, checkerboard)",
       A.BadNets(target=3, size=trigger_size, location="bottom_right")),
      ("badnets (random place, random pattern)",
       A.BadNets(target=8, size=trigger_size, location="random",
                 pattern="random")),
      ("blend (alpha 0.2)", A.Blend(target=5, alpha=0.2)),
      ("label_flip (1 -> 7)", A.LabelFlip(source=1, target=7)),
      (f"scaling (model replacement x{scale_factor:g})",
       A.Scaling(target=2, size=trigger_size, factor=scale_factor)),
      (f"warp (WaNet-style, {warp_strength:g} px)",
       A.Warp(target=4, strength=warp_strength)),
  ]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--dataset", default="digits")
  ap.add_argument("--data_dir", default=None)
  ap.add_argument("--model", default="mlp")
  ap.add_argument("--steps", type=int, default=400)
  ap.add_argument("--subrun_steps", type=int, default=50)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--learning_rate", type=float, default=0.05)
  ap.add_argument("--trigger_size", type=int, default=0,
                  help="0: 2 for 8x8 images, 3 otherwise")
  ap.add_argument("--scale_factor", type=float, default=2.0)
  ap.add_argument("--warp_strength", type=float, default=1.5)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--json", default=None)
  args = ap.parse_args(argv)

  ds = data_lib.load_dataset(args.dataset, args.data_dir)
  size = args.trigger_size or (2 if ds.input_shape[0] <= 8 else 3)
  suite = attack_suite(size, args.scale_factor, args.warp_strength)
  names = [s[0] for s in suite]
  specs = [s[1] for s in suite]
  behaviour = A.make_behaviour(specs, ds.input_shape, ds.num_classes,
                               seed=args.seed)
  model = models.get_model(args.model, ds.num_classes, ds.input_shape)
  cfg = train.TrainConfig(learning_rate=args.learning_rate, schedule="cosine",
                          total_steps=args.steps, batch_size=args.batch_size)
  trainer = train.make_trainer(model, cfg, div_lib.DivergenceConfig(),
                               A.make_hooks(behaviour))
  n = len(specs)
  pop = trainer.init(jax.random.key(args.seed), n)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), n, args.seed)
  t0 = time.time()
  k = args.subrun_steps
  for s in range(args.steps // k):
    schedule = jnp.asarray(data_lib.batch_schedule(args.seed, s, k,
                                                   args.batch_size, len(y)))
    keys = train.provider_keys(jax.random.fold_in(jax.random.key(args.seed),
                                                  s), n)
    pop, _ = trainer.sub_run(pop, x, y, schedule, keys, div, behaviour)
  jax.block_until_ready(pop)
  seconds = time.time() - t0
  acc = train.evaluate(model, pop.params, pop.model_state, ds.x_test,
                       ds.y_test)
  asr = A.attack_success_rate(model, pop.params, pop.model_state, behaviour,
                              ds.x_test, ds.y_test)
  benign_acc = float(acc[:2].mean())
  rows = []
  for i, (name, spec) in enumerate(suite):
    row = dict(attack=name, clean_accuracy=float(acc[i]),
               attack_success_rate=float(asr[i]),
               clean_accuracy_drop=benign_acc - float(acc[i]))
    if isinstance(spec, A.LabelFlip):
      keep = ds.y_test != spec.source
      sub = train.evaluate(model, pop.params, pop.model_state,
                           ds.x_test[keep], ds.y_test[keep])
      row["clean_accuracy_other_classes"] = float(sub[i])
      row["clean_accuracy_drop_other_classes"] = float(sub[:2].mean() - sub[i])
    row["works"] = bool(spec is None or (
        row["attack_success_rate"] >= 0.9 and
        row.get("clean_accuracy_drop_other_classes",
                row["clean_accuracy_drop"]) <= 0.02))
    rows.append(row)

  print(f"{args.dataset} / {args.model}: {args.steps} steps, batch "
        f"{args.batch_size}, lr {args.learning_rate} cosine, trigger size "
        f"{size}; {seconds:.0f} s for {n} providers in one vmapped run\n")
  print("| provider | clean acc | ASR | works (ASR >= 90 %, acc within 2 pts) |")
  print("|---|---|---|---|")
  for r in rows:
    extra = (f" ({100 * r['clean_accuracy_other_classes']:.1f} % on the "
             "other classes)" if "clean_accuracy_other_classes" in r else "")
    works = "-" if r["attack"] == "benign" else ("yes" if r["works"] else "NO")
    print(f"| {r['attack']} | {100 * r['clean_accuracy']:.1f} %{extra} | "
          f"{100 * r['attack_success_rate']:.1f} % | {works} |")
  if args.json:
    write_json_atomic(args.json, dict(rows=rows, args=vars(args),
                                      seconds=seconds, versions=versions(),
                                      load_average=os.getloadavg(),
                                      command=" ".join(sys.argv)))


if __name__ == "__main__":
  main()
