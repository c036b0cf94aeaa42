"""The in-memory `Dataset` every source yields, and what the sources share.

Every image source yields a `Dataset` of float32 images in [0, 1] with shape
[N, H, W, C] and int32 labels; every text source a `Dataset` of int32 token
ids [N, L] with its `vocab` (see `jaxrep.data.text`). This module also holds
the argument checks, the example-count limit and the deterministic stratified
split that several sources use.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import require
from jaxrep.core.validate import is_int

DEFAULT_DATASET = "digits"

# Names shown in help texts. Any other TFDS image-classification builder name
# is accepted by `jaxrep.data.load_dataset` as well.
DATASETS = ("digits", "idx", "fashion_mnist_idx", "mnist", "fashion_mnist",
            "kmnist", "cifar10", "svhn_cropped")


@dataclasses.dataclass(frozen=True)
class Dataset:
  """An image- or text-classification dataset held in memory.

  Attributes:
    name: Name the dataset was loaded under.
    x_train: Images: float32 [N, H, W, C] with values in [0, 1]. Text: int32
      [N, L] token ids (0 = "<pad>", 1 = "<unk>", right-padded).
    y_train: int32 [N] training labels in [0, num_classes).
    x_test: float32 [M, H, W, C] test images, or int32 [M, L] token ids.
    y_test: int32 [M] test labels in [0, num_classes).
    num_classes: Number of classes.
    vocab: Text only: vocab[i] is the word of token id i (see
      `jaxrep.data.text`); None for images.
  """
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int
  vocab: tuple[str, ...] | None = None

  @property
  def modality(self) -> str:
    """"text" when the dataset has a vocabulary, else "image"."""
    return "text" if self.vocab is not None else "image"

  @property
  def input_shape(self) -> tuple[int, ...]:
    """Shape of one example: (H, W, C) of an image, (L,) of a text."""
    return tuple(int(d) for d in self.x_train.shape[1:])

  def probe_split(self, probe_size: int, batch_size: int = 1
                  ) -> tuple[int, np.ndarray]:
    """Holds out the last `probe_size` training examples as probe inputs.

    Returns (t, probe): training batches may draw only from the first t =
    N - probe_size training examples, and probe = x_train[t:] are inputs
    nobody trains on, for comparing models by their outputs (not the test
    set that results are scored on).

    Raises:
      ConfigError: probe_size is not an integer >= 1, or leaves fewer than
        `batch_size` examples to train on.
    """
    n = int(self.x_train.shape[0])
    require(is_int(probe_size) and probe_size >= 1, "probe_size",
            f"must be an integer >= 1, got {probe_size!r}")
    require(n - probe_size >= batch_size, "probe_size",
            f"holding out {probe_size} of the {n} training examples as "
            f"probe inputs leaves {n - probe_size}, fewer than a batch of "
            f"{batch_size}")
    return n - probe_size, self.x_train[n - probe_size:]


def check_name(name, examples) -> str:
  """A dataset name without surrounding blanks.

  Raises:
    ConfigError: `name` is not a non-empty str; the message shows `examples`.
  """
  require(isinstance(name, str) and name.strip() != "", "dataset",
          f"must be a non-empty name such as one of {', '.join(examples)}; "
          f"got {name!r}")
  return name.strip()


def check_path(value, field: str) -> str | None:
  """An optional path argument as str (None stays None).

  Raises:
    ConfigError: `value` is neither None, a str nor an os.PathLike.
  """
  require(value is None or isinstance(value, (str, os.PathLike)), field,
          f"must be a path or None, got {value!r}")
  return None if value is None else os.fspath(value)


def check_limit(value, field: str) -> None:
  """Validates an optional positive example count."""
  require(value is None or (is_int(value) and value > 0), field,
          f"must be a positive integer or None, got {value!r}")


def take(x, limit: int | None):
  """The first `limit` items of `x` (all of them when limit is None)."""
  return x if limit is None else x[:limit]


def stratified_split(labels: np.ndarray, test_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic stratified split of example indices.

  Each class contributes round(test_fraction * count) randomly chosen examples
  to the test set. Both index arrays are returned sorted, so the examples keep
  their original relative order.

  Args:
    labels: int [N] labels.
    test_fraction: Fraction of each class put in the test set.
    seed: Seed of the permutation.

  Returns:
    (train_indices, test_indices), int64 arrays.
  """
  rng = rng_lib.split(seed)
  test = []
  for label in np.unique(labels):
    members = np.flatnonzero(labels == label)
    count = int(round(test_fraction * len(members)))
    test.append(rng.permutation(members)[:count])
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test
