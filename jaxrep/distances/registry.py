"""The RTTD metrics by name, and the one dispatch from a name to its kernel.

Parameter metrics (`PARAM_METRICS`) compare the providers' updates
end - start of a sub-run; the others compare the models' behaviour on probe
inputs. `model_distances` computes any of them for a sub-run, on one device
or with the providers split over a mesh.
"""

from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
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
  return np.asarray(to_host(distance_matrix(
      metric, apply_fn, start_params, params, model_state, probe_x, key,
      mesh=mesh)), np.float64)


def distance_matrix(metric: str, apply_fn: Callable, start_params, params,
                    model_state, probe_x, key,
                    mesh: Optional[Mesh] = None) -> jax.Array:
  """`model_distances` as the float32 [n, n] array the kernels return (on
  device, sharded like the providers with a mesh): traceable, e.g. to count
  its FLOPs."""
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
  return d


# Metrics whose float32 resolution `resolution` knows.
RESOLVED_METRICS = ("l2", "l1", "linf")


def resolution(metric: str, params) -> float:
  """The float32 resolution of `metric` between the models `params` (leaves
  [n, ...]): one rounding unit of a typical coordinate, eps32 x the median
  over providers of the root-mean-square parameter (a single coordinate
  that differs by d is at distance d in l1, l2 and l-inf alike). Replicas
  that differ only by rounding are a few such units apart, or 0 when bit-
  identical; the replica detector never takes a benign scale below it. 0.0
  for the metrics it does not know (cosine and the function-space metrics),
  which keeps their scale purely empirical."""
  require(metric in METRICS, "metric",
          f"must be one of {METRICS}; got {metric!r}")
  if metric not in RESOLVED_METRICS:
    return 0.0
  rms = np.sqrt(np.asarray(to_host(_mean_squares(params)), np.float64))
  return float(np.finfo(np.float32).eps * np.median(rms))


@jax.jit
def _mean_squares(params) -> jax.Array:
  """Mean squared parameter of every provider [n] (one program, one copy)."""
  leaves = jax.tree_util.tree_leaves(params)
  n = leaves[0].shape[0]
  total = sum(jnp.sum(jnp.square(l.reshape(n, -1).astype(jnp.float32)), axis=1)
              for l in leaves)
  return total / sum(l.size // n for l in leaves)
