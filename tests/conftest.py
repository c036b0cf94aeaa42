"""Shared fixtures. Tests run on the CPU; 8 host devices let the sharding
tests build a mesh. Compiled programs are shared by the tests of a session
(and the CLI runs they start) through XLA's persistent compilation cache in
a temporary directory: many tests compile the same sub-run, and the cache
is keyed by the program, so results are unchanged."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _CACHE = tempfile.mkdtemp(prefix="jaxrep-test-xla-")
  atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

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
