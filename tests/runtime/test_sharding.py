"""Sharded (8 forced CPU devices, see conftest.py) == unsharded.

The sub-run, every distance metric (l2, cosine, l1, linf, output, cka, zest),
the memory model and the provider-chunked sub-run.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxrep.population import image_attacks as A

from jaxrep.train.schedule import batch_schedule
from jaxrep.data import datasets as data_lib
from jaxrep.distances import kernels as distances
from jaxrep.runtime import memory
from jaxrep.models import zoo as models
from jaxrep.runtime import sharding
from jaxrep.train import trainer as train
from jaxrep.population import divergence as div_lib
from jaxrep.core.errors import ConfigError

N = 16
K = 5

pytestmark = pytest.mark.skipif(
    jax.device_count() < 8, reason="needs 8 devices: XLA_FLAGS="
    "--xla_force_host_platform_device_count=8 (tests/conftest.py sets it)")


@pytest.fixture(scope="module")
def setup():
  """A mixed digits population (8 BadNets + 8 benign) and its sub-run."""
  ds = data_lib.load_dataset("digits")
  specs = A.population_specs(N, 8, "badnets", num_classes=10)
  behaviour = A.make_behaviour(specs, ds.input_shape, 10)
  model = models.get_model("mlp", 10, ds.input_shape)
  trainer = train.make_trainer(model, train.TrainConfig(),
                               div_lib.DivergenceConfig(),
                               A.make_hooks(behaviour))
  pop = trainer.init(jax.random.key(0), N)
  args = (pop, jnp.asarray(ds.x_train), jnp.asarray(ds.y_train),
          jnp.asarray(batch_schedule(0, 0, K, 32,
                                              len(ds.y_train))),
          train.provider_keys(jax.random.key(1), N),
          div_lib.make_divergence(div_lib.DivergenceConfig(), N), behaviour)
  out, losses = trainer.sub_run(*args)
  return dict(ds=ds, model=model, trainer=trainer, args=args, out=out,
              losses=losses, mesh=sharding.make_mesh(8),
              probe=jnp.asarray(ds.x_test[:64]))


def assert_population_close(a, b):
  """Equal to float32 rounding: replicas differ from a reordered reduction
  by about 1e-7 of the parameters' scale."""
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    scale = np.max(np.abs(x)) + 1e-30
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * scale)


# --------------------------------------------------------------------------
# Sub-run.


def test_sharded_sub_run_is_partitioned_and_matches(setup):
  mesh, trainer = setup["mesh"], setup["trainer"]
  placed = sharding.sub_run_inputs(mesh, *setup["args"])
  compiled = trainer.sub_run.lower(*placed).compile()
  # Each device trains its own providers: not one collective.
  assert sum(sharding.collective_counts(compiled).values()) == 0
  out, losses = trainer.sub_run(*placed)
  for leaf in jax.tree_util.tree_leaves(out):
    assert tuple(leaf.sharding.spec)[:1] == (sharding.PROVIDERS,)
    assert len(leaf.addressable_shards) == 8
    assert leaf.addressable_shards[0].data.shape[0] == N // 8
  assert losses.sharding.spec == P(None, sharding.PROVIDERS)
  assert_population_close(out, setup["out"])
  np.testing.assert_allclose(losses, setup["losses"], rtol=1e-5)
  # The detector's view: distances agree far below any backdoor's distance.
  pop = setup["args"][0]
  d_sh = sharding.pairwise_distances(
      distances.updates(pop.params, out.params), mesh, "l2")
  d_un = distances.pairwise_distances(
      distances.updates(pop.params, setup["out"].params), "l2")
  norm = np.max(np.asarray(d_un))
  np.testing.assert_allclose(d_sh, d_un, rtol=0, atol=1e-5 * norm)


def test_indivisible_population_is_a_config_error(setup):
  mesh = setup["mesh"]
  with pytest.raises(ConfigError, match="providers"):
    sharding.check_divisible(12, mesh)
  with pytest.raises(ConfigError, match="x:"):
    sharding.pairwise_distances(jnp.ones((12, 5)), mesh, "l2")
  with pytest.raises(ConfigError, match="devices"):
    sharding.make_mesh(jax.device_count() + 1)


