"""The memory model and plan, and the provider-chunked sub-run (one shot or
over the 8 forced CPU devices) that gives the same models."""

import dataclasses

import jax
import numpy as np
import pytest

from jaxrep import distances
from jaxrep import models
from jaxrep.core.errors import ConfigError
from jaxrep.runtime import memory
from jaxrep.runtime import mesh as mesh_lib


def test_memory_plan_and_chunked_sub_run(subrun, assert_population_close):
  trainer, args = subrun["trainer"], subrun["args"]
  pop, x_train, y_train, _, _, div, behaviour = args
  n, k = subrun["losses"].shape[1], subrun["losses"].shape[0]
  sizes = memory.sizes_for(trainer, behaviour, div, x_train, y_train,
                           providers=n, batch_size=32, subrun_steps=k)
  sizes = dataclasses.replace(
      sizes, distance_bytes=distances.working_set_bytes(n, 1, sizes.params))
  est = memory.estimate(sizes)
  assert sizes.params == 4 * models.num_params(pop.params) // n
  assert est["population"] == 2 * n * (sizes.params + sizes.opt_state)
  assert est["distances"] == sizes.distance_bytes > 3 * n * sizes.params
  assert est["peak"] >= est["train_set"] + est["subrun"]
  assert memory.plan(sizes, available=10 * est["peak"]).chunk == n
  # Room for c < n providers in flight (c: the first chunk whose sub-run
  # outweighs the distance working set): chunks of c, same models.
  c = next(c for c in range(1, n)
           if memory.estimate(sizes, c)["subrun"] >= est["distances"])
  room = est["train_set"] + memory.estimate(sizes, c)["subrun"] + 1
  tight = memory.plan(sizes, available=int(room / 0.8) + 2)
  assert tight.chunk == c and tight.num_chunks == -(-n // c) > 1
  out, losses = memory.chunked_sub_run(trainer, *args,
                                       chunk_size=tight.chunk, to_host=True)
  assert isinstance(jax.tree_util.tree_leaves(out)[0], np.ndarray)
  assert_population_close(out, subrun["out"])
  np.testing.assert_allclose(losses, subrun["losses"], rtol=1e-5)
  # Nothing fits: a clear error naming the field, before any allocation.
  huge_batch = dataclasses.replace(sizes, batch_size=10**6)
  with pytest.raises(ConfigError, match="batch_size: does not fit"):
    memory.plan(huge_batch, available=10 * est["peak"])
  with pytest.raises(ConfigError, match="providers: does not fit"):
    memory.plan(sizes, available=1024)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_chunked_sharded_sub_run_matches(subrun, assert_population_close):
  mesh = mesh_lib.make_mesh(8)
  out, losses = memory.chunked_sub_run(subrun["trainer"], *subrun["args"],
                                       chunk_size=8, mesh=mesh)
  assert_population_close(out, subrun["out"])
  np.testing.assert_allclose(losses, subrun["losses"], rtol=1e-5)
  with pytest.raises(ConfigError, match="chunk_size"):
    memory.chunked_sub_run(subrun["trainer"], *subrun["args"], chunk_size=6,
                           mesh=mesh)


def test_device_available_bytes_is_positive():
  assert memory.host_available_bytes() > 0
  assert 0 < memory.device_available_bytes() <= memory.host_available_bytes()
