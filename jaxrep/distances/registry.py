"""The RTTD metrics by name, and the one dispatch from a name to its kernel.

Parameter metrics (`PARAM_METRICS`) compare the providers' updates
end - start of a sub-run; the others compare the models' behaviour on probe
inputs. `model_distances` computes any of them for a sub-run, on one device
or with the providers split over a mesh.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from jax.sharding import Mesh

from jaxrep.core.errors import require
from jaxrep.distances.function_space import cka_distances, output_distances
from jaxrep.distances.numerics import PARAM_METRICS
from jaxrep.distances.parameter_space import pairwise_distances, updates
from jaxrep.distances.zest import zest_distances
from jaxrep.runtime.mesh import to_host

METRICS = PARAM_METRICS + ("output", "cka", "zest")
ZEST_REFERENCES = 16


def model_distances(metric: str, apply_fn: Callable, start_params, params,
                    model_state, probe_x, key,
                    mesh: Optional[Mesh] = None) -> np.ndarray:
  """The [n, n] distance matrix of `metric` between the providers' models.

  Args:
    metric: one of `METRICS`.
    apply_fn: single-provider (params, model_state, x) -> (logits, features).
    start_params: the sub-run's starting model (parameter metrics compare
      the updates params - start_params).
    params, model_state: the providers' models, leaves [n, ...].
    probe_x: probe inputs (Zest uses the first `ZEST_REFERENCES` as its
      references).
    key: PRNG key of Zest's references and masks.
    mesh: None computes on one device; with a mesh the providers stay split
      over its devices (the result equals the unsharded one to float32
      rounding).

  Returns:
    float64 numpy [n, n] matrix (on every process).
  """
  require(metric in METRICS, "metric",
          f"must be one of {METRICS}; got {metric!r}")
  if metric in PARAM_METRICS:
    d = pairwise_distances(updates(start_params, params), metric, mesh=mesh)
  elif metric == "output":
    d = output_distances(apply_fn, params, model_state, probe_x, mesh=mesh)
  elif metric == "cka":
    d = cka_distances(apply_fn, params, model_state, probe_x, mesh=mesh)
  else:
    d = zest_distances(apply_fn, params, model_state,
                       probe_x[:ZEST_REFERENCES], key, mesh=mesh)
  return np.asarray(to_host(d), np.float64)
