"""Shared fixtures. Tests run on the CPU; 8 host devices let the sharding
tests build a mesh."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def digits():
  """scikit-learn's bundled digits (embedded; no files needed)."""
  from jaxrep import data  # pylint: disable=g-import-not-at-top
  return data.load_dataset("digits")


@pytest.fixture(scope="session")
def repo_root():
  """The repository's root (for tests that start the CLI in a subprocess)."""
  return ROOT
