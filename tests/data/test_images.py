"""Tests for jaxrep.data.datasets and jaxrep.data.tfds."""

import gzip
import os
import time

from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from jaxrep.data import datasets as data

from jaxrep.train.schedule import batch_schedule
from jaxrep.data import tfds as tfds_offline
from jaxrep.core.errors import ConfigError

FASHION_DIR = data.FASHION_MNIST_IDX_DIR
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason=f"{FASHION_DIR} is absent (Debian package dataset-fashion-mnist "
    "not installed)")


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


def _canonical(x, y):
  """Rows (label, pixels...) sorted, to compare datasets up to order."""
  rows = np.concatenate([y[:, None].astype(np.float64),
                         x.reshape(len(x), -1).astype(np.float64)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


# ---------------------------------------------------------------------------
# digits


def test_digits_shapes_range_and_classes():
  ds = data.load_dataset()
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


def test_digits_split_is_deterministic_and_disjoint():
  a = data.load_dataset("digits")
  b = data.load_dataset("digits")
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  train_rows = {r.tobytes() + bytes([l]) for r, l in zip(a.x_train, a.y_train)}
  test_rows = {r.tobytes() + bytes([l]) for r, l in zip(a.x_test, a.y_test)}
  assert not train_rows & test_rows  # No example in both splits.


def test_max_train_and_max_test_take_prefix():
  full = data.load_dataset("digits")
  ds = data.load_dataset("digits", max_train=100, max_test=7)
  assert ds.x_train.shape == (100, 8, 8, 1) and ds.y_test.shape == (7,)
  np.testing.assert_array_equal(ds.x_train, full.x_train[:100])
  np.testing.assert_array_equal(ds.y_test, full.y_test[:7])
  big = data.load_dataset("digits", max_train=10**6)
  assert len(big.x_train) == len(full.x_train)


@pytest.mark.parametrize("field,value", [("max_train", 0), ("max_test", -3),
                                         ("max_train", 1.5),
                                         ("max_test", True)])
def test_bad_limits_raise(field, value):
  with pytest.raises(ConfigError, match=field):
    data.load_dataset("digits", **{field: value})


def test_dataset_is_frozen():
  ds = data.load_dataset("digits", max_train=5, max_test=5)
  with pytest.raises(Exception):
    ds.num_classes = 3  # type: ignore[misc]


# ---------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32,
                                   np.float32, np.float64])
def test_idx_write_read_round_trip(tmp_path, gz, dtype):
  rng = np.random.default_rng(1)
  array = (rng.normal(size=(3, 5, 7)) * 100).astype(dtype)
  path = str(tmp_path / ("a.idx" + (".gz" if gz else "")))
  data.write_idx(path, array)
  with open(path, "rb") as f:
    assert (f.read(2) == b"\x1f\x8b") == gz
  back = data.read_idx(path)
  assert back.dtype == np.dtype(dtype) and back.shape == (3, 5, 7)
  np.testing.assert_array_equal(back, array)


def test_idx_header_is_big_endian_mnist_layout(tmp_path):
  path = str(tmp_path / "labels")
  data.write_idx(path, np.array([7, 2, 1], np.uint8))
  with open(path, "rb") as f:
    raw = f.read()
  # Magic 0x00000801 (unsigned byte, 1 dim), then count 3, then the bytes.
  assert raw == bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 1])
  path4 = str(tmp_path / "ints")
  data.write_idx(path4, np.array([1, 256], np.int32))
  with open(path4, "rb") as f:
    assert f.read()[8:] == bytes([0, 0, 0, 1, 0, 0, 1, 0])


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dataset_round_trip(tmp_path, gz):
  arrays = _make_idx_dir(str(tmp_path), train=30, test=9, size=6, gz=gz)
  ds = data.load_dataset("idx", str(tmp_path))
  assert ds.name == "idx"
  assert ds.input_shape == (6, 6, 1)
  assert ds.num_classes == 10
  x_train, y_train = arrays["train"]
  np.testing.assert_array_equal(ds.x_train[..., 0],
                                x_train.astype(np.float32) / 255)
  np.testing.assert_array_equal(ds.y_train, y_train)
  np.testing.assert_array_equal(ds.y_test, arrays["test"][1])
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  limited = data.load_dataset("idx", str(tmp_path), max_train=4, max_test=2)
  np.testing.assert_array_equal(limited.y_train, y_train[:4])
  assert limited.num_classes == 10  # From all labels, not the prefix.


