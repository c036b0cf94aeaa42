"""Tests for jaxrep.models.image: MLP, CNN and ResNet20."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep.models import image


def _shapes(module, x):
  """(parameter shapes, (logits, features) shapes), without computing."""
  variables = jax.eval_shape(module.init, jax.random.key(0), x)
  out = jax.eval_shape(module.apply, variables, x)
  shapes = jax.tree_util.tree_map(lambda a: a.shape, variables["params"])
  return shapes, tuple(a.shape for a in out)


@pytest.mark.parametrize("module,width", [
    (image.MLP(num_classes=7), 256),
    (image.CNN(num_classes=7), 64),
    (image.ResNet20(num_classes=7), 64),
])
def test_outputs_logits_and_penultimate_features(module, width):
  _, out = _shapes(module, jnp.ones((5, 12, 12, 3)))
  assert out == ((5, 7), (5, width))


def test_parameter_layout():
  """Parameter names are what checkpoints store; they must not drift."""
  x = jnp.ones((1, 8, 8, 1))
  mlp, _ = _shapes(image.MLP(num_classes=10), x)
  assert {k: v["kernel"] for k, v in mlp.items()} == {
      "Dense_0": (64, 256), "Dense_1": (256, 256), "Dense_2": (256, 10)}
  cnn, _ = _shapes(image.CNN(num_classes=10), x)
  assert {k: v["kernel"] for k, v in cnn.items()} == {
      "Conv_0": (5, 5, 1, 16), "Conv_1": (5, 5, 16, 32),
      "Dense_0": (128, 128), "Dense_1": (128, 64), "Dense_2": (64, 10)}
  resnet, _ = _shapes(image.ResNet20(num_classes=10), x)
  assert sorted(resnet) == ["BatchNorm_0", "Conv_0", "Dense_0"] + [
      f"_BasicBlock_{i}" for i in range(9)]
  assert sorted(resnet["_BasicBlock_3"]) == [      # Downsampling block.
      "BatchNorm_0", "BatchNorm_1", "BatchNorm_2", "Conv_0", "Conv_1",
      "Conv_2"]


def test_cnn_skips_pooling_below_two_pixels():
  params, _ = _shapes(image.CNN(num_classes=3), jnp.ones((2, 2, 2, 1)))
  assert params["Dense_0"]["kernel"] == (32, 128)  # 2x2 -> pool -> 1x1.


def test_resnet_batch_stats_update_only_in_training():
  module = image.ResNet20(num_classes=4, widths=(4, 8, 8),
                          blocks_per_stage=1)
  x = jax.random.uniform(jax.random.key(1), (6, 8, 8, 3))
  variables = jax.jit(module.init)(jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"}
  train = jax.jit(lambda v, x: module.apply(v, x, train=True,
                                            mutable=["batch_stats"]))
  _, updates = train(variables, x)
  before = jax.tree_util.tree_leaves(variables["batch_stats"])
  after = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(not np.array_equal(a, b) for a, b in zip(before, after))
  # Inference uses the running statistics: the other examples do not matter.
  infer = jax.jit(module.apply)
  other = x.at[1:].set(1.0 - x[1:])
  np.testing.assert_allclose(infer(variables, x)[0][0],
                             infer(variables, other)[0][0], rtol=1e-5,
                             atol=1e-6)


@pytest.mark.parametrize("cls", [image.MLP, image.CNN])
def test_bf16_flag_changes_outputs_slightly(cls):
  x = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
  variables = cls(num_classes=5).init(jax.random.key(0), x)
  default = cls(num_classes=5).apply(variables, x)[0]
  full = cls(num_classes=5, precision=jnp.bool_(False)).apply(variables, x)[0]
  half = cls(num_classes=5, precision=jnp.bool_(True)).apply(variables, x)[0]
  np.testing.assert_array_equal(full, default)
  diff = float(jnp.max(jnp.abs(full - half)))
  assert 0 < diff < 0.05 * float(jnp.max(jnp.abs(full)))
