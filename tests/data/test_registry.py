"""Tests for jaxrep.data.registry: load_dataset and load_text_dataset."""

import time

import numpy as np
import pytest

from jaxrep import data
from jaxrep.core.errors import ConfigError
from jaxrep.data import images


def test_default_is_digits(digits):
  ds = data.load_dataset()
  assert ds.name == data.DEFAULT_DATASET == "digits"
  np.testing.assert_array_equal(ds.x_train, digits.x_train)


def test_max_train_and_max_test_take_prefix(digits):
  full = digits
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


def test_dispatch_by_name(tmp_path, make_idx_dir):
  make_idx_dir(str(tmp_path), train=6, test=4, size=5)
  via_registry = data.load_dataset("idx", tmp_path, max_train=3)
  direct = images.load_idx("idx", str(tmp_path), max_train=3)
  np.testing.assert_array_equal(via_registry.x_train, direct.x_train)
  assert via_registry.modality == "image"
  text = data.load_dataset(" text_synthetic ", max_len=8, vocab_size=20)
  assert text.name == "text_synthetic" and text.modality == "text"
  assert text.input_shape == (8,) and len(text.vocab) == 20


def test_fortunes_data_dir_reaches_the_corpus(tmp_path):
  for i, category in enumerate(data.FORTUNES_CATEGORIES):
    entries = [f"{category} entry {j} word{i}" for j in range(5)]
    (tmp_path / category).write_text("\n%\n".join(entries))
  ds = data.load_dataset("fortunes", str(tmp_path), max_train=8)
  assert ds.x_train.shape == (8, 64) and ds.x_test.shape == (4, 64)
  with pytest.raises(ConfigError, match="^data_dir:.*apt-get install"):
    data.load_dataset("fortunes", str(tmp_path / "absent"))


def test_text_dataset_contract():
  ds = data.load_dataset("text_synthetic", max_len=16, vocab_size=50)
  assert ds.name == "text_synthetic" and ds.num_classes == 4
  assert ds.vocab[:2] == ("<pad>", "<unk>") and len(ds.vocab) == 50
  assert ds.modality == "text" and ds.input_shape == (16,)
  for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
    assert x.dtype == np.int32 and y.dtype == np.int32
    assert x.shape == (len(y), 16)
    assert x.min() >= 0 and x.max() < 50 and set(np.unique(y)) == set(range(4))
  # Ids follow descending frequency in the (untruncated) train texts, ties
  # alphabetical; the 48 words kept are the most frequent ones.
  corpus = data.synthetic_corpus()
  counts = {}
  for text in corpus.train_texts:
    for word in data.tokenize(text):
      counts[word] = counts.get(word, 0) + 1
  order = sorted(counts, key=lambda w: (-counts[w], w))
  assert ds.vocab[2:] == tuple(order[:48])
  # Row 0 is the first training text, truncated to 16 known-or-unk words.
  words = data.tokenize(corpus.train_texts[0])[:16]
  expect = " ".join(w if w in ds.vocab else "<unk>" for w in words)
  assert data.decode(ds.x_train[0], ds.vocab) == expect
  image = data.load_dataset("digits", max_len=0, vocab_size=1)  # Ignored.
  assert image.modality == "image" and image.vocab is None


def test_max_train_limits_examples_and_vocab():
  ds = data.load_dataset("text_synthetic", max_train=10, max_test=3)
  assert ds.x_train.shape == (10, 64) and ds.x_test.shape == (3, 64)
  corpus = data.synthetic_corpus()
  tokens = [data.tokenize(t) for t in corpus.train_texts[:10]]
  assert ds.vocab == data.build_vocab(tokens, 10000)
  np.testing.assert_array_equal(ds.y_train, corpus.y_train[:10])


@pytest.mark.parametrize("kwargs,field", [
    ({"max_len": 0}, "max_len"), ({"max_len": -5}, "max_len"),
    ({"max_len": 2.5}, "max_len"), ({"vocab_size": 2}, "vocab_size"),
    ({"vocab_size": 0}, "vocab_size"), ({"max_train": 0}, "max_train"),
    ({"max_test": -1}, "max_test"),
])
def test_bad_arguments_name_the_field(kwargs, field):
  with pytest.raises(ConfigError, match=f"^{field}:"):
    data.load_dataset("text_synthetic", **kwargs)
  with pytest.raises(ConfigError, match=f"^{field}:"):
    data.load_text_dataset("text_synthetic", **kwargs)


def test_unknown_name_lists_text_datasets(tmp_path):
  for load in (data.load_dataset, data.load_text_dataset):
    with pytest.raises(ConfigError, match="^dataset:") as info:
      load("no_such_text_dataset_xyz", str(tmp_path))
    for name in data.TEXT_DATASETS + ("digits", "imdb_reviews"):
      assert name in str(info.value)
  with pytest.raises(ConfigError, match="^dataset:"):
    data.load_text_dataset("")
  with pytest.raises(ConfigError, match="not a text-classification"):
    data.load_text_dataset("mnist", str(tmp_path))
