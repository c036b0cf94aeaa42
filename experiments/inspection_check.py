"""Model-inspection detectors on a small digits population, per provider.

For each seed: n providers (half BadNets with their own triggers and
targets, half benign; digits, MLP) train `--steps` steps from one
checkpoint; then Neural Cleanse, MM-BD and STRIP (jaxrep.detect.inspection)
judge every returned model. Prints each detector's score and flag per
provider, ASR and clean accuracy, STRIP's separation AUROC (report only),
TPR / FPR over all seeds, and seconds per provider (wall time of the batched
call / n, including compilation on the first seed).

  python experiments/inspection_check.py --providers=4 --seeds=2,3
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import _common
import jaxrep
from jaxrep.detect import inspection as insp
from jaxrep.train.trainer import evaluate

flags.DEFINE_integer("providers", 4, "providers per seed (half BadNets)")
flags.DEFINE_integer("steps", 300, "training steps (batch 32, lr 0.05)")
flags.DEFINE_float("poison_rate", 0.15, "BadNets poison rate")
_common.define_list("seeds", [2, 3], "population seeds", kind=int)


def main():
  a = _common.script_args()
  ds = jaxrep.load_dataset("digits")
  model = jaxrep.get_model("mlp", ds.num_classes, ds.input_shape)
  n = a.providers
  x_clean, x_overlay = ds.x_test[:180], ds.x_test[180:]
  rows, secs = [], {"neural_cleanse": [], "max_margin": [], "strip": []}
  for seed in a.seeds:
    specs = jaxrep.IMAGE.population_specs(n, n // 2, "badnets", seed=seed,
                                          num_classes=10,
                                          poison_rate=a.poison_rate)
    b = jaxrep.IMAGE.make_behaviour(specs, ds.input_shape, ds.num_classes,
                                    seed=seed)
    trainer = jaxrep.make_trainer(model, jaxrep.TrainConfig(learning_rate=0.05),
                                  jaxrep.DivergenceConfig(),
                                  jaxrep.IMAGE.make_hooks(b))
    pop = trainer.init(jax.random.key(seed), n)
    sched = jnp.asarray(jaxrep.batch_schedule(seed, 0, a.steps, 32,
                                              len(ds.y_train)))
    out, _ = trainer.sub_run(
        pop, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train), sched,
        jaxrep.provider_keys(jax.random.key(seed + 1), n),
        jaxrep.make_divergence(jaxrep.DivergenceConfig(), n), b)
    p, s = out.params, out.model_state
    acc = evaluate(model, p, s, ds.x_test, ds.y_test)
    asr = jaxrep.IMAGE.attack_success_rate(model, p, s, b, ds.x_test,
                                           ds.y_test)
    key = jax.random.key(seed)
    res = {}
    for name, fn in (
        ("neural_cleanse", lambda: insp.neural_cleanse(model, p, s,
                                                       x_clean[:64], key)),
        ("max_margin", lambda: insp.max_margin(model, p, s, key)),
        ("strip", lambda: insp.strip(model, p, s, x_clean, x_overlay, key))):
      t = time.perf_counter()
      res[name] = fn()
      secs[name].append((time.perf_counter() - t) / n)
    trig = jax.vmap(jaxrep.IMAGE.trigger_for(b), in_axes=(0, None, None))(
        b, key, jnp.asarray(x_clean))
    sep = insp.strip_separation(model, p, s, x_clean, np.asarray(trig),
                                x_overlay, key)
    kind, target = np.asarray(b.kind), np.asarray(b.target)
    for i in range(n):
      rows.append(dict(seed=seed, provider=i, bad=bool(kind[i] > 0),
                       target=int(target[i]) if kind[i] else -1,
                       asr=float(asr[i]), acc=float(acc[i]),
                       nc=res["neural_cleanse"].scores[i],
                       nc_flag=bool(res["neural_cleanse"].flags[i]),
                       nc_argmin=int(np.argmin(
                           res["neural_cleanse"].details["norms"][i])),
                       mm_p=res["max_margin"].details["pvalues"][i],
                       mm_flag=bool(res["max_margin"].flags[i]),
                       mm_top=int(res["max_margin"].details["top_class"][i]),
                       strip=res["strip"].scores[i],
                       strip_flag=bool(res["strip"].flags[i]),
                       strip_auroc=float(sep["auroc"][i])))
  print("seed prov bad target   asr   acc |  NC idx flag argmin | MM p    "
        "flag top | STRIP score flag sep_auroc")
  for r in rows:
    print(f"{r['seed']:4d} {r['provider']:4d} {int(r['bad']):3d} "
          f"{r['target']:6d} {r['asr']:5.2f} {r['acc']:5.3f} | "
          f"{r['nc']:7.2f} {int(r['nc_flag']):4d} {r['nc_argmin']:6d} | "
          f"{r['mm_p']:7.4f} {int(r['mm_flag']):4d} {r['mm_top']:3d} | "
          f"{r['strip']:11.3f} {int(r['strip_flag']):4d} "
          f"{r['strip_auroc']:9.3f}")
  bad = np.array([r["bad"] for r in rows])
  for name, key in (("neural_cleanse", "nc_flag"), ("max_margin", "mm_flag"),
                    ("strip", "strip_flag")):
    f = np.array([r[key] for r in rows])
    print(f"{name:15s} TPR {f[bad].mean():.2f}  FPR {f[~bad].mean():.2f}  "
          f"s/provider per seed {', '.join(f'{t:.2f}' for t in secs[name])}")
  aur = np.array([r["strip_auroc"] for r in rows])
  print(f"STRIP separation AUROC (report only): BadNets mean "
        f"{aur[bad].mean():.3f}, benign mean {aur[~bad].mean():.3f}")


if __name__ == "__main__":
  _common.run(main)
