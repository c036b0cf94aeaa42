"""The work directory of a run (results, plots, checkpoints) is state: it is
checked before training and held by one live run at a time."""

from __future__ import annotations

import fcntl
import os

from jaxrep.core.errors import ConfigError

LOCK_NAME = ".jaxrep.lock"


def check(path: str, field: str = "out") -> None:
  """Raises ConfigError unless `path` is (or can become) a writable
  directory."""
  if os.path.exists(path) and not os.path.isdir(path):
    raise ConfigError(f"{field}: {path} exists and is not a directory")
  parent = path
  while not os.path.exists(parent):
    parent = os.path.dirname(os.path.abspath(parent))
  if not os.path.isdir(parent):
    raise ConfigError(f"{field}: {parent} is not a directory")
  if not os.access(parent, os.W_OK | os.X_OK):
    raise ConfigError(f"{field}: {parent} is not writable")


class Claim:
  """An exclusive, advisory lock on a work directory, released when the
  process ends (or on `release`)."""

  def __init__(self, path: str, field: str = "out"):
    check(path, field)
    os.makedirs(path, exist_ok=True)
    self._file = open(os.path.join(path, LOCK_NAME), "a+")
    try:
      fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      self._file.seek(0)
      holder = self._file.read().strip() or "another process"
      self._file.close()
      raise ConfigError(f"{field}: {path} is in use by a live run "
                        f"(pid {holder}); wait for it or choose another "
                        f"--{field}") from None
    self._file.seek(0)
    self._file.truncate()
    self._file.write(str(os.getpid()))
    self._file.flush()

  def release(self) -> None:
    if not self._file.closed:
      fcntl.flock(self._file, fcntl.LOCK_UN)
      self._file.close()
