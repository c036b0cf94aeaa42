"""Datasets by name: `load_dataset` and `load_text_dataset`.

`load_dataset` recognises four kinds of name:

* ``"digits"`` (the default) and ``"idx"`` / ``"fashion_mnist_idx"``: images
  on the local machine (`jaxrep.data.images`).
* ``"fortunes"`` / ``"text_synthetic"``: the built-in text corpora
  (`jaxrep.data.text`).
* any other name: a TensorFlow Datasets (TFDS) image- or text-classification
  dataset, read from an already prepared ``data_dir`` without TensorFlow (see
  `jaxrep.data.tfds`); it is text when the builder's supervised input is a
  ``tfds.features.Text`` ("imdb_reviews", "ag_news_subset", ...).

Text datasets are tokenized (`jaxrep.data.text.tokenize_corpus`) and cached
(`jaxrep.data.cache`) by `load_text_dataset`.
"""

from __future__ import annotations

from jaxrep.data import cache, images, text, tfds
from jaxrep.data.dataset import (DATASETS, DEFAULT_DATASET, Dataset,
                                 check_limit, check_name, check_path)


def load_dataset(name: str = DEFAULT_DATASET, data_dir: str | None = None, *,
                 max_train: int | None = None,
                 max_test: int | None = None,
                 max_len: int = 64,
                 vocab_size: int = 10000) -> Dataset:
  """Loads an image- or text-classification dataset into memory.

  Args:
    name: "digits" (scikit-learn, embedded), "idx" (IDX files in `data_dir`),
      "fashion_mnist_idx" (IDX files, `data_dir` defaulting to
      /usr/share/datasets/fashion-mnist), a text dataset of
      `jaxrep.data.text.TEXT_DATASETS` ("fortunes", "text_synthetic"), or the
      name of a TFDS image-classification builder (e.g. "fashion_mnist",
      "mnist", "cifar10", "svhn_cropped", "emnist/balanced") or
      text-classification builder (e.g. "imdb_reviews", "ag_news_subset")
      prepared in `data_dir` in array_record format (see
      `jaxrep.data.tfds`).
    data_dir: Where the files are; ignored for "digits" and "text_synthetic";
      required for "idx"; for "fortunes" defaults to
      /usr/share/games/fortunes; for TFDS, None means TFDS's default
      (~/tensorflow_datasets or $TFDS_DATA_DIR).
    max_train: If set, keep only the first `max_train` training examples (all
      of them if there are fewer).
    max_test: Same for the test split.
    max_len: Text only: tokens per example (truncated, right-padded).
    vocab_size: Text only: maximum vocabulary size including the specials.
      Both are ignored for images; see `load_text_dataset`.

  Returns:
    The dataset; images float32 in [0, 1] or int32 token ids, labels int32.

  Raises:
    ConfigError: Unknown name, missing/corrupt files, a TFDS dataset that is
      not prepared in `data_dir`, or invalid limits.
  """
  name = check_name(name, DATASETS)
  data_dir = check_path(data_dir, "data_dir")
  check_limit(max_train, "max_train")
  check_limit(max_test, "max_test")
  limits = {"max_train": max_train, "max_test": max_test}
  if name == "digits":
    return images.load_digits(**limits)
  if name in images.IDX_DIRS:
    return images.load_idx(name, data_dir, **limits)
  if (name in text.TEXT_DATASETS or
      tfds.tfds_modality(name, data_dir) == "text"):
    return load_text_dataset(name, data_dir, max_len=max_len,
                             vocab_size=vocab_size, **limits)
  return images.image_dataset(
      name, *tfds.load_tfds_arrays(name, data_dir, **limits), **limits)


def _source(name: str, data_dir: str | None):
  """(fingerprint, state for `_read_corpus`) of a text dataset's source.

  Raises:
    ConfigError: The source is missing (fortunes files, unprepared TFDS
      dataset), or the name is unknown or not a text dataset.
  """
  if name == "fortunes":
    data_dir = text.FORTUNES_DIR if data_dir is None else data_dir
    return cache.file_fingerprint(text.fortunes_paths(data_dir)), data_dir
  if name == "text_synthetic":
    return text.synthetic_fingerprint(), None
  builder = tfds.text_builder(name, data_dir)
  return tfds.fingerprint(builder), builder


def _read_corpus(name: str, state, max_train: int | None,
                 max_test: int | None) -> text.Corpus:
  """Reads the raw texts of a dataset whose `_source` gave `state`."""
  if name == "fortunes":
    return text.truncate(text.fortunes_corpus(state), max_train, max_test)
  if name == "text_synthetic":
    return text.truncate(text.synthetic_corpus(), max_train, max_test)
  return tfds.read_text_splits(state, max_train=max_train, max_test=max_test)


def load_text_dataset(name: str, data_dir: str | None = None, *,
                      max_len: int = 64, vocab_size: int = 10000,
                      max_train: int | None = None,
                      max_test: int | None = None,
                      cache_dir: str | None = None) -> Dataset:
  """Loads a text-classification dataset as token ids (see `jaxrep.data.text`).

  Args:
    name: "fortunes", "text_synthetic", or a TFDS text-classification builder
      name ("imdb_reviews", "ag_news_subset", optionally "name/config")
      prepared in `data_dir` in array_record format.
    data_dir: For "fortunes" the directory of the fortune files (default
      /usr/share/games/fortunes); for TFDS the TFDS data directory (None:
      TFDS's default); ignored for "text_synthetic".
    max_len: Tokens per example (truncate, right-pad with PAD); > 0.
    vocab_size: Maximum vocabulary size including "<pad>" and "<unk>"; >= 3.
    max_train: Keep only the first `max_train` training examples; the
      vocabulary is built from those.
    max_test: Keep only the first `max_test` test examples.
    cache_dir: Cache root (None: $JAXREP_CACHE_DIR or ~/.cache/jaxrep); the
      files go to its text/ subdirectory (see `jaxrep.data.cache`).

  Returns:
    A `Dataset` with int32 [N, max_len] token ids, int32 labels and `vocab`.

  Raises:
    ConfigError: A bad argument, an unknown or non-text name, or a missing
      source (each message names the field).
  """
  name = check_name(name, text.TEXT_DATASETS)
  data_dir = check_path(data_dir, "data_dir")
  cache_dir = check_path(cache_dir, "cache_dir")
  text.check_max_len(max_len)
  text.check_vocab_size(vocab_size)
  check_limit(max_train, "max_train")
  check_limit(max_test, "max_test")

  fingerprint, state = _source(name, data_dir)
  key = cache.text_key(name, fingerprint, max_len=max_len,
                       vocab_size=vocab_size, max_train=max_train,
                       max_test=max_test)
  path = cache.cache_path(name, key, cache_dir)
  cached = cache.read(path, key, max_len, vocab_size)
  if cached is not None:
    return cached
  corpus = _read_corpus(name, state, max_train, max_test)
  ds = text.tokenize_corpus(name, corpus, max_len=max_len,
                            vocab_size=vocab_size)
  cache.write(path, key, ds)
  return ds
