"""Tests for jaxrep.data.text (and its TFDS and load_dataset parts)."""

import os

import numpy as np
import pytest

from jaxrep.data import datasets as data
from jaxrep.data import text as text_data
from jaxrep.data import tfds as tfds_offline
from jaxrep.core.errors import ConfigError

FORTUNES_DIR = text_data.FORTUNES_DIR
needs_fortunes = pytest.mark.skipif(
    not os.path.isdir(FORTUNES_DIR),
    reason=f"{FORTUNES_DIR} is absent (Debian package fortunes not installed; "
    "make datasets installs it as root)")


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
  """Every test gets its own empty cache root instead of ~/.cache/jaxrep."""
  monkeypatch.setenv(text_data.CACHE_ENV, str(tmp_path / "cache"))


def _cache_files(root):
  """Cache files (no temporaries) under root/text."""
  directory = os.path.join(root, "text")
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, f) for f in os.listdir(directory))


# ---------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("text,tokens", [
    ("", []),
    ("   \n\t ", []),
    ("!!! ... --- ???", []),
    ("Hello, World!", ["hello", "world"]),
    ("Don't STOP: rock'n'roll", ["don't", "stop", "rock'n'roll"]),
    ("'quoted' words''", ["quoted", "words"]),
    ("it\u2019s", ["it's"]),  # Curly apostrophe.
    ("e-mail snake_case 3.14", ["e", "mail", "snake", "case", "3", "14"]),
    ("\uff28\uff45\uff4c\uff4c\uff4f \ufb01ne", ["hello", "fine"]),  # NFKC.
    ("Caf\u00e9 cafe\u0301 NA\u00cfVE", ["caf\u00e9", "caf\u00e9",
                                         "na\u00efve"]),
    ("\u0394\u03b9\u03ac \u041c\u0438\u0440", ["\u03b4\u03b9\u03ac",
                                               "\u043c\u0438\u0440"]),
    ("a<pad>b <unk>", ["a", "pad", "b", "unk"]),
])
def test_tokenize_cases(text, tokens):
  assert text_data.tokenize(text) == tokens


def test_tokenize_is_deterministic_and_rejects_non_str():
  text = "The Quick, brown fox's \u00c9t\u00e9 -- 42!"
  assert text_data.tokenize(text) == text_data.tokenize(text)
  assert text_data.tokenize(text) == ["the", "quick", "brown", "fox's",
                                      "\u00e9t\u00e9", "42"]
  with pytest.raises(ConfigError, match="^text:"):
    text_data.tokenize(b"bytes")


# ---------------------------------------------------------------------------
# Vocabulary, encode, decode


def test_build_vocab_orders_by_count_then_alphabet_and_cuts():
  lists = [["b", "a", "c", "b"], ["c", "b", "d"], ["a", "e", "<pad>"]]
  # Counts: b 3, a 2, c 2, d 1, e 1; "<pad>" is not counted.
  assert text_data.build_vocab(lists, 100) == ("<pad>", "<unk>", "b", "a",
                                               "c", "d", "e")
  assert text_data.build_vocab(lists, 5) == ("<pad>", "<unk>", "b", "a", "c")
  assert text_data.build_vocab(lists, 3) == ("<pad>", "<unk>", "b")
  assert text_data.build_vocab([], 10) == ("<pad>", "<unk>")
  assert text_data.build_vocab(iter(lists), 4) == ("<pad>", "<unk>", "b", "a")


@pytest.mark.parametrize("size", [2, 0, -1, 3.0, True, None])
def test_build_vocab_rejects_small_size(size):
  with pytest.raises(ConfigError, match="^vocab_size:"):
    text_data.build_vocab([["a"]], size)


def test_encode_truncates_pads_and_maps_unknown_words():
  vocab = ("<pad>", "<unk>", "the", "cat", "sat")
  ids = text_data.encode([["the", "cat", "sat", "on", "the", "mat"],
                          ["cat"], [], ["dog", "the"]], vocab, 4)
  assert ids.dtype == np.int32 and ids.shape == (4, 4)
  np.testing.assert_array_equal(ids, [[2, 3, 4, 1], [3, 0, 0, 0],
                                      [0, 0, 0, 0], [1, 2, 0, 0]])
  assert text_data.decode(ids[0], vocab) == "the cat sat <unk>"
  assert text_data.decode(ids[2], vocab) == ""
  assert text_data.encode([], vocab, 3).shape == (0, 3)


