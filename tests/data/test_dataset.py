"""Tests for jaxrep.data.dataset: the Dataset class and the shared helpers."""

import pathlib

import numpy as np
import pytest

from jaxrep.core.errors import ConfigError
from jaxrep.data import dataset


def test_dataset_is_frozen(digits):
  with pytest.raises(Exception):
    digits.num_classes = 3  # type: ignore[misc]


def test_modality_and_input_shape():
  x = np.zeros((5, 4, 3, 2), np.float32)
  y = np.zeros(5, np.int32)
  image = dataset.Dataset("a", x, y, x, y, 2)
  assert image.modality == "image" and image.input_shape == (4, 3, 2)
  tokens = np.zeros((5, 7), np.int32)
  text = dataset.Dataset("b", tokens, y, tokens, y, 2, vocab=("<pad>",))
  assert text.modality == "text" and text.input_shape == (7,)


def test_check_name_strips_and_rejects_empty():
  assert dataset.check_name("  digits ", ("x",)) == "digits"
  for bad in ("", "   ", None, 3):
    with pytest.raises(ConfigError, match="^dataset: .*one of x, y"):
      dataset.check_name(bad, ("x", "y"))


def test_check_path():
  assert dataset.check_path(None, "data_dir") is None
  assert dataset.check_path(pathlib.Path("/a/b"), "data_dir") == "/a/b"
  with pytest.raises(ConfigError, match="^cache_dir:"):
    dataset.check_path(3, "cache_dir")


@pytest.mark.parametrize("value", [0, -3, 1.5, True, "5"])
def test_check_limit_rejects(value):
  with pytest.raises(ConfigError, match="^max_train:"):
    dataset.check_limit(value, "max_train")


def test_check_limit_accepts_and_take():
  for value in (None, 1, np.int64(7)):
    dataset.check_limit(value, "max_test")
  assert dataset.take((1, 2, 3), None) == (1, 2, 3)
  np.testing.assert_array_equal(dataset.take(np.arange(5), 2), [0, 1])


def test_stratified_split_is_deterministic_disjoint_and_stratified():
  labels = np.repeat(np.arange(3), [10, 20, 5])
  train, test = dataset.stratified_split(labels, 0.2, seed=0)
  again = dataset.stratified_split(labels, 0.2, seed=0)
  np.testing.assert_array_equal(train, again[0])
  np.testing.assert_array_equal(test, again[1])
  assert np.all(np.diff(train) > 0) and np.all(np.diff(test) > 0)
  assert not set(train) & set(test)
  assert len(train) + len(test) == len(labels)
  assert np.bincount(labels[test]).tolist() == [2, 4, 1]
  other = dataset.stratified_split(labels, 0.2, seed=1)[1]
  assert not np.array_equal(test, other)


def test_probe_split_holds_out_the_last_training_examples(digits):
  n = digits.x_train.shape[0]
  t, probe = digits.probe_split(256, batch_size=32)
  assert t == n - 256
  np.testing.assert_array_equal(probe, digits.x_train[n - 256:])
  with pytest.raises(ConfigError, match="^probe_size: holding out"):
    digits.probe_split(n - 31, batch_size=32)
  for bad in (0, -1, 2.5):
    with pytest.raises(ConfigError, match="^probe_size: must be"):
      digits.probe_split(bad)
