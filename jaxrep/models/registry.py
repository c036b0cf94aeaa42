"""Models by name: `get_model` returns a `Model`, pure functions over params.

Every model maps a batch of inputs to `(logits [B, classes], features [B, d])`,
where `features` are the penultimate activations (used by the CKA metric).
Image models (IMAGE_MODELS) take float images [B, H, W, C]; text models
(TEXT_MODELS) take int32 token ids [B, L], right-padded with id 0 (`<pad>`),
and need the vocabulary size.

linen (not nnx) is used because a population is a pytree of parameters with a
leading provider axis and the training step is a pure function vmapped over it;
linen's `init`/`apply` is exactly that shape.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxrep.core.errors import ConfigError
from jaxrep.core.validate import is_int
from jaxrep.models.image import CNN, MLP, ResNet20
from jaxrep.models.text import TextCNN, TextTransformer

IMAGE_MODELS = ("mlp", "cnn", "resnet20")
TEXT_MODELS = ("text_cnn", "text_transformer")
MODELS = IMAGE_MODELS + TEXT_MODELS

_REGISTRY: dict[str, Callable[..., nn.Module]] = {
    "mlp": MLP,
    "cnn": CNN,
    "resnet20": ResNet20,
    "text_cnn": TextCNN,
    "text_transformer": TextTransformer,
}


@dataclasses.dataclass(frozen=True)
class Model:
  """A named model with pure functions over (params, model_state).

  Attributes:
    name: one of MODELS.
    num_classes: number of output classes.
    input_shape: (H, W, C) of one image, or (L,) of one token sequence.
    vocab_size: vocabulary size of a text model (None for image models).
  """
  name: str
  num_classes: int
  input_shape: tuple[int, ...]
  vocab_size: int | None = None

  @property
  def is_text(self) -> bool:
    return self.name in TEXT_MODELS

  def module(self, precision=None) -> nn.Module:
    """The flax module; `precision` is the operand precision (mantissa bits,
    per provider) of `jaxrep.models.layers`."""
    kwargs = {"num_classes": self.num_classes, "precision": precision}
    if self.is_text:
      kwargs["vocab_size"] = self.vocab_size
    if self.name == "text_transformer":
      kwargs["max_len"] = self.input_shape[0]
    return _REGISTRY[self.name](**kwargs)

  def init(self, key) -> tuple[Any, Any]:
    """Returns (params, model_state) of one freshly initialised model."""
    dtype = jnp.int32 if self.is_text else jnp.float32
    x = jnp.zeros((1, *self.input_shape), dtype)
    variables = self.module().init(key, x, train=False)
    params = variables["params"]
    model_state = {k: v for k, v in variables.items() if k != "params"}
    return params, model_state

  def apply(self, params, model_state, x, *, train=False,
            precision=None):
    """Returns ((logits, features), new_model_state) for one provider."""
    variables = {"params": params, **model_state}
    module = self.module(precision)
    if train and model_state:
      out, updates = module.apply(variables, x, train=True,
                                  mutable=list(model_state))
      return out, {**model_state, **updates}
    return module.apply(variables, x, train=train), model_state

  def predict(self, params, model_state, x):
    """(logits, features) in inference mode: the signature the metrics use."""
    return self.apply(params, model_state, x, train=False)[0]


def get_model(name: str, num_classes: int, input_shape: Sequence[int],
              vocab_size: int | None = None) -> Model:
  """Looks a model up by name; raises ConfigError for unusable arguments.

  Args:
    name: one of MODELS.
    num_classes: number of output classes (>= 2).
    input_shape: (H, W, C) for IMAGE_MODELS, (L,) for TEXT_MODELS.
    vocab_size: number of token ids (>= 3: <pad>, <unk> and a word) for
      TEXT_MODELS; must be None for IMAGE_MODELS.
  """
  if name not in _REGISTRY:
    raise ConfigError(f"model: unknown model {name!r}; choose one of "
                      f"{', '.join(MODELS)}")
  if num_classes < 2:
    raise ConfigError(f"num_classes: must be >= 2, got {num_classes}")
  shape = tuple(input_shape)
  if name in TEXT_MODELS:
    if len(shape) != 1 or int(shape[0]) != shape[0] or shape[0] < 1:
      raise ConfigError(f"input_shape: text model {name!r} takes token "
                        f"sequences of shape (L,) with L >= 1, got {shape}; "
                        f"for images use one of {', '.join(IMAGE_MODELS)}")
    if not is_int(vocab_size) or vocab_size < 3:
      raise ConfigError(f"vocab_size: text model {name!r} needs an integer "
                        f"vocabulary size >= 3 (<pad>, <unk> and at least "
                        f"one word), got {vocab_size!r}")
    return Model(name, int(num_classes), (int(shape[0]),), int(vocab_size))
  if len(shape) != 3 or min(shape) < 1:
    raise ConfigError(f"input_shape: image model {name!r} takes (H, W, C) "
                      f"with positive sizes, got {shape}; for token "
                      f"sequences use one of {', '.join(TEXT_MODELS)}")
  if vocab_size is not None:
    raise ConfigError(f"vocab_size: image model {name!r} takes no "
                      f"vocabulary, got {vocab_size!r}; for text use one of "
                      f"{', '.join(TEXT_MODELS)}")
  return Model(name, int(num_classes), tuple(int(s) for s in shape))


def num_params(params) -> int:
  """Number of scalars in a parameter pytree."""
  return sum(int(p.size) for p in jax.tree_util.tree_leaves(params))
