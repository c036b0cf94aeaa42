"""XLA's persistent compilation cache: programs compiled once are reused by
later simulations of the same shapes (in this process or another).

Simulations with equal settings share their jitted functions within a
process (`train.make_trainer` is cached), so the cache serves the programs
a process has not built yet: another worker's, a resumed sweep's, and those
of simulations whose hooks cannot be shared (adaptive attackers). The cache
is keyed by the program itself (its HLO, the backend and
the compile options), so a cached executable is the one XLA would compile:
results are unchanged.
"""

from __future__ import annotations

import os

import jax

# Programs that compile faster than this are not worth a disk write.
MIN_COMPILE_SECONDS = 0.2


def enable_cache(path: str) -> str:
  """Uses `path` as the persistent compilation cache of this process (the
  first directory set wins for the process's lifetime); returns the
  directory in use."""
  current = jax.config.jax_compilation_cache_dir
  if current:
    return current
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", os.path.abspath(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs",
                    MIN_COMPILE_SECONDS)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return os.path.abspath(path)
