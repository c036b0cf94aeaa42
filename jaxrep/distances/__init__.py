"""Distances between the models of n providers (one [n, n] matrix per metric).

    import jaxrep.distances as distances
    d = distances.model_distances("l2", apply_fn, start, params, state,
                                  probe_x, key, mesh=None)

Modules:
  numerics.py        the kernels' numerics, written once (robust centre,
                     centred Gram product, exact fix-up, direct tiles)
  parameter_space.py updates and `pairwise_distances` (L2, cosine, L1,
                     L-inf) on one device; dispatches to the ring on a mesh
  ring.py            the same kernels with the providers split over a mesh
  function_space.py  output-space and CKA distances (forward passes sharded
                     on a mesh)
  zest.py            Zest: distances between LIME surrogate signatures
  registry.py        metric names, the dispatch `model_distances` (and its
                     on-device, traceable form `distance_matrix`), and
                     `resolution` (a metric's float32 resolution)
"""

from jaxrep.distances.function_space import (OUTPUT_SPACES, cka_distances,
                                             output_distances,
                                             population_apply)
from jaxrep.distances.numerics import (DEFAULT_BLOCK_SIZE,
                                       DEFAULT_CENTRE_SAMPLE,
                                       DEFAULT_FIXUP_TOL, DEFAULT_MAX_BYTES,
                                       PARAM_METRICS)
from jaxrep.distances.parameter_space import pairwise_distances, updates
from jaxrep.distances.registry import (METRICS, ZEST_REFERENCES,
                                       distance_matrix, model_distances,
                                       resolution)
from jaxrep.distances.ring import working_set_bytes
from jaxrep.distances.zest import (ZEST_FILLS, ZestFit, zest_distances,
                                   zest_fit, zest_signatures)