def test_idx_num_classes_is_max_label_plus_one(tmp_path):
  images = np.zeros((4, 3, 3), np.uint8)
  _write_split_files(str(tmp_path), "train", images,
                     np.array([0, 1, 2, 1], np.uint8), gz=False)
  _write_split_files(str(tmp_path), "test", images[:2],
                     np.array([4, 0], np.uint8), gz=True)
  assert data.load_dataset("idx", str(tmp_path)).num_classes == 5


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
    data.read_idx(str(path))
  assert str(path) in str(info.value)
  assert str(info.value).startswith("data_dir:")


def test_corrupt_gzip_and_truncated_gzip_raise(tmp_path):
  path = tmp_path / "bad.gz"
  path.write_bytes(b"\x1f\x8b" + b"not really gzip")
  with pytest.raises(ConfigError, match="gzip"):
    data.read_idx(str(path))
  full = gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 200]) + bytes(200))
  path.write_bytes(full[: len(full) // 2])
  with pytest.raises(ConfigError, match="bad.gz"):
    data.read_idx(str(path))


def test_corrupt_file_in_idx_dataset_raises(tmp_path):
  _make_idx_dir(str(tmp_path), train=5, test=3, size=4, gz=False)
  path = tmp_path / "t10k-images-idx3-ubyte"
  path.write_bytes(path.read_bytes()[:-1])
  with pytest.raises(ConfigError, match="truncated"):
    data.load_dataset("idx", str(tmp_path))


def test_missing_idx_file_names_path(tmp_path):
  _make_idx_dir(str(tmp_path), train=5, test=3, size=4, gz=True)
  os.remove(tmp_path / "train-labels-idx1-ubyte.gz")
  with pytest.raises(ConfigError) as info:
    data.load_dataset("idx", str(tmp_path))
  assert str(tmp_path / "train-labels-idx1-ubyte") in str(info.value)


def test_idx_mismatched_counts_raise(tmp_path):
  _make_idx_dir(str(tmp_path), train=5, test=3, size=4, gz=False)
  data.write_idx(str(tmp_path / "train-labels-idx1-ubyte"),
                 np.zeros(4, np.uint8))
  with pytest.raises(ConfigError, match="5 images but .* 4 labels"):
    data.load_dataset("idx", str(tmp_path))


def test_idx_needs_data_dir_and_existing_dir(tmp_path):
  with pytest.raises(ConfigError, match="data_dir"):
    data.load_dataset("idx")
  with pytest.raises(ConfigError, match="does not exist"):
    data.load_dataset("idx", str(tmp_path / "nowhere"))


@needs_fashion
def test_real_fashion_mnist_from_idx():
  start = time.monotonic()
  ds = data.load_dataset("fashion_mnist_idx")
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
  same = data.load_dataset("idx", FASHION_DIR, max_train=10, max_test=10)
  np.testing.assert_array_equal(same.x_train, ds.x_train[:10])


# ---------------------------------------------------------------------------
# Names and TFDS


def test_unknown_dataset_fails_fast_listing_names():
  start = time.monotonic()
  with pytest.raises(ConfigError) as info:
    data.load_dataset("no_such_dataset_xyz")
  assert time.monotonic() - start < 10
  message = str(info.value)
  assert message.startswith("dataset:")
  for name in data.DATASETS:
    assert name in message


@pytest.mark.parametrize("name", ["", "  ", None, 3])
def test_bad_dataset_name_type(name):
  with pytest.raises(ConfigError, match="dataset"):
    data.load_dataset(name)


def test_non_image_tfds_dataset_rejected(tmp_path):
  with pytest.raises(ConfigError, match="not an image-classification"):
    data.load_dataset("penguins", str(tmp_path))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_tfds_not_prepared_fails_fast(tmp_path, monkeypatch, name):
  monkeypatch.delenv(tfds_offline.DOWNLOAD_ENV, raising=False)
  start = time.monotonic()
  with pytest.raises(ConfigError) as info:
    data.load_dataset(name, str(tmp_path))
  elapsed = time.monotonic() - start
  assert elapsed < 20, f"took {elapsed:.1f}s: it must not try to download"
  message = str(info.value)
  assert message.startswith("data_dir:")
  assert "not prepared" in message and str(tmp_path) in message
  assert "tfds build" in message and tfds_offline.DOWNLOAD_ENV in message
  if name in tfds_offline.IDX_BUILDERS:
    assert "prepare_tfds_from_idx" in message
  assert not os.listdir(tmp_path)  # Nothing was downloaded or written.


def test_prepare_from_idx_then_load_through_tfds(tmp_path):
  idx_dir, tfds_dir = tmp_path / "idx", tmp_path / "tfds"
  idx_dir.mkdir()
  _make_idx_dir(str(idx_dir), train=50, test=20, gz=True, seed=3)
  path = tfds_offline.prepare_tfds_from_idx("mnist", str(idx_dir),
                                            str(tfds_dir))
  assert path == str(tfds_dir / "mnist" / "3.0.1")
  assert os.path.isfile(os.path.join(path, "dataset_info.json"))
  assert os.listdir(tfds_dir) == ["mnist"]  # No downloads/ left behind.

  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder = tfds.builder("mnist", data_dir=str(tfds_dir))
  assert type(builder).__name__ == "MNIST"  # The stock builder reads it.
  assert builder.info.file_format.value == "array_record"
  assert builder.info.splits["train"].num_examples == 50

  via_tfds = data.load_dataset("mnist", str(tfds_dir))
  via_idx = data.load_dataset("idx", str(idx_dir))
  assert via_tfds.name == "mnist" and via_tfds.num_classes == 10
  assert via_tfds.input_shape == (28, 28, 1)
  for split in ("train", "test"):
    x_a, y_a = getattr(via_tfds, f"x_{split}"), getattr(via_tfds, f"y_{split}")
    x_b, y_b = getattr(via_idx, f"x_{split}"), getattr(via_idx, f"y_{split}")
    assert x_a.dtype == np.float32 and y_a.dtype == np.int32
    # TFDS stores examples in its own key-hash order: same examples, same
    # image-label pairs, different order.
    np.testing.assert_array_equal(_canonical(x_a, y_a), _canonical(x_b, y_b))
  assert not np.array_equal(via_tfds.y_train, via_idx.y_train)

  limited = data.load_dataset("mnist", str(tfds_dir), max_train=7, max_test=3)
  np.testing.assert_array_equal(limited.x_train, via_tfds.x_train[:7])
  np.testing.assert_array_equal(limited.y_test, via_tfds.y_test[:3])

  # Preparing again reuses the existing data.
  again = tfds_offline.prepare_tfds_from_idx("mnist", str(idx_dir),
                                             str(tfds_dir))
  assert again == path


@needs_fashion
def test_prepare_fashion_mnist_from_real_idx_subset(tmp_path):
  # A prefix of the real Debian files keeps the test fast; the full files go
  # through the same code.
  idx_dir, tfds_dir = tmp_path / "idx", tmp_path / "tfds"
  idx_dir.mkdir()
  real = data.load_dataset("fashion_mnist_idx", max_train=600, max_test=200)
  for split, count in (("train", 600), ("test", 200)):
    images, labels = data.read_idx_split(FASHION_DIR, split)
    _write_split_files(str(idx_dir), split, images[:count, ..., 0],
                       labels[:count].astype(np.uint8), gz=True)
  data.prepare_fashion_mnist_from_idx(str(idx_dir), str(tfds_dir))
  ds = data.load_dataset("fashion_mnist", str(tfds_dir))
  assert ds.x_train.shape == (600, 28, 28, 1) and ds.num_classes == 10
  np.testing.assert_array_equal(_canonical(ds.x_train, ds.y_train),
                                _canonical(real.x_train, real.y_train))
  np.testing.assert_array_equal(_canonical(ds.x_test, ds.y_test),
                                _canonical(real.x_test, real.y_test))


def test_prepare_rejects_bad_input(tmp_path):
  with pytest.raises(ConfigError, match="can prepare only"):
    tfds_offline.prepare_tfds_from_idx("cifar10", str(tmp_path))
  with pytest.raises(ConfigError, match="does not exist"):
    tfds_offline.prepare_tfds_from_idx("mnist", str(tmp_path / "nowhere"))
  _make_idx_dir(str(tmp_path), train=5, test=3, size=8, gz=False)
  with pytest.raises(ConfigError, match=r"\(28, 28, 1\)"):
    tfds_offline.prepare_tfds_from_idx("mnist", str(tmp_path),
                                       str(tmp_path / "out"))


# ---------------------------------------------------------------------------
# batch_schedule


def test_batch_schedule_shape_dtype_range():
  s = batch_schedule(seed=0, subrun=0, steps=25, batch_size=16,
                          num_examples=100)
  assert s.shape == (25, 16) and s.dtype == np.int32
  assert s.min() >= 0 and s.max() < 100


def test_batch_schedule_deterministic_and_subrun_dependent():
  a = batch_schedule(7, 2, 50, 32, 1000)
  b = batch_schedule(7, 2, 50, 32, 1000)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, batch_schedule(7, 3, 50, 32, 1000))
  assert not np.array_equal(a, batch_schedule(8, 2, 50, 32, 1000))
  # A longer schedule starts with the shorter one.
  np.testing.assert_array_equal(a, batch_schedule(7, 2, 80, 32, 1000)[:50])


def test_batch_schedule_pinned_values():
  # Pins the stream: NumPy's PCG64 via default_rng([seed, subrun]) and
  # Generator.permutation are platform-independent; a change here means
  # earlier experiments are no longer reproducible.
  s = batch_schedule(seed=1, subrun=0, steps=2, batch_size=4,
                          num_examples=10)
  expected = np.random.default_rng([1, 0]).permutation(10)[:8].reshape(2, 4)
  np.testing.assert_array_equal(s, expected)
  np.testing.assert_array_equal(s, [[8, 4, 7, 0], [1, 2, 5, 9]])


def test_batch_schedule_rows_distinct_and_epochs_cover():
  n, b = 103, 10
  s = batch_schedule(3, 1, steps=40, batch_size=b, num_examples=n)
  for row in s:
    assert len(set(row.tolist())) == b
  per_epoch = n // b
  for epoch in range(3):
    block = s[epoch * per_epoch:(epoch + 1) * per_epoch].ravel()
    assert len(set(block.tolist())) == per_epoch * b  # No repeats in an epoch.


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32), subrun=st.integers(0, 1000),
       steps=st.integers(1, 30), num_examples=st.integers(1, 200),
       data_=st.data())
