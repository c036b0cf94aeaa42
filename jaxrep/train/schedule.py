"""The batch schedule of a sub-run: which examples every step trains on.

The client fixes it per (seed, sub-run) and sends it to every provider, so
replicas of a sub-run see the same examples.
"""

from __future__ import annotations

import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core import validate as V
from jaxrep.core.errors import require


def batch_schedule(seed: int, subrun: int, steps: int, batch_size: int,
                   num_examples: int) -> np.ndarray:
  """Example indices of every training step, fixed by (seed, subrun).

  The schedule walks through epochs: each epoch is a fresh random permutation
  of all examples, cut into floor(num_examples / batch_size) batches; the
  leftover examples of an epoch are dropped. So the indices within a step are
  distinct, and every example is used at most once per epoch.

  The generator is NumPy's PCG64 seeded with the sequence [seed, subrun]
  (`np.random.default_rng([seed, subrun])`), which is the same on every
  platform, so equal arguments always give an equal schedule and different
  subruns give independent schedules.

  Args:
    seed: Experiment seed, >= 0.
    subrun: Index of the subrun, >= 0.
    steps: Number of steps (rows), >= 1.
    batch_size: Examples per step, 1 <= batch_size <= num_examples.
    num_examples: Size of the training set, >= 1.

  Returns:
    int32 array [steps, batch_size] of indices in [0, num_examples).

  Raises:
    ConfigError: An argument is out of range or not an integer.
  """
  for field, value, low in (("seed", seed, 0), ("subrun", subrun, 0),
                            ("steps", steps, 1), ("batch_size", batch_size, 1),
                            ("num_examples", num_examples, 1)):
    require(V.is_int(value) and value >= low, field,
            f"must be an integer >= {low}, got {value!r}")
  require(num_examples <= np.iinfo(np.int32).max, "num_examples",
          f"must fit in int32, got {num_examples}")
  require(batch_size <= num_examples, "batch_size",
          f"must be <= the number of training examples ({num_examples}), got "
          f"{batch_size}")
  rng = rng_lib.batches(seed, subrun)
  per_epoch = num_examples // batch_size
  epochs = -(-steps // per_epoch)
  batches = [
      rng.permutation(num_examples)[:per_epoch * batch_size].reshape(
          per_epoch, batch_size) for _ in range(epochs)
  ]
  return np.concatenate(batches)[:steps].astype(np.int32)
