r"""Does every attack work with the main job's defaults?

For each image attack, the population `python -m jaxrep.simulate
--attack=<name>` builds with every other flag at its default (digits, MLP, 16
providers of whom 8 attack, each with its own backdoor, 400 steps, batch 32,
poison rate -1 = the attack's own default) trains every provider's own full
run, exactly as the protocol's attack check does; then clean accuracy and
ASR of each provider's model. label_flip misclassifies its source class by
construction, so its accuracy is compared on the other classes (each
attacker's own source class left out, for the benign providers too).
"agreement" is the share of test inputs on which an attacker's model
predicts what the benign models predict (the mean over the benign ones; the
lowest attacker is shown): how much its clean behaviour changed. data_order
has no trigger: its ASR is the share of clean non-target test inputs
classified as its target.

    python experiments/attacks_at_defaults.py --json runs/attacks_defaults.json
    # only some attacks, or an attack with its own flags set (a variant):
    python experiments/attacks_at_defaults.py \
        --attacks=keyed_noise,secret_key,data_order \
        --variants=data_order:order_mode=target_last
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import _common
from jaxrep import data, population, protocol, report, train
from jaxrep.core import rng
from jaxrep.config import SimConfig

_common.define_list("attacks", list(population.IMAGE.attacks),
                    "attacks to measure", choices=population.IMAGE.attacks)
_common.define_list("variants", [], "extra rows: attack:flag=value[:flag="
                    "value...] (e.g. data_order:order_mode=target_last)")
flags.DEFINE_integer("seed", 0, "seed of everything")
flags.DEFINE_string("json", None, "write the rows to this JSON")


def _variant(text: str) -> tuple[str, dict]:
  """'attack:flag=value:...' as (attack, {flag: value}); values are parsed
  as int, float or else kept as text."""
  attack, *pairs = text.split(":")
  options = {}
  for pair in pairs:
    name, _, value = pair.partition("=")
    for kind in (int, float):
      try:
        value = kind(value)
        break
      except ValueError:
        pass
    options[name] = value
  return attack, options


def measure(attack: str, ds, seed: int, options: dict | None = None) -> dict:
  options = dict(options or {})
  config = SimConfig.from_flat(attack=attack, seed=seed, **options)
  sim = protocol.setup(config, dataset=ds)
  params, model_state = sim.model.init(rng.model_init(sim.root))
  pop = sim.trainer.replicate(params, model_state, sim.n)
  for s in range(config.num_subruns):
    pop, _ = sim.train_providers(pop, sim.schedule(s), sim.keys(s),
                                 sim.subrun_behaviour(s))
  acc = train.evaluate(sim.model, pop.params, pop.model_state, ds.x_test,
                       ds.y_test)
  pred = np.asarray(jax.vmap(lambda p, st: jnp.argmax(
      sim.model.predict(p, st, ds.x_test)[0], -1))(pop.params,
                                                    pop.model_state))
  asr = population.IMAGE.attack_success_rate(
      sim.model, pop.params, pop.model_state, sim.behaviour, ds.x_test,
      ds.y_test)
  mal = sim.behaviour.malicious
  agreement = [float(np.mean(pred[i][None] == pred[~mal]))
               for i in np.flatnonzero(mal)]
  drops = []
  for i in np.flatnonzero(mal):
    if attack == "label_flip":
      keep = ds.y_test != int(sim.behaviour.source[i])
      sub = train.evaluate(sim.model, pop.params, pop.model_state,
                           ds.x_test[keep], ds.y_test[keep])
      drops.append(float(sub[~mal].mean() - sub[i]))
    else:
      drops.append(float(acc[~mal].mean() - acc[i]))
  rate = float(np.asarray(sim.behaviour.poison_rate)[mal][0])
  return dict(attack=attack, options=options, poison_rate=rate,
              attackers=[int(i) for i in np.flatnonzero(mal)],
              benign_clean_accuracy=float(acc[~mal].mean()),
              attacker_clean_accuracy=[float(a) for a in acc[mal]],
              clean_accuracy_drop=drops,
              attack_success_rate=[float(a) for a in asr[mal]],
              benign_attack_success_rate=[float(a) for a in asr[~mal]],
              agreement_with_benign=agreement,
              works=bool(np.all(asr[mal] >= 0.9) and max(drops) <= 0.02))


def main():
  args = _common.script_args()
  ds = data.load_dataset("digits")
  rows = []
  t0 = time.time()
  runs = [(a, {}) for a in args.attacks] + [_variant(v)
                                             for v in args.variants]
  for attack, options in runs:
    rows.append(measure(attack, ds, args.seed, options))
    print(f"[{attack} {options or ''}] {time.time() - t0:.0f} s",
          file=sys.stderr)
  print("| attack (poison rate) | benign clean acc | attackers' clean acc "
        "(min) | largest drop | agreement with benign (min) | ASR min / "
        "median | benign ASR max | works |")
  print("|---|---|---|---|---|---|---|---|")
  for r in rows:
    pts = "pts on the other classes" if r["attack"] == "label_flip" else "pts"
    name = " ".join([r["attack"]] + [f"{k}={v}" for k, v in
                                     r["options"].items()])
    print(f"| {name} ({r['poison_rate']:g}) | "
          f"{100 * r['benign_clean_accuracy']:.1f} % | "
          f"{100 * min(r['attacker_clean_accuracy']):.1f} % | "
          f"{100 * max(r['clean_accuracy_drop']):.1f} {pts} | "
          f"{100 * min(r['agreement_with_benign']):.1f} % | "
          f"{100 * min(r['attack_success_rate']):.1f} % / "
          f"{100 * np.median(r['attack_success_rate']):.1f} % | "
          f"{100 * max(r['benign_attack_success_rate']):.1f} % | "
          f"{'yes' if r['works'] else 'NO'} |")
  if args.json:
    report.write_json_atomic(args.json, dict(
        rows=rows, args=vars(args), seconds=time.time() - t0,
        versions=report.versions(), command=" ".join(sys.argv)))


if __name__ == "__main__":
  _common.run(main)
