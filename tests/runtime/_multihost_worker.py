"""One process of the two-process test in tests/test_multihost.py.

    JAXREP_COORDINATOR=localhost:PORT JAXREP_NUM_PROCESSES=2 \
    JAXREP_PROCESS_ID=i XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    JAX_PLATFORMS=cpu python tests/runtime/_multihost_worker.py OUT.npz

Every process joins the distributed run, trains the sub-run with the
providers split over the 8 devices of both processes and computes the
distances; process 0 writes the gathered results to OUT.npz.
`compute(mesh)` is also what the test runs in a single process.
"""

import sys

N = 16
K = 3
METRICS = ("l2", "cosine", "l1", "linf", "output")


def compute(mesh) -> dict:
  """Sharded sub-run + distances on `mesh`; numpy results."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxrep.population import image_attacks as A

  from jaxrep.train.schedule import batch_schedule
  from jaxrep.data import datasets as data_lib
  from jaxrep.distances import kernels as distances
  from jaxrep.models import zoo as models
  from jaxrep.runtime import sharding
  from jaxrep.train import trainer as train
  from jaxrep.population import divergence as div_lib

  ds = data_lib.load_dataset("digits")
  specs = A.population_specs(N, 8, "badnets", num_classes=10)
  behaviour = A.make_behaviour(specs, ds.input_shape, 10)
  model = models.get_model("mlp", 10, ds.input_shape)
  trainer = train.make_trainer(model, train.TrainConfig(),
                               div_lib.DivergenceConfig(),
                               A.make_hooks(behaviour))
  pop = trainer.init(jax.random.key(0), N)
  schedule = batch_schedule(0, 0, K, 32, len(ds.y_train))
  keys = train.provider_keys(jax.random.key(1), N)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(), N)
  out, losses = sharding.sharded_sub_run(trainer, mesh, pop, ds.x_train,
                                         ds.y_train, schedule, keys, div,
                                         behaviour)
  result = {"losses": sharding.to_host(losses)}
  for i, leaf in enumerate(jax.tree_util.tree_leaves(out.params)):
    result[f"param{i}"] = sharding.to_host(leaf)
  start = sharding.replicate_tree(pop.params, mesh)
  for metric in METRICS:
    d = sharding.model_distances(
        metric, mesh, start_params=start, params=out.params,
        model_state=out.model_state, apply_fn=model.predict,
        probe_x=jnp.asarray(ds.x_test[:64]))
    result[metric] = sharding.to_host(d)
  del np, distances
  return result


def main(path: str) -> None:
  from jaxrep.runtime import distributed
  assert distributed.initialize(), "expected a multi-process run"
  import jax
  import numpy as np

  from jaxrep.runtime import sharding
  assert jax.process_count() == 2, jax.process_count()
  assert jax.device_count() == 8 and jax.local_device_count() == 4
  result = compute(sharding.make_mesh())
  if distributed.is_coordinator():
    np.savez(path, **result)
  distributed.shutdown()


if __name__ == "__main__":
  main(sys.argv[1])
