"""The provider axis on a mesh (8 forced CPU devices, see conftest.py):
the sharded sub-run is partitioned without collectives and equals the
unsharded one; the protocol on 8 devices flags what it flags on one."""

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrep import distances
from jaxrep.config import SimConfig
from jaxrep.core.errors import ConfigError
from jaxrep.runtime import mesh as mesh_lib

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS="
    "--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")


def test_sharded_sub_run_is_partitioned_and_matches(subrun,
                                                    assert_population_close):
  mesh, trainer = mesh_lib.make_mesh(8), subrun["trainer"]
  placed = mesh_lib.sub_run_inputs(mesh, *subrun["args"])
  compiled = trainer.sub_run.lower(*placed, devices=8).compile()
  # Each device trains its own providers: not one collective.
  assert sum(mesh_lib.collective_counts(compiled).values()) == 0
  out, losses = trainer.sub_run(*placed, devices=8)
  n = losses.shape[1]
  for leaf in jax.tree_util.tree_leaves(out):
    assert tuple(leaf.sharding.spec)[:1] == (mesh_lib.PROVIDERS,)
    assert len(leaf.addressable_shards) == 8
    assert leaf.addressable_shards[0].data.shape[0] == n // 8
  assert losses.sharding.spec == P(None, mesh_lib.PROVIDERS)
  assert_population_close(out, subrun["out"])
  np.testing.assert_allclose(losses, subrun["losses"], rtol=1e-5)
  # The detector's view: distances agree far below any backdoor's distance.
  start = subrun["args"][0].params
  d_sh = distances.pairwise_distances(
      distances.updates(start, out.params), "l2", mesh=mesh)
  d_un = distances.pairwise_distances(
      distances.updates(start, subrun["out"].params), "l2")
  norm = np.max(np.asarray(d_un))
  np.testing.assert_allclose(d_sh, d_un, rtol=0, atol=1e-5 * norm)


def test_indivisible_population_is_a_config_error():
  mesh = mesh_lib.make_mesh(8)
  with pytest.raises(ConfigError, match="providers"):
    mesh_lib.check_divisible(12, mesh)
  with pytest.raises(ConfigError, match="devices"):
    mesh_lib.make_mesh(jax.device_count() + 1)


def test_protocol_on_8_devices_matches_one_device(digits):
  from jaxrep import protocol  # pylint: disable=g-import-not-at-top
  base = dict(providers=8, malicious=2, steps=40, subrun_steps=20,
              replicated=2, poison_rate=0.3, attack_check=False)
  one = protocol.run(SimConfig.from_flat(**base), progress=False,
                     dataset=digits)
  eight = protocol.run(SimConfig.from_flat(devices=8, **base), progress=False,
                       dataset=digits)
  np.testing.assert_array_equal(one.flags, eight.flags)
  np.testing.assert_array_equal(eight.flags, eight.malicious)
  for a, b in zip(one.matrices, eight.matrices):
    far = a > 1e-3
    np.testing.assert_allclose(b[far], a[far], rtol=1e-4)
    assert np.all(b[~far] < 1e-3)
