"""Fixtures of the data tests: an empty text cache per test, IDX files."""

import os

import numpy as np
import pytest

from jaxrep import data


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
  """Every test gets its own empty cache root instead of ~/.cache/jaxrep."""
  monkeypatch.setenv(data.CACHE_ENV, str(tmp_path / "cache"))


def _write_split_files(directory, split, images, labels, gz):
  """Writes one split's IDX image and label files into `directory`."""
  suffix = ".gz" if gz else ""
  images_name, labels_name = data.IDX_FILES[split]
  data.write_idx(os.path.join(directory, images_name + suffix), images)
  data.write_idx(os.path.join(directory, labels_name + suffix), labels)


def _make_idx_dir(directory, train=40, test=12, size=28, gz=True, seed=0):
  """Writes a small random MNIST-like IDX dataset; returns its arrays."""
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, count in (("train", train), ("test", test)):
    images = rng.integers(0, 256, (count, size, size), dtype=np.uint8)
    labels = (np.arange(count) % 10).astype(np.uint8)
    _write_split_files(directory, split, images, labels, gz)
    arrays[split] = (images, labels)
  return arrays


@pytest.fixture
def write_split_files():
  """`write_split_files(directory, split, images, labels, gz)`."""
  return _write_split_files


@pytest.fixture
def make_idx_dir():
  """`make_idx_dir(directory, train, test, size, gz, seed)` -> arrays."""
  return _make_idx_dir
