"""Tests for jaxrep.models.registry: get_model, Model, num_params."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxrep import models
from jaxrep.core.errors import ConfigError

C, L, V = 5, 24, 50


def test_names():
  assert models.MODELS == models.IMAGE_MODELS + models.TEXT_MODELS
  assert set(models.IMAGE_MODELS) == {"mlp", "cnn", "resnet20"}
  assert set(models.TEXT_MODELS) == {"text_cnn", "text_transformer"}


@pytest.mark.parametrize("name,count", [
    ("mlp", 177925), ("cnn", 59621), ("resnet20", 272149),
    ("text_cnn", 53509), ("text_transformer", 72133)])
def test_every_model_keeps_its_size_and_signature(name, count):
  text = name in models.TEXT_MODELS
  model = models.get_model(name, C, (L,) if text else (12, 12, 3),
                           vocab_size=V if text else None)
  assert model.is_text == text
  params, state = jax.eval_shape(model.init, jax.random.key(3))
  assert models.num_params(params) == count
  assert set(state) == ({"batch_stats"} if name == "resnet20" else set())
  x = (jnp.ones((4, L), jnp.int32) if text else jnp.ones((4, 12, 12, 3)))
  logits, features = jax.eval_shape(model.predict, params, state, x)
  assert logits.shape == (4, C) and features.shape[0] == 4
  (logits, _), new_state = jax.eval_shape(
      lambda p, s: model.apply(p, s, x, train=True), params, state)
  assert logits.shape == (4, C)
  assert (jax.tree_util.tree_structure(new_state) ==
          jax.tree_util.tree_structure(state))


def test_predict_is_apply_in_inference_mode():
  model = models.get_model("mlp", C, (4, 4, 1))
  params, state = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (3, 4, 4, 1))
  out, same = model.apply(params, state, x)
  assert same is state
  for a, b in zip(out, model.predict(params, state, x)):
    np.testing.assert_array_equal(a, b)


def test_apply_with_a_traced_bf16_flag_under_vmap():
  model = models.get_model("mlp", C, (4, 4, 1))
  params, state = model.init(jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (3, 4, 4, 1))
  stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), params)
  run = jax.vmap(lambda p, f: model.apply(p, state, x, precision=f)[0][0])
  both = run(stacked, jnp.array([False, True]))
  np.testing.assert_array_equal(both[0], model.predict(params, state, x)[0])
  half = model.apply(params, state, x, precision=jnp.bool_(True))[0][0]
  np.testing.assert_allclose(both[1], half, rtol=1e-6, atol=1e-7)
  assert not np.array_equal(both[0], both[1])


def test_unknown_model_and_bad_class_count():
  with pytest.raises(ConfigError, match="^model: .*mlp, cnn"):
    models.get_model("vit", 10, (8, 8, 1))
  with pytest.raises(ConfigError, match="^num_classes:"):
    models.get_model("mlp", 1, (8, 8, 1))


def test_text_model_arguments_are_checked():
  with pytest.raises(ConfigError, match="vocab_size"):
    models.get_model("text_cnn", C, (L,))
  with pytest.raises(ConfigError, match="vocab_size"):
    models.get_model("text_transformer", C, (L,), vocab_size=2)
  with pytest.raises(ConfigError, match="vocab_size"):
    models.get_model("text_cnn", C, (L,), vocab_size=True)
  with pytest.raises(ConfigError, match="input_shape"):
    models.get_model("text_cnn", C, (8, 8, 1), vocab_size=V)
  with pytest.raises(ConfigError, match="input_shape"):
    models.get_model("cnn", C, (L,))
  with pytest.raises(ConfigError, match="vocab_size"):
    models.get_model("mlp", C, (8, 8, 1), vocab_size=V)
  assert models.get_model("mlp", C, (8, 8, 1)).vocab_size is None
  model = models.get_model("text_cnn", C, [np.int64(L)], np.int64(V))
  assert model.input_shape == (L,) and type(model.vocab_size) is int