# --------------------------------------------------------------------------
# Parameter-space distances: the ring.


def rttd_population(seed, n=N, p=2000, spread=1e-6):
  """Benign rows within `spread` of a shared vector, half moved far away."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=p)
  x = base + spread * rng.normal(size=(n, p))
  x[n // 2:] += 0.5 * rng.normal(size=(n - n // 2, p))
  return np.asarray(x, np.float32)


def ref_distances(x, metric):
  """Exact float64 reference on the float32 input."""
  x = np.asarray(x, np.float64)
  if metric == "cosine":
    u = x / np.linalg.norm(x, axis=1, keepdims=True)
    return 0.5 * ((u[:, None] - u[None]) ** 2).sum(-1)
  diff = np.abs(x[:, None] - x[None])
  if metric == "l1":
    return diff.sum(-1)
  if metric == "linf":
    return diff.max(-1)
  return np.sqrt((diff ** 2).sum(-1))


@pytest.mark.parametrize("metric", sharding.METRICS)
@pytest.mark.parametrize("devices,block", [(8, 64), (4, 3)])
def test_ring_matches_unsharded_and_float64(setup, metric, devices, block):
  x = rttd_population(seed=devices)
  tree = {"w": x[:, :1200].reshape(N, 30, 40), "b": x[:, 1200:]}
  mesh = sharding.make_mesh(devices)
  d = np.asarray(sharding.pairwise_distances(tree, mesh, metric,
                                             block_size=block))
  ref = ref_distances(x, metric)
  un = np.asarray(distances.pairwise_distances(tree, metric))
  assert np.array_equal(d, d.T) and np.all(np.diag(d) == 0)
  np.testing.assert_allclose(d, ref, rtol=1e-4, atol=1e-30)
  np.testing.assert_allclose(d, un, rtol=1e-4, atol=1e-30)


def test_ring_nonfinite_provider_is_inf_only_in_its_row(setup):
  x = rttd_population(seed=3)
  x[5, 7] = np.nan
  d = np.asarray(sharding.pairwise_distances(x, setup["mesh"], "l2"))
  others = np.delete(np.arange(N), 5)
  assert np.all(np.isinf(d[5, others])) and d[5, 5] == 0
  ref = ref_distances(x[others], "l2")
  np.testing.assert_allclose(d[np.ix_(others, others)], ref, rtol=1e-4)


def test_ring_never_moves_the_population_except_by_permute(setup):
  """Only the ring's collective-permute carries a provider block [n/d, P];
  the rest (centre row, tiles, per-row stats) is small."""
  n, p = 64, 4096
  mesh = setup["mesh"]
  x = sharding.shard_provider_tree(jnp.ones((n, p)), mesh)
  opts = sharding._ring_opts(n, 8, 4, 64, None, 64 * 2**20, 0.05)
  for metric in sharding.METRICS:
    fn = sharding._ring_fn(mesh, metric, opts, 1)
    centre = sharding.replicate_tree(np.int32(0), mesh)
    ops = sharding.collective_ops(fn.lower([x], centre).compile())
    block = (n // 8) * p * 4
    big = [op for op, size in ops if size >= block]
    assert big and all(op == "collective-permute" for op in big), ops
    small = [size for op, size in ops if op != "collective-permute"]
    assert max(small) <= max(p * 4, 4 * n * n), ops


# --------------------------------------------------------------------------
# Model-based metrics.


@pytest.mark.parametrize("metric", ["output", "cka", "zest"])
def test_model_metrics_match_unsharded(setup, metric):
  model, out, mesh = setup["model"], setup["out"], setup["mesh"]
  probe, key = setup["probe"], jax.random.key(7)
  got = sharding.model_distances(metric, mesh, params=out.params,
                                 model_state=out.model_state,
                                 apply_fn=model.predict,
                                 probe_x=probe[:16] if metric == "zest"
                                 else probe, key=key)
  if metric == "output":
    want = distances.output_distances(model.predict, out.params,
                                      out.model_state, probe)
  elif metric == "cka":
    want = distances.cka_distances(model.predict, out.params,
                                   out.model_state, probe)
  else:
    want = distances.zest_distances(model.predict, out.params,
                                    out.model_state, probe[:16], key)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-12)


# --------------------------------------------------------------------------
# Memory: estimate, plan, chunks.


def test_memory_plan_and_chunked_sub_run(setup):
  trainer, args = setup["trainer"], setup["args"]
  pop, x_train, y_train, _, _, div, behaviour = args
  sizes = memory.sizes_for(trainer, behaviour, div, x_train, y_train,
                           providers=N, batch_size=32, subrun_steps=K)
  est = memory.estimate(sizes)
  assert sizes.params == 4 * models.num_params(pop.params) // N
  assert est["population"] == 2 * N * (sizes.params + sizes.opt_state)
  assert est["peak"] >= est["train_set"] + est["subrun"]
  assert memory.plan(sizes, available=10 * est["peak"]).chunk == N
  # Room for c < n providers in flight (c: the first chunk whose sub-run
  # outweighs the distance working set): chunks of c, same models.
  c = next(c for c in range(1, N)
           if memory.estimate(sizes, c)["subrun"] >= est["distances"])
  room = est["train_set"] + memory.estimate(sizes, c)["subrun"] + 1
  tight = memory.plan(sizes, available=int(room / 0.8) + 2)
  assert tight.chunk == c and tight.num_chunks == -(-N // c) > 1
  out, losses = memory.chunked_sub_run(trainer, *args,
                                       chunk_size=tight.chunk, to_host=True)
  assert isinstance(jax.tree_util.tree_leaves(out)[0], np.ndarray)
  assert_population_close(out, setup["out"])
  np.testing.assert_allclose(losses, setup["losses"], rtol=1e-5)
  # Nothing fits: a clear error naming the field, before any allocation.
  huge_batch = dataclasses.replace(sizes, batch_size=10**6)
  with pytest.raises(ConfigError, match="batch_size: does not fit"):
    memory.plan(huge_batch, available=10 * est["peak"])
  with pytest.raises(ConfigError, match="providers: does not fit"):
    memory.plan(sizes, available=1024)


def test_chunked_sharded_sub_run_matches(setup):
  out, losses = memory.chunked_sub_run(setup["trainer"], *setup["args"],
                                       chunk_size=8, mesh=setup["mesh"])
  assert_population_close(out, setup["out"])
  np.testing.assert_allclose(losses, setup["losses"], rtol=1e-5)
  with pytest.raises(ConfigError, match="chunk_size"):
    memory.chunked_sub_run(setup["trainer"], *setup["args"], chunk_size=6,
                           mesh=setup["mesh"])


def test_device_available_bytes_is_positive():
  assert memory.host_available_bytes() > 0
  assert 0 < memory.device_available_bytes() <= memory.host_available_bytes()


def test_protocol_on_8_devices_matches_one_device():
  from jaxrep.data import datasets as data_lib
  from jaxrep.protocol import loop as protocol
  ds = data_lib.load_dataset("digits")
  base = dict(providers=8, malicious=2, steps=40, subrun_steps=20,
              replicated=2, poison_rate=0.3, attack_check=False)
  one = protocol.run(protocol.SimConfig.from_flat(**base), progress=False, dataset=ds)
  eight = protocol.run(protocol.SimConfig.from_flat(devices=8, **base), progress=False,
                       dataset=ds)
  np.testing.assert_array_equal(one.flags, eight.flags)
  assert eight.flags[:2].all() and not eight.flags[2:].any()
  for a, b in zip(one.matrices, eight.matrices):
    far = a > 1e-3
    np.testing.assert_allclose(b[far], a[far], rtol=1e-4)
    assert np.all(b[~far] < 1e-3)
