"""Provider blocks inside the sub-run (`jaxrep.train.trainer`): the block
size rule, and blocked training giving the unblocked models."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import models
from jaxrep.core.errors import ConfigError
from jaxrep.population import divergence as div_lib
from jaxrep.train import trainer as train
from jaxrep.train.schedule import batch_schedule


def test_block_size_divides_and_respects_devices():
  assert train.block_size(16, 1, 1) == 1
  assert train.block_size(16, 1, 5) == 4          # largest divisor <= 5
  assert train.block_size(16, 1, 100) == 16
  assert train.block_size(12, 1, 5) == 4
  assert train.block_size(7, 1, 3) == 1           # prime n: one at a time
  assert train.block_size(16, 8, 1) == 8          # one per device per block
  assert train.block_size(32, 8, 3) == 16         # 2 per device (4 = 2 x 2)
  assert train.block_size(12, 8, 1) == 12         # does not split: mesh check
  with pytest.raises(ConfigError, match="provider_block"):
    train.block_size(16, 1, 0)


def test_auto_block_follows_the_step_size_on_cpu_only():
  big = train.CPU_BLOCK_BYTES
  assert train.auto_block(big * 3, "cpu") == 1
  assert train.auto_block(big // 16, "cpu") == 16
  assert train.auto_block(big // 16, "gpu") >= 2**30
  assert train.auto_block(big // 16, "tpu") >= 2**30


def _sub_run(ds, block, n, behaviour=None, k=6):
  model = models.get_model("mlp", ds.num_classes, ds.input_shape)
  trainer = train.make_trainer(model, train.TrainConfig(),
                               div_lib.DivergenceConfig(grad_noise=1e-3),
                               provider_block=block)
  pop = trainer.init(jax.random.key(0), n)
  schedule = jnp.asarray(batch_schedule(0, 0, k, 32, ds.x_train.shape[0]))
  keys = train.provider_keys(jax.random.key(3), n)
  div = div_lib.make_divergence(div_lib.DivergenceConfig(grad_noise=1e-3), n)
  return trainer.sub_run(pop, jnp.asarray(ds.x_train),
                         jnp.asarray(ds.y_train), schedule, keys, div,
                         jnp.zeros(n) if behaviour is None else behaviour)


def test_blocked_sub_run_gives_each_provider_its_own_model(digits):
  """Blocks of 1, 2 and 3 (and the whole population) return every provider
  the model it trains alone: the providers are not mixed up by the block
  layout (provider p = slot p // m of block p % m) and the losses keep their
  order. Equal to float32 rounding: XLA may choose other kernels for another
  number of providers side by side."""
  n = 6
  ref, ref_loss = _sub_run(digits, n, n)
  for block in (1, 2, 3):
    out, loss = _sub_run(digits, block, n)
    assert loss.shape == ref_loss.shape
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(out),
                    jax.tree_util.tree_leaves(ref)):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  # The providers really differ (per-provider keys and noise), so a
  # permutation of them would have been caught above.
  w = np.asarray(jax.tree_util.tree_leaves(ref.params)[0])
  assert np.abs(w[0] - w[1]).max() > 1e-6


def test_blocks_of_one_make_a_provider_independent_of_n(digits):
  """With a block of one, provider 0 computes the same bits whether it
  trains alone (the protocol's unchecked sub-run, `train_one`), among 2 or
  among 6 providers."""
  one, _ = _sub_run(digits, 1, 1)
  two, _ = _sub_run(digits, 1, 2)
  six, _ = _sub_run(digits, 1, 6)
  for a, b, c in zip(jax.tree_util.tree_leaves(one),
                     jax.tree_util.tree_leaves(two),
                     jax.tree_util.tree_leaves(six)):
    np.testing.assert_array_equal(np.asarray(a)[0], np.asarray(c)[0])
    np.testing.assert_array_equal(np.asarray(b)[0], np.asarray(c)[0])


def test_bad_provider_block_is_a_config_error():
  model = models.get_model("mlp", 10, (8, 8, 1))
  with pytest.raises(ConfigError, match="provider_block"):
    train.make_trainer(model, train.TrainConfig(), provider_block=-1)


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices "
                    "(tests/conftest.py sets the XLA flag)")
def test_blocks_over_a_mesh_stay_on_their_devices(digits):
  """16 providers over 8 devices in blocks of one per device: two blocks,
  no collective, and the unsharded models."""
  from jaxrep.runtime import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  n, k = 16, 4
  model = models.get_model("mlp", digits.num_classes, digits.input_shape)
  cfg = div_lib.DivergenceConfig(grad_noise=1e-3)
  trainer = train.make_trainer(model, train.TrainConfig(), cfg,
                               provider_block=1)
  args = (trainer.init(jax.random.key(0), n), jnp.asarray(digits.x_train),
          jnp.asarray(digits.y_train),
          jnp.asarray(batch_schedule(0, 0, k, 32, digits.x_train.shape[0])),
          train.provider_keys(jax.random.key(3), n),
          div_lib.make_divergence(cfg, n), jnp.zeros(n))
  mesh = mesh_lib.make_mesh(8)
  placed = mesh_lib.sub_run_inputs(mesh, *args)
  assert trainer.provider_block(n, 8, args) == 8
  compiled = trainer.sub_run.lower(*placed, devices=8).compile()
  assert sum(mesh_lib.collective_counts(compiled).values()) == 0
  out, losses = mesh_lib.sharded_sub_run(trainer, mesh, *args)
  ref, ref_losses = trainer.sub_run(*args)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(out),
                  jax.tree_util.tree_leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
