r"""Inspection detectors over providers: one vmap against provider blocks.

Times `jaxrep.detect.inspection`'s MM-BD program (`_max_margins`) for n
randomly initialised models, with every provider in one vmap (block = n)
and with the automatic block (`inspection.provider_block`: 1 for the
Fashion-MNIST CNN on CPU, n on GPU/TPU), in one process, median of
--repeats calls after a compiling warm-up. Prints both, their ratio and
whether the margins agree.

    python experiments/bench_inspection.py                 # CNN, 8 providers
    python experiments/bench_inspection.py --model=mlp --n=16
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
flags.DEFINE_enum("model", "cnn", ["mlp", "cnn"], "image model "
                  "(Fashion-MNIST shapes: 28x28x1, 10 classes)")
flags.DEFINE_integer("n", 8, "providers")
flags.DEFINE_integer("steps", 20, "MM-BD ascent steps per class")
flags.DEFINE_integer("repeats", 3, "timed calls per measurement")


def main() -> None:
  args = _common.script_args()
  model = get_model(args.model, 10, (28, 28, 1))
  params, state = jax.vmap(model.init)(
      jax.random.split(jax.random.key(0), args.n))
  cfg = inspection.MaxMarginConfig(steps=args.steps)
  classes = jnp.arange(10)
  keys = jax.random.split(jax.random.key(1), 10)
  auto = min(args.n, inspection.provider_block(
      inspection._margin_provider(model, cfg, classes, keys), (params, state)))
  results = {}
  for block in (args.n, auto):
    call = lambda b=block: inspection._max_margins(
        model, cfg, params, state, classes, keys, b)
    results[block] = (_common.timed(call, args.repeats), np.asarray(call()))
  (t_all, m_all), (t_auto, m_auto) = results[args.n], results[auto]
  print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}, load "
        f"average {os.getloadavg()[0]:.1f}; MM-BD, {args.model}, n={args.n}, "
        f"{args.steps} steps, 10 classes x {cfg.starts} starts")
  print(f"one vmap (block {args.n}): {t_all:.2f} s")
  print(f"auto block ({auto}): {t_auto:.2f} s, {t_all / t_auto:.2f}x")
  print("largest margin difference: "
        f"{float(np.max(np.abs(m_all - m_auto))):.3g}")


if __name__ == "__main__":
  _common.run(main)