def test_encode_decode_bad_inputs():
  vocab = ("<pad>", "<unk>", "a")
  for bad in (0, -2, 1.5, None):
    with pytest.raises(ConfigError, match="^max_len:"):
      text_data.encode([["a"]], vocab, bad)
  with pytest.raises(ConfigError, match="^vocab:"):
    text_data.encode([["a"]], ("a", "b"), 3)
  with pytest.raises(ConfigError, match="^ids:"):
    text_data.decode([0, 3], vocab)
  with pytest.raises(ConfigError, match="^ids:"):
    text_data.decode([[2]], vocab)


# ---------------------------------------------------------------------------
# Synthetic corpus


def test_synthetic_corpus_is_deterministic_balanced_and_documented():
  a, b = text_data.synthetic_corpus(), text_data.synthetic_corpus()
  assert a.train_texts == b.train_texts and a.test_texts == b.test_texts
  np.testing.assert_array_equal(a.y_train, b.y_train)
  assert (len(a.train_texts), len(a.test_texts)) == (2000, 500)
  assert a.num_classes == 4
  assert np.bincount(a.y_train).tolist() == [500] * 4
  assert np.bincount(a.y_test).tolist() == [125] * 4
  lengths = [len(text_data.tokenize(t)) for t in a.train_texts]
  assert min(lengths) == 8 and max(lengths) == 40
  allowed = set(text_data.SYNTHETIC_FILLER_WORDS).union(
      *text_data.SYNTHETIC_TOPIC_WORDS)
  assert {w for t in a.train_texts for w in text_data.tokenize(t)} == allowed
  assert not set(a.train_texts) & set(a.test_texts)


def test_text_synthetic_is_learnable_but_not_by_one_word():
  ds = data.load_dataset("text_synthetic")
  assert ds.modality == "text" and ds.input_shape == (64,)
  bag = lambda x: np.stack([np.bincount(r[r > 1], minlength=len(ds.vocab))
                            for r in x]).astype(np.float64)
  x_train, x_test = bag(ds.x_train), bag(ds.x_test)
  # Naive Bayes on word counts: a bag of words learns the task.
  counts = np.stack([x_train[ds.y_train == c].sum(0) + 1 for c in range(4)])
  log_p = np.log(counts / counts.sum(1, keepdims=True))
  accuracy = np.mean((x_test @ log_p.T).argmax(1) == ds.y_test)
  assert accuracy > 0.85, accuracy
  # But no single word decides the class: best one-word rule is weak.
  present = x_test > 0
  best = 0.0
  for word in range(2, len(ds.vocab)):
    majority_if_present = np.bincount(ds.y_train[x_train[:, word] > 0],
                                      minlength=4).argmax()
    predicted = np.where(present[:, word], majority_if_present,
                         np.bincount(ds.y_train).argmax())
    best = max(best, np.mean(predicted == ds.y_test))
  assert best < 0.5, best


# ---------------------------------------------------------------------------
# load_text_dataset / load_dataset


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
  corpus = text_data.synthetic_corpus()
  counts = {}
  for text in corpus.train_texts:
    for word in text_data.tokenize(text):
      counts[word] = counts.get(word, 0) + 1
  order = sorted(counts, key=lambda w: (-counts[w], w))
  assert ds.vocab[2:] == tuple(order[:48])
  # Row 0 is the first training text, truncated to 16 known-or-unk words.
  words = text_data.tokenize(corpus.train_texts[0])[:16]
  expect = " ".join(w if w in ds.vocab else "<unk>" for w in words)
  assert text_data.decode(ds.x_train[0], ds.vocab) == expect
  image = data.load_dataset("digits", max_len=0, vocab_size=1)  # Ignored.
  assert image.modality == "image" and image.vocab is None


def test_max_train_limits_examples_and_vocab():
  ds = data.load_dataset("text_synthetic", max_train=10, max_test=3)
  assert ds.x_train.shape == (10, 64) and ds.x_test.shape == (3, 64)
  corpus = text_data.synthetic_corpus()
  tokens = [text_data.tokenize(t) for t in corpus.train_texts[:10]]
  assert ds.vocab == text_data.build_vocab(tokens, 10000)
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
    text_data.load_text_dataset("text_synthetic", **kwargs)


def test_unknown_name_lists_text_datasets(tmp_path):
  for load in (data.load_dataset, text_data.load_text_dataset):
    with pytest.raises(ConfigError, match="^dataset:") as info:
      load("no_such_text_dataset_xyz", str(tmp_path))
    for name in text_data.TEXT_DATASETS + ("digits", "imdb_reviews"):
      assert name in str(info.value)
  with pytest.raises(ConfigError, match="^dataset:"):
    text_data.load_text_dataset("")
  with pytest.raises(ConfigError, match="not a text-classification"):
    text_data.load_text_dataset("mnist", str(tmp_path))


# ---------------------------------------------------------------------------
# Cache


