"""Tests for jaxrep.data.images: scikit-learn's digits and IDX files."""

import gzip
import os
import time

import numpy as np
import pytest

from jaxrep.core.errors import ConfigError
from jaxrep.data import images

FASHION_DIR = images.FASHION_MNIST_IDX_DIR
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason=f"{FASHION_DIR} is absent (Debian package dataset-fashion-mnist "
    "not installed)")


# ---------------------------------------------------------------------------
# digits


def test_digits_shapes_range_and_classes(digits):
  ds = digits
  assert ds.name == "digits"
  assert ds.input_shape == (8, 8, 1)
  assert ds.num_classes == 10
  assert len(ds.x_train) + len(ds.x_test) == 1797
  assert ds.x_train.shape == (len(ds.y_train), 8, 8, 1)
  assert ds.x_test.shape == (len(ds.y_test), 8, 8, 1)
  assert 300 <= len(ds.x_test) <= 400
  for x in (ds.x_train, ds.x_test):
    assert x.dtype == np.float32
    assert x.min() == 0.0 and x.max() == 1.0
  for y in (ds.y_train, ds.y_test):
    assert y.dtype == np.int32
    assert set(np.unique(y)) == set(range(10))  # Stratified: all classes.


def test_digits_split_is_deterministic_and_disjoint(digits):
  again = images.load_digits()
  np.testing.assert_array_equal(again.x_train, digits.x_train)
  np.testing.assert_array_equal(again.y_test, digits.y_test)
  train_rows = {r.tobytes() + bytes([l])
                for r, l in zip(digits.x_train, digits.y_train)}
  test_rows = {r.tobytes() + bytes([l])
               for r, l in zip(digits.x_test, digits.y_test)}
  assert not train_rows & test_rows  # No example in both splits.


def test_digits_limits_take_prefix(digits):
  ds = images.load_digits(max_train=100, max_test=7)
  assert ds.x_train.shape == (100, 8, 8, 1) and ds.y_test.shape == (7,)
  np.testing.assert_array_equal(ds.x_train, digits.x_train[:100])
  np.testing.assert_array_equal(ds.y_test, digits.y_test[:7])
  big = images.load_digits(max_train=10**6)
  assert len(big.x_train) == len(digits.x_train)


def test_image_dataset_scales_bytes_and_casts():
  x = np.array([[[[0]], [[255]]]], np.uint8)          # [1, 2, 1, 1]
  y = np.array([3], np.int64)
  ds = images.image_dataset("n", x, y, x.astype(np.float64) / 2, y, 4,
                            None, None)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(ds.x_train.ravel(), [0.0, 1.0])
  np.testing.assert_array_equal(ds.x_test.ravel(), [0.0, 127.5])
  assert ds.num_classes == 4 and ds.vocab is None


# ---------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32,
                                   np.float32, np.float64])
def test_idx_write_read_round_trip(tmp_path, gz, dtype):
  rng = np.random.default_rng(1)
  array = (rng.normal(size=(3, 5, 7)) * 100).astype(dtype)
  path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
  images.write_idx(path, array)
  with open(path, "rb") as f:
    assert (f.read(2) == b"\x1f\x8b") == gz
  back = images.read_idx(path)
  assert back.dtype == np.dtype(dtype) and back.shape == (3, 5, 7)
  np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_mnist_layout(tmp_path):
  path = str(tmp_path / "labels")
  images.write_idx(path, np.array([7, 2, 1], np.uint8))
  with open(path, "rb") as f:
    raw = f.read()
  # Magic 0x00000801 (unsigned byte, 1 dim), then count 3, then the bytes.
  assert raw == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])
  path4 = str(tmp_path / "ints")
  images.write_idx(path4, np.array([1, 256], np.int32))
  with open(path4, "rb") as f:
    assert f.read()[8:] == bytes([0, 0, 0, 1, 0, 0, 1, 0])


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_round_trip(tmp_path, gz, make_idx_dir):
  arrays = make_idx_dir(str(tmp_path), train=30, test=9, size=6, gz=gz)
  ds = images.load_idx("idx", str(tmp_path))
  assert ds.name == "idx"
  assert ds.input_shape == (6, 6, 1)
  assert ds.num_classes == 10
  x_train, y_train = arrays["train"]
  np.testing.assert_array_equal(ds.x_train[..., 0],
                                x_train.astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.y_train, y_train)
  np.testing.assert_array_equal(ds.y_test, arrays["test"][1])
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  limited = images.load_idx("idx", str(tmp_path), max_train=4, max_test=2)
  np.testing.assert_array_equal(limited.y_train, y_train[:4])
  assert limited.num_classes == 10  # From all labels, not the prefix.


