r"""Inspection detectors over providers and classes: one vmap against blocks.

--detector=max_margin (default) times `jaxrep.detect.inspection`'s MM-BD
program (`_max_margins`) for n randomly initialised models, with every
provider in one vmap (block = n) and with the automatic block
(`inspection.provider_block`: 1 for the Fashion-MNIST CNN on CPU, n on
GPU/TPU). --detector=neural_cleanse times `inspection.neural_cleanse` (on 64
random images) with a provider's classes all in one vmap (class_block = 10)
and in the automatic class block (`inspection.class_block`: 1 for the CNN on
CPU, all classes on GPU/TPU), the providers in their automatic blocks both
times. In one process, median of --repeats calls after a compiling warm-up.
Prints both, their ratio and how far the results differ.

    python experiments/bench_inspection.py                 # MM-BD, CNN, n=8
    python experiments/bench_inspection.py --model=mlp --n=16
    python experiments/bench_inspection.py --detector=neural_cleanse --n=2
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import _common
from jaxrep.detect import inspection
from jaxrep.models.registry import get_model

FLAGS = flags.FLAGS
flags.DEFINE_enum("detector", "max_margin", ["max_margin", "neural_cleanse"],
                  "the detector timed")
flags.DEFINE_enum("model", "cnn", ["mlp", "cnn"], "image model "
                  "(Fashion-MNIST shapes: 28x28x1, 10 classes)")
flags.DEFINE_integer("n", 8, "providers")
flags.DEFINE_integer("steps", 20, "ascent (MM-BD) or Adam (Neural Cleanse) "
                     "steps per class")
flags.DEFINE_integer("repeats", 3, "timed calls per measurement")


def _max_margin(model, params, state, args):
  """{label: (call, block)} of MM-BD with one vmap and the automatic
  provider block."""
  cfg = inspection.MaxMarginConfig(steps=args.steps)
  classes = jnp.arange(10)
  keys = jax.random.split(jax.random.key(1), 10)
  auto = min(args.n, inspection.provider_block(
      inspection._margin_provider(model, cfg, classes, keys), (params, state)))
  call = lambda b: lambda: inspection._max_margins(
      model, cfg, params, state, classes, keys, b)
  return (f"{10 * cfg.starts} starts (10 classes x {cfg.starts}) per "
          "provider", {f"one vmap (provider block {args.n})": call(args.n),
                       f"auto provider block ({auto})": call(auto)})


def _neural_cleanse(model, params, state, args):
  """{label: call} of Neural Cleanse with every class in one vmap and in
  the automatic class block."""
  cfg = inspection.NeuralCleanseConfig(steps=args.steps)
  x = jax.random.uniform(jax.random.key(2), (64, 28, 28, 1))
  one = lambda a: a[0]
  auto = inspection.class_block(
      model, cfg, jax.tree_util.tree_map(one, params),
      jax.tree_util.tree_map(one, state), x, jnp.arange(10),
      jax.random.split(jax.random.key(1), 10))
  call = lambda b: lambda: inspection.neural_cleanse(
      model, params, state, x, jax.random.key(1), config=cfg,
      class_block=b).details["last_norms"]
  return ("10 classes x 64 images per provider",
          {"one vmap (class block 10)": call(10),
           f"auto class block ({min(auto, 10)})": call(auto)})


def main() -> None:
  args = _common.script_args()
  model = get_model(args.model, 10, (28, 28, 1))
  params, state = jax.vmap(model.init)(
      jax.random.split(jax.random.key(0), args.n))
  what, calls = {"max_margin": _max_margin,
                 "neural_cleanse": _neural_cleanse}[args.detector](
                     model, params, state, args)
  results = {label: (_common.timed(call, args.repeats), np.asarray(call()))
             for label, call in calls.items()}
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, load "
        f"average {os.getloadavg()[0]:.1f}; {args.detector}, {args.model}, "
        f"n={args.n}, {args.steps} steps, {what}")
  (l_all, (t_all, r_all)), (l_auto, (t_auto, r_auto)) = results.items()
  print(f"{l_all}: {t_all:.2f} s")
  print(f"{l_auto}: {t_auto:.2f} s, {t_all / t_auto:.2f}x")
  print(f"largest difference of the results: "
        f"{float(np.max(np.abs(r_all - r_auto))):.3g}")


if __name__ == "__main__":
  _common.run(main)
