"""Tests for jaxrep.data.tfds: reading and preparing TFDS datasets offline."""

import os
import re
import time

import numpy as np
import pytest
import tensorflow_datasets

from jaxrep import data
from jaxrep.core.errors import ConfigError
from jaxrep.data import tfds

FASHION_DIR = data.FASHION_MNIST_IDX_DIR
needs_fashion = pytest.mark.skipif(
    not os.path.isdir(FASHION_DIR),
    reason=f"{FASHION_DIR} is absent (Debian package dataset-fashion-mnist "
    "not installed)")


def _canonical(x, y):
  """Rows (label, pixels...) sorted, to compare datasets up to order."""
  rows = np.concatenate([y[:, None].astype(np.float64),
                         x.reshape(len(x), -1).astype(np.float64)], axis=1)
  return rows[np.lexsort(rows.T[::-1])]


# ---------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10"])
def test_tfds_not_prepared_fails_fast(tmp_path, monkeypatch, name):
  monkeypatch.delenv(tfds.DOWNLOAD_ENV, raising=False)
  start = time.monotonic()
  with pytest.raises(ConfigError) as info:
    data.load_dataset(name, str(tmp_path))
  elapsed = time.monotonic() - start
  assert elapsed < 20, f"took {elapsed:.1f}s: it must not try to download"
  message = str(info.value)
  assert message.startswith("data_dir:")
  assert "not prepared" in message and str(tmp_path) in message
  assert "tfds build" in message and tfds.DOWNLOAD_ENV in message
  if name in tfds.IDX_BUILDERS:
    assert "prepare_tfds_from_idx" in message
  assert not os.listdir(tmp_path)  # Nothing was downloaded or written.


def test_prepare_from_idx_then_load_through_tfds(tmp_path, make_idx_dir):
  idx_dir, tfds_dir = tmp_path / "idx", tmp_path / "tfds"
  idx_dir.mkdir()
  make_idx_dir(str(idx_dir), train=50, test=20, gz=True, seed=3)
  path = tfds.prepare_tfds_from_idx("mnist", str(idx_dir),
                                    str(tfds_dir))
  assert path == str(tfds_dir / "mnist" / "3.0.1")
  assert os.path.isfile(os.path.join(path, "dataset_info.json"))
  assert os.listdir(tfds_dir) == ["mnist"]  # No downloads/ left behind.

  builder = tensorflow_datasets.builder("mnist", data_dir=str(tfds_dir))
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
  again = tfds.prepare_tfds_from_idx("mnist", str(idx_dir),
                                     str(tfds_dir))
  assert again == path


@needs_fashion
def test_prepare_fashion_mnist_from_real_idx_subset(tmp_path,
                                                    write_split_files):
  # A prefix of the real Debian files keeps the test fast; the full files go
  # through the same code.
  idx_dir, tfds_dir = tmp_path / "idx", tmp_path / "tfds"
  idx_dir.mkdir()
  real = data.load_dataset("fashion_mnist_idx", max_train=600, max_test=200)
  for split, count in (("train", 600), ("test", 200)):
    images, labels = data.read_idx_split(FASHION_DIR, split)
    write_split_files(str(idx_dir), split, images[:count, ..., 0],
                      labels[:count].astype(np.uint8), gz=True)
  data.prepare_fashion_mnist_from_idx(str(idx_dir), str(tfds_dir))
  ds = data.load_dataset("fashion_mnist", str(tfds_dir))
  assert ds.x_train.shape == (600, 28, 28, 1) and ds.num_classes == 10
  np.testing.assert_array_equal(_canonical(ds.x_train, ds.y_train),
                                _canonical(real.x_train, real.y_train))
  np.testing.assert_array_equal(_canonical(ds.x_test, ds.y_test),
                                _canonical(real.x_test, real.y_test))


def test_prepare_rejects_bad_input(tmp_path, make_idx_dir):
  with pytest.raises(ConfigError, match="can prepare only"):
    tfds.prepare_tfds_from_idx("cifar10", str(tmp_path))
  with pytest.raises(ConfigError, match="does not exist"):
    tfds.prepare_tfds_from_idx("mnist", str(tmp_path / "nowhere"))
  make_idx_dir(str(tmp_path), train=5, test=3, size=8, gz=False)
  with pytest.raises(ConfigError, match=r"\(28, 28, 1\)"):
    tfds.prepare_tfds_from_idx("mnist", str(tmp_path),
                               str(tmp_path / "out"))


def test_non_image_tfds_dataset_rejected(tmp_path):
  with pytest.raises(ConfigError, match="not an image-classification"):
    data.load_dataset("penguins", str(tmp_path))



# ---------------------------------------------------------------------------
# Text


