r"""Do the attacks work? Clean accuracy and ASR of every attack after a full run.

All attacks and two benign providers train in ONE vmapped population (benign
is the zero behaviour), from the same initialisation, on the same batches.

    python experiments/attack_table.py --dataset=fashion_mnist_idx --steps=1500 \
        --json runs/attacks_fmnist.json
    python experiments/attack_table.py --dataset=digits --steps=400
"""

from __future__ import annotations

import os
import sys
import time

import jax
from absl import flags

import _common
from jaxrep import data, population, protocol, report, train
from jaxrep.config import SimConfig

flags.DEFINE_string("dataset", "digits", "image dataset (see "
                    "python -m jaxrep.simulate --helpfull)")
flags.DEFINE_string("data_dir", None, "directory of the dataset's files")
flags.DEFINE_string("model", "mlp", "image model")
flags.DEFINE_integer("steps", 400, "training steps of the run")
flags.DEFINE_integer("subrun_steps", 50, "steps per compiled sub-run")
flags.DEFINE_integer("batch_size", 32, "examples per step")
flags.DEFINE_float("learning_rate", 0.05, "peak learning rate (cosine)")
flags.DEFINE_integer("trigger_size", 0, "0: 2 for 8x8 images, 3 otherwise")
flags.DEFINE_float("scale_factor", 2.0, "model replacement factor")
flags.DEFINE_float("warp_strength", 1.5, "WaNet-style warp in pixels")
flags.DEFINE_integer("seed", 0, "seed of everything")
flags.DEFINE_string("json", None, "write the rows to this JSON")


def attack_suite(trigger_size: int, scale_factor: float = 2.0,
                 warp_strength: float = 1.5):
  """The attacks of the table, each with its own target."""
  return [
      ("benign", None),
      ("benign", None),
      ("badnets (corner, checkerboard)",
       population.BadNets(target=3, size=trigger_size,
                          location="bottom_right")),
      ("badnets (random place, random pattern)",
       population.BadNets(target=8, size=trigger_size, location="random",
                          pattern="random")),
      ("blend (alpha 0.2)", population.Blend(target=5, alpha=0.2)),
      ("label_flip (1 -> 7)", population.LabelFlip(source=1, target=7)),
      (f"scaling (model replacement x{scale_factor:g})",
       population.Scaling(target=2, size=trigger_size, factor=scale_factor)),
      (f"warp (WaNet-style, {warp_strength:g} px)",
       population.Warp(target=4, strength=warp_strength)),
  ]


def main():
  args = _common.script_args()
  ds = data.load_dataset(args.dataset, args.data_dir)
  size = args.trigger_size or (2 if ds.input_shape[0] <= 8 else 3)
  suite = attack_suite(size, args.scale_factor, args.warp_strength)
  specs = [s[1] for s in suite]
  n = len(specs)
  behaviour = population.IMAGE.make_behaviour(
      specs, ds.input_shape, ds.num_classes, seed=args.seed)
  config = SimConfig.from_flat(
      dataset=args.dataset, data_dir=args.data_dir, model=args.model,
      providers=n, malicious=int(behaviour.malicious.sum()),
      steps=args.steps, subrun_steps=args.subrun_steps, replicated=1,
      batch_size=args.batch_size, learning_rate=args.learning_rate,
      schedule="cosine", seed=args.seed)
  sim = protocol.setup(config, dataset=ds, behaviour=behaviour)
  # Every provider's own full run: the protocol's attack check.
  pop = protocol.initial_state(sim).own
  t0 = time.time()
  for s in range(config.num_subruns):
    pop, _ = sim.train_providers(pop, sim.schedule(s), sim.keys(s),
                                 sim.subrun_behaviour(s))
  jax.block_until_ready(pop)
  seconds = time.time() - t0
  acc = train.evaluate(sim.model, pop.params, pop.model_state, ds.x_test,
                       ds.y_test)
  asr = population.IMAGE.attack_success_rate(
      sim.model, pop.params, pop.model_state, behaviour, ds.x_test, ds.y_test)
  benign_acc = float(acc[:2].mean())
  rows = []
  for i, (name, spec) in enumerate(suite):
    row = dict(attack=name, clean_accuracy=float(acc[i]),
               attack_success_rate=float(asr[i]),
               clean_accuracy_drop=benign_acc - float(acc[i]))
    if isinstance(spec, population.LabelFlip):
      keep = ds.y_test != spec.source
      sub = train.evaluate(sim.model, pop.params, pop.model_state,
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
    report.write_json_atomic(args.json, dict(
        rows=rows, args=vars(args), seconds=seconds,
        versions=report.versions(), load_average=os.getloadavg(),
        command=" ".join(sys.argv)))


if __name__ == "__main__":
  _common.run(main)