def test_batch_schedule_property(seed, subrun, steps, num_examples, data_):
  batch_size = data_.draw(st.integers(1, num_examples))
  s = batch_schedule(seed, subrun, steps, batch_size, num_examples)
  assert s.shape == (steps, batch_size)
  assert ((0 <= s) & (s < num_examples)).all()
  assert all(len(np.unique(row)) == batch_size for row in s)
  np.testing.assert_array_equal(
      s, batch_schedule(seed, subrun, steps, batch_size, num_examples))


def test_batch_schedule_full_batch():
  s = batch_schedule(0, 0, steps=3, batch_size=5, num_examples=5)
  for row in s:
    assert sorted(row.tolist()) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("kwargs,field", [
    (dict(batch_size=11), "batch_size"),
    (dict(batch_size=0), "batch_size"),
    (dict(steps=0), "steps"),
    (dict(seed=-1), "seed"),
    (dict(subrun=-2), "subrun"),
    (dict(num_examples=0), "num_examples"),
    (dict(steps=2.0), "steps"),
    (dict(seed=True), "seed"),
])
def test_batch_schedule_validation(kwargs, field):
  args = dict(seed=0, subrun=0, steps=3, batch_size=4, num_examples=10)
  args.update(kwargs)
  with pytest.raises(ConfigError, match=f"^{field}:"):
    batch_schedule(**args)


def test_batch_schedule_accepts_numpy_ints():
  a = batch_schedule(np.int64(5), np.int32(1), np.int64(4), 3,
                          np.int64(9))
  np.testing.assert_array_equal(a, batch_schedule(5, 1, 4, 3, 9))
