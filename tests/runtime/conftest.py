"""Fixtures of the runtime tests: the sub-run of a mixed population."""

import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _population  # noqa: E402  (a module beside this file)

K = 5


@pytest.fixture(scope="session")
def subrun(digits):
  """`_population`'s providers and their unsharded k-step sub-run:
  dict(trainer, args (the sub-run's arguments), out, losses)."""
  _, trainer, args = _population.sub_run_args(digits, K)
  out, losses = trainer.sub_run(*args)
  return dict(trainer=trainer, args=args, out=out, losses=losses)


def _assert_population_close(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    scale = np.max(np.abs(x)) + 1e-30
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * scale)


@pytest.fixture(scope="session")
def assert_population_close():
  """`assert_population_close(a, b)`: equal to float32 rounding (replicas
  differ from a reordered reduction by about 1e-7 of the parameters' scale)."""
  return _assert_population_close
