"""Shared fixtures. Tests run on the CPU; 8 host devices let the sharding
tests build a mesh. Compiled programs are shared by the tests of a session
(and the CLI runs they start) through XLA's persistent compilation cache in
a temporary directory: many tests compile the same sub-run, and the cache
is keyed by the program, so results are unchanged.

`make test` runs the suite in two pytest-xdist worker processes (`-n 2`).
The settings below are made in the controlling process before the workers
start, and the workers (and the CLI runs they start) inherit them: the same
XLA flags and one compilation cache for all (JAX's persistent cache is safe
for concurrent writers). The scheduler below keeps together the tests that
share one simulation fixture, so it is computed once."""

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


# Test modules whose tests share a module- or session-scoped simulation (a
# trained population, protocol runs) or start several multi-process runs.
# Under pytest-xdist each worker computes a fixture it needs itself, so each
# group below runs on one worker; every other test is scheduled on its own.
# (xdist's `--dist loadgroup` would do this with marks, but xdist 3.8 cannot
# rename pytest 9's test ids, so its groups are silently ignored.)
SHARED_SIMULATIONS = {
    "tests/detect/test_inspection.py": "inspection",          # trained
    "tests/population/test_adaptive.py": "adaptive",          # world, plain
    "tests/population/test_evasive_attacks.py": "evasive",    # trained
    "tests/protocol/test_loop.py": "loop",                    # small_run
    "tests/protocol/test_recovery.py": "recovery",            # runs
    "tests/protocol/test_single_provider.py": "single",       # sim
    "tests/protocol/test_text.py": "protocol-text",           # text_run
    "tests/runtime/test_memory.py": "runtime-subrun",         # subrun
    "tests/runtime/test_mesh.py": "runtime-subrun",           # subrun
    "tests/runtime/test_multihost.py": "multihost",  # 2-process runs: one at a time
}

try:
  import xdist.scheduler  # noqa: E402
except ImportError:       # plain pytest: nothing to schedule
  xdist = None

if xdist is not None:

  class _SharedSimulationScheduling(xdist.scheduler.LoadScopeScheduling):
    """xdist's load balancing, one test at a time, except that the tests of
    a SHARED_SIMULATIONS group go to one worker together."""

    def _split_scope(self, nodeid: str) -> str:
      group = SHARED_SIMULATIONS.get(nodeid.split("::", 1)[0])
      return f"group:{group}" if group else nodeid

  def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") == "load":     # what -n N uses by default
      return _SharedSimulationScheduling(config, log)
    return None
