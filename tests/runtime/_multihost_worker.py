"""One process of the two-process test in tests/runtime/test_multihost.py.

    JAXREP_COORDINATOR=localhost:PORT JAXREP_NUM_PROCESSES=2 \
    JAXREP_PROCESS_ID=i XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    JAX_PLATFORMS=cpu python tests/runtime/_multihost_worker.py OUT.npz

Every process joins the distributed run, trains the sub-run with the
providers split over the 8 devices of both processes and computes the
distances; process 0 writes the gathered results to OUT.npz.
`compute(mesh)` is also what the test runs in a single process.
"""

import sys

K = 3
METRICS = ("l2", "cosine", "l1", "linf", "output")


def compute(mesh) -> dict:
  """Sharded sub-run + distances on `mesh`; numpy results."""
  import jax
  import jax.numpy as jnp

  import _population
  from jaxrep import data
  from jaxrep import distances
  from jaxrep.runtime import mesh as mesh_lib

  ds = data.load_dataset("digits")
  model, trainer, args = _population.sub_run_args(ds, K)
  out, losses = mesh_lib.sharded_sub_run(trainer, mesh, *args)
  result = {"losses": mesh_lib.to_host(losses)}
  for i, leaf in enumerate(jax.tree_util.tree_leaves(out.params)):
    result[f"param{i}"] = mesh_lib.to_host(leaf)
  start = mesh_lib.replicate_tree(args[0].params, mesh)
  probe = jnp.asarray(ds.x_test[:64])
  for metric in METRICS:
    result[metric] = distances.model_distances(
        metric, model.predict, start, out.params, out.model_state, probe,
        jax.random.key(2), mesh=mesh)
  return result


def main(path: str) -> None:
  from jaxrep.runtime import distributed
  assert distributed.initialize(), "expected a multi-process run"
  import jax
  import numpy as np

  from jaxrep.runtime import mesh as mesh_lib
  assert jax.process_count() == 2, jax.process_count()
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  result = compute(mesh_lib.make_mesh())
  if distributed.is_coordinator():
    np.savez(path, **result)
  distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1])
