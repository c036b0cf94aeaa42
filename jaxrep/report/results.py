"""results.json: every provider's verdict and model quality, the summary,
the client's final model with and without the defense, and the versions of
the stack; written atomically."""

from __future__ import annotations

import json
import math
import os
import platform
import tempfile

import numpy as np

from jaxrep.core import version


def versions() -> dict:
  """Versions of the stack, so a run can be reproduced."""
  import flax
  import jax
  import jaxlib
  import optax
  return {"jaxrep": version.__version__, "jax": jax.__version__,
          "jaxlib": jaxlib.__version__, "flax": flax.__version__,
          "optax": optax.__version__, "python": platform.python_version(),
          "device_kind": jax.devices()[0].device_kind,
          "platform": jax.default_backend(),
          "device_count": jax.device_count()}


def _clean(obj):
  """JSON-safe copy: numpy scalars to Python, non-finite floats to None."""
  if isinstance(obj, dict):
    return {str(k): _clean(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_clean(v) for v in obj]
  if isinstance(obj, np.ndarray):
    return _clean(obj.tolist())
  if isinstance(obj, (np.bool_,)):
    return bool(obj)
  if isinstance(obj, (np.integer,)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    v = float(obj)
    return v if math.isfinite(v) else None
  return obj


clean = _clean   # JSON-ready values: numpy to Python, NaN / inf to None


def results_dict(result) -> dict:
  return _clean({
      "config": result.config.flat(),
      "providers": result.providers(),
      "summary": result.summary(),
      "client": {"with_defense": result.client,
                 "no_defense": result.no_defense},
      "ledger": result.ledger,
      "trajectory": result.trajectory,
      "notes": result.notes,
      "memory": result.memory,
      "versions": versions(),
  })


def write_json_atomic(path: str, obj) -> None:
  """Writes JSON to a temporary file in the same directory, then renames it.

  A crash never leaves a partial file under `path`.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-",
                             suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2, allow_nan=False)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