def test_second_load_is_served_from_cache(tmp_path, monkeypatch):
  cache = str(tmp_path / "c")
  first = text_data.load_text_dataset("text_synthetic", cache_dir=cache,
                                      max_len=20, vocab_size=40)
  files = _cache_files(cache)
  assert len(files) == 1 and files[0].endswith(".npz")

  def fail(*args, **kwargs):
    raise AssertionError("the corpus was read again")
  monkeypatch.setattr(text_data, "_read_corpus", fail)
  second = text_data.load_text_dataset("text_synthetic", cache_dir=cache,
                                       max_len=20, vocab_size=40)
  assert second.vocab == first.vocab and second.num_classes == 4
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(second, field),
                                  getattr(first, field))
  # A different setting is a different key: it must build (and so fail here).
  with pytest.raises(AssertionError, match="read again"):
    text_data.load_text_dataset("text_synthetic", cache_dir=cache,
                                max_len=21, vocab_size=40)


def test_default_cache_dir_comes_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv(text_data.CACHE_ENV, str(tmp_path / "env"))
  assert text_data.default_cache_dir() == str(tmp_path / "env")
  data.load_dataset("text_synthetic", max_train=50, max_test=10)
  assert len(_cache_files(str(tmp_path / "env"))) == 1
  monkeypatch.delenv(text_data.CACHE_ENV)
  assert text_data.default_cache_dir() == os.path.join(
      os.path.expanduser("~"), ".cache", "jaxrep")


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong_shape"])
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, damage):
  cache = str(tmp_path / "c")
  good = text_data.load_text_dataset("text_synthetic", cache_dir=cache,
                                     max_len=12, max_train=40, max_test=8)
  (path,) = _cache_files(cache)
  if damage == "garbage":
    with open(path, "wb") as f:
      f.write(b"not a zip file at all")
  elif damage == "truncate":
    with open(path, "rb") as f:
      raw = f.read()
    with open(path, "wb") as f:
      f.write(raw[:len(raw) // 2])
  else:  # A readable file whose arrays do not fit the key.
    with np.load(path) as z:
      members = dict(z)
    members["x_train"] = members["x_train"][:, :5]
    np.savez(path, **members)
  calls = []
  real = text_data._read_corpus
  monkeypatch.setattr(text_data, "_read_corpus",
                      lambda *a: calls.append(1) or real(*a))
  again = text_data.load_text_dataset("text_synthetic", cache_dir=cache,
                                      max_len=12, max_train=40, max_test=8)
  assert calls == [1]  # Rebuilt, not used.
  np.testing.assert_array_equal(again.x_train, good.x_train)
  assert again.vocab == good.vocab
  assert _cache_files(cache) == [path]  # Rewritten in place, no temporaries.
  text_data.load_text_dataset("text_synthetic", cache_dir=cache, max_len=12,
                              max_train=40, max_test=8)
  assert calls == [1]  # And now valid again.


# ---------------------------------------------------------------------------
# fortunes


def test_parse_fortunes():
  content = "first\nline\n%\n\n%\n  second  \n%\nthird"
  assert text_data.parse_fortunes(content) == ["first\nline", "second",
                                               "third"]
  assert text_data.parse_fortunes("") == []


def test_fortunes_missing_dir_says_how_to_install(tmp_path):
  with pytest.raises(ConfigError, match="^data_dir:.*apt-get install "
                     "fortunes"):
    data.load_dataset("fortunes", str(tmp_path / "absent"))
  with pytest.raises(ConfigError, match="^data_dir:.*missing"):
    data.load_dataset("fortunes", str(tmp_path))


def test_fortunes_from_small_files(tmp_path):
  for i, category in enumerate(text_data.FORTUNES_CATEGORIES):
    entries = [f"{category} entry number {j} word{i}" for j in range(10)]
    entries += ["shared quote", entries[0]]  # Ambiguous, and a duplicate.
    (tmp_path / category).write_text("\n%\n".join(entries) + "\n%\n")
  corpus = text_data.fortunes_corpus(str(tmp_path))
  assert (len(corpus.train_texts), len(corpus.test_texts)) == (32, 8)
  assert np.bincount(corpus.y_test).tolist() == [2, 2, 2, 2]
  assert "shared quote" not in corpus.train_texts + corpus.test_texts
  for text, label in zip(corpus.train_texts, corpus.y_train):
    assert text.startswith(text_data.FORTUNES_CATEGORIES[label])
  ds = data.load_dataset("fortunes", str(tmp_path), max_train=8)
  assert set(ds.y_train.tolist()) == {0, 1, 2, 3}  # Prefix holds all classes.


@needs_fortunes
def test_fortunes_real_corpus():
  ds = data.load_dataset("fortunes")
  assert ds.num_classes == 4 and ds.modality == "text"
  assert 3000 < len(ds.y_train) < 3600 and 750 < len(ds.y_test) < 900
  assert abs(len(ds.y_test) / (len(ds.y_train) + len(ds.y_test)) - 0.2) < 0.01
  assert np.bincount(ds.y_train).min() > 500
  assert len(ds.vocab) == 10000 and ds.input_shape == (64,)
  assert ds.vocab[2:5] == ("the", "a", "to")
  words = ds.x_test[ds.x_test != text_data.PAD]
  assert np.mean(words == text_data.UNK) < 0.2
  again = data.load_dataset("fortunes")
  np.testing.assert_array_equal(again.x_test, ds.x_test)


# ---------------------------------------------------------------------------
# TFDS


def test_tfds_text_round_trip(tmp_path):
  corpus = text_data.synthetic_corpus()
  train = list(zip(corpus.train_texts[:120], corpus.y_train[:120].tolist()))
  test = list(zip(corpus.test_texts[:30], corpus.y_test[:30].tolist()))
  train[0] = ("Caf\u00e9 \u00fcber na\u00efve \u2014 \u65e5\u672c", 2)
  tfds_dir = str(tmp_path / "tfds")
  path = tfds_offline.prepare_tfds_text("ag_news_subset", train, test,
                                        tfds_dir)
  assert path == os.path.join(tfds_dir, "ag_news_subset", "1.0.0")
  assert os.listdir(tfds_dir) == ["ag_news_subset"]
  assert tfds_offline.tfds_modality("ag_news_subset", tfds_dir) == "text"
  assert tfds_offline.tfds_modality("mnist", tfds_dir) == "image"

  read = tfds_offline.read_text_splits(
      tfds_offline.text_builder("ag_news_subset", tfds_dir))
  assert read.num_classes == 4
  # TFDS shuffles by key hash: compare as multisets of (text, label).
  assert sorted(zip(read.train_texts, read.y_train.tolist())) == sorted(train)
  assert sorted(zip(read.test_texts, read.y_test.tolist())) == sorted(test)

  ds = data.load_dataset("ag_news_subset", data_dir=tfds_dir, max_len=32)
  assert ds.modality == "text" and ds.num_classes == 4
  assert ds.x_train.shape == (120, 32) and ds.x_test.shape == (30, 32)
  decoded = sorted((text_data.decode(x, ds.vocab), int(y))
                   for x, y in zip(ds.x_train, ds.y_train))
  expected = sorted((" ".join(text_data.tokenize(t)[:32]), y)
                    for t, y in train)
  assert decoded == expected  # Every train word is in the vocabulary.
  limited = data.load_dataset("ag_news_subset", data_dir=tfds_dir,
                              max_train=7, max_test=5)
  assert limited.x_train.shape == (7, 64) and limited.x_test.shape == (5, 64)


def test_tfds_text_not_prepared_fails_fast(tmp_path, monkeypatch):
  monkeypatch.delenv(tfds_offline.DOWNLOAD_ENV, raising=False)
  with pytest.raises(ConfigError, match="^data_dir:") as info:
    data.load_dataset("imdb_reviews", str(tmp_path))
  message = str(info.value)
  assert "not prepared" in message and "prepare_tfds_text" in message
  assert tfds_offline.DOWNLOAD_ENV in message
  assert not os.listdir(tmp_path)


def test_prepare_tfds_text_rejects_bad_examples(tmp_path):
  with pytest.raises(ConfigError, match="^train_examples:"):
    tfds_offline.prepare_tfds_text("ag_news_subset", [("ok", 9)], [("a", 0)],
                                   str(tmp_path))
  with pytest.raises(ConfigError, match="^test_examples:"):
    tfds_offline.prepare_tfds_text("ag_news_subset", [("ok", 1)], [b"x"],
                                   str(tmp_path))
  with pytest.raises(ConfigError, match="not a text-classification"):
    tfds_offline.prepare_tfds_text("mnist", [("a", 0)], [("b", 1)],
                                   str(tmp_path))
  with pytest.raises(ConfigError, match="^dataset:"):
    tfds_offline.prepare_tfds_text("no_such_xyz", [("a", 0)], [("b", 1)],
                                   str(tmp_path))


def test_tfds_neither_image_nor_text_is_rejected(tmp_path):
  # penguins: supervised keys (features: Tensor, species: ClassLabel).
  assert tfds_offline.tfds_modality("penguins", str(tmp_path)) == "image"
  with pytest.raises(ConfigError, match="not an image-classification"):
    data.load_dataset("penguins", str(tmp_path))