def test_idx_num_classes_is_max_label_plus_one(tmp_path, write_split_files):
  pixels = np.zeros((4, 3, 3), np.uint8)
  write_split_files(str(tmp_path), "train", pixels,
                    np.array([0, 1, 2, 1], np.uint8), gz=False)
  write_split_files(str(tmp_path), "test", pixels[:2],
                    np.array([4, 0], np.uint8), gz=True)
  assert images.load_idx("idx", str(tmp_path)).num_classes == 5


def _good_labels_bytes(count=3):
  return bytes([0, 0, 8, 1, 0, 0, 0, count]) + bytes(range(count))


@pytest.mark.parametrize("content,match", [
    (b"\x00\x00", "truncated"),
    (b"\x01\x02\x08\x01" + bytes(8), "magic"),
    (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "type code"),
    (bytes([0, 0, 8, 0]), "0 dimensions"),
    (bytes([0, 0, 8, 3, 0, 0, 0, 2]), "header"),
    (_good_labels_bytes()[:-1], "truncated"),
    (_good_labels_bytes() + b"\x00", "longer than declared"),
])
def test_corrupt_idx_raises(tmp_path, content, match):
  path = tmp_path / "bad"
  path.write_bytes(content)
  with pytest.raises(ConfigError, match=match) as info:
    images.read_idx(str(path))
  assert str(path) in str(info.value)
  assert str(info.value).startswith("data_dir:")


def test_corrupt_gzip_and_truncated_gzip_raise(tmp_path):
  path = tmp_path / "bad.gz"
  path.write_bytes(b"\x1f\x8b" + b"not really gzip")
  with pytest.raises(ConfigError, match="gzip"):
    images.read_idx(str(path))
  full = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(200))
  path.write_bytes(full[: len(full) // 2])
  with pytest.raises(ConfigError, match="bad.gz"):
    images.read_idx(str(path))


def test_corrupt_file_in_idx_dataset_raises(tmp_path, make_idx_dir):
  make_idx_dir(str(tmp_path), train=5, test=3, size=4, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(ConfigError, match="truncated"):
    images.load_idx("idx", str(tmp_path))


def test_missing_idx_file_names_path(tmp_path, make_idx_dir):
  make_idx_dir(str(tmp_path), train=5, test=3, size=4, gz=True)
  os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
  with pytest.raises(ConfigError) as info:
    images.load_idx("idx", str(tmp_path))
  assert str(tmp_path / "train-labels-idx1-ubyte") in str(info.value)


def test_idx_mismatched_counts_raise(tmp_path, make_idx_dir):
  make_idx_dir(str(tmp_path), train=5, test=3, size=4, gz=False)
  images.write_idx(str(tmp_path / "train-labels-idx1-ubyte"),
                   np.zeros(4, np.uint8))
  with pytest.raises(ConfigError, match="5 images but .* 4 labels"):
    images.load_idx("idx", str(tmp_path))


def test_idx_needs_data_dir_and_existing_dir(tmp_path):
  with pytest.raises(ConfigError, match="data_dir"):
    images.load_idx("idx", None)
  with pytest.raises(ConfigError, match="does not exist"):
    images.load_idx("idx", str(tmp_path / "nowhere"))


@needs_fashion
def test_real_fashion_mnist_from_idx():
  start = time.monotonic()
  ds = images.load_idx("fashion_mnist_idx", None)
  elapsed = time.monotonic() - start
  assert ds.x_train.shape == (60000, 28, 28, 1)
  assert ds.x_test.shape == (10000, 28, 28, 1)
  assert ds.input_shape == (28, 28, 1)
  assert ds.num_classes == 10
  # Fashion-MNIST is balanced: 6000 and 1000 images per class.
  np.testing.assert_array_equal(np.bincount(ds.y_train), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(ds.y_test), [1000] * 10)
  assert ds.x_train.dtype == np.float32
  assert ds.x_train.min() == 0.0 and ds.x_train.max() == 1.0
  # The first training image of Fashion-MNIST is an ankle boot (class 9).
  assert ds.y_train[0] == 9
  assert elapsed < 20, f"loading took {elapsed:.1f}s"
  same = images.load_idx("idx", FASHION_DIR, max_train=10, max_test=10)
  np.testing.assert_array_equal(same.x_train, ds.x_train[:10])