def test_tfds_text_round_trip(tmp_path):
  corpus = data.synthetic_corpus()
  train = list(zip(corpus.train_texts[:120], corpus.y_train[:120].tolist()))
  test = list(zip(corpus.test_texts[:30], corpus.y_test[:30].tolist()))
  train[0] = ("Caf\u00e9 \u00fcber na\u00efve \u2014 \u65e5\u672c", 2)
  tfds_dir = str(tmp_path / "tfds")
  path = tfds.prepare_tfds_text("ag_news_subset", train, test,
                                tfds_dir)
  assert path == os.path.join(tfds_dir, "ag_news_subset", "1.0.0")
  assert os.listdir(tfds_dir) == ["ag_news_subset"]
  assert tfds.tfds_modality("ag_news_subset", tfds_dir) == "text"
  assert tfds.tfds_modality("mnist", tfds_dir) == "image"

  read = tfds.read_text_splits(
      tfds.text_builder("ag_news_subset", tfds_dir))
  assert read.num_classes == 4
  # TFDS shuffles by key hash: compare as multisets of (text, label).
  assert sorted(zip(read.train_texts, read.y_train.tolist())) == sorted(train)
  assert sorted(zip(read.test_texts, read.y_test.tolist())) == sorted(test)
  fingerprint = tfds.fingerprint(tfds.text_builder("ag_news_subset", tfds_dir))
  assert fingerprint["builder"] == "ag_news_subset/1.0.0"
  assert {os.path.dirname(f[0]) for f in fingerprint["files"]} == {path}

  ds = data.load_dataset("ag_news_subset", data_dir=tfds_dir, max_len=32)
  assert ds.modality == "text" and ds.num_classes == 4
  assert ds.x_train.shape == (120, 32) and ds.x_test.shape == (30, 32)
  decoded = sorted((data.decode(x, ds.vocab), int(y))
                   for x, y in zip(ds.x_train, ds.y_train))
  expected = sorted((" ".join(data.tokenize(t)[:32]), y)
                    for t, y in train)
  assert decoded == expected  # Every train word is in the vocabulary.
  limited = data.load_dataset("ag_news_subset", data_dir=tfds_dir,
                              max_train=7, max_test=5)
  assert limited.x_train.shape == (7, 64) and limited.x_test.shape == (5, 64)


def test_tfds_text_not_prepared_fails_fast(tmp_path, monkeypatch):
  monkeypatch.delenv(tfds.DOWNLOAD_ENV, raising=False)
  with pytest.raises(ConfigError, match="^data_dir:") as info:
    data.load_dataset("imdb_reviews", str(tmp_path))
  message = str(info.value)
  assert "not prepared" in message and "prepare_tfds_text" in message
  assert tfds.DOWNLOAD_ENV in message
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("name,train", [("mnist", 20), ("imdb_reviews", 2)])
def test_not_prepared_message_says_what_works(tmp_path, monkeypatch,
                                              make_idx_dir, name, train):
  """The offline command in the message, run as it stands, prepares it."""
  monkeypatch.delenv(tfds.DOWNLOAD_ENV, raising=False)
  idx_dir, tfds_dir = tmp_path / "idx", str(tmp_path / "tfds")
  idx_dir.mkdir()
  make_idx_dir(str(idx_dir), train=20, test=10)
  with pytest.raises(ConfigError) as info:
    data.load_dataset(name, tfds_dir)
  command = re.search(r'python -c "([^"]+)"', str(info.value)).group(1)
  placeholders = {"IDX_DIR": str(idx_dir), "DATA_DIR": tfds_dir,
                  "TRAIN_PAIRS": [("a good film", 1), ("a bad film", 0)],
                  "TEST_PAIRS": [("a fine film", 1)]}
  exec(command, placeholders)  # pylint: disable=exec-used
  assert len(data.load_dataset(name, tfds_dir).y_train) == train


def test_prepare_tfds_text_rejects_bad_examples(tmp_path):
  with pytest.raises(ConfigError, match="^train_examples:"):
    tfds.prepare_tfds_text("ag_news_subset", [("ok", 9)], [("a", 0)],
                           str(tmp_path))
  with pytest.raises(ConfigError, match="^test_examples:"):
    tfds.prepare_tfds_text("ag_news_subset", [("ok", 1)], [b"x"],
                           str(tmp_path))
  with pytest.raises(ConfigError, match="not a text-classification"):
    tfds.prepare_tfds_text("mnist", [("a", 0)], [("b", 1)],
                           str(tmp_path))
  with pytest.raises(ConfigError, match="^dataset:"):
    tfds.prepare_tfds_text("no_such_xyz", [("a", 0)], [("b", 1)],
                           str(tmp_path))


def test_tfds_neither_image_nor_text_is_rejected(tmp_path):
  # penguins: supervised keys (features: Tensor, species: ClassLabel).
  assert tfds.tfds_modality("penguins", str(tmp_path)) == "image"
  with pytest.raises(ConfigError, match="not an image-classification"):
    data.load_dataset("penguins", str(tmp_path))
