"""Datasets and batch schedules for the replicated-training simulator.

Three kinds of source are recognised by `load_dataset`:

* ``"digits"`` (the default): scikit-learn's bundled 8x8 handwritten digits.
  Embedded in the scikit-learn wheel, so it needs no network and no files.
* ``"idx"`` / ``"fashion_mnist_idx"``: MNIST-style IDX files (gzipped or not)
  read from a directory. ``fashion_mnist_idx`` defaults to the directory of
  Debian's ``dataset-fashion-mnist`` package.
* ``"fortunes"`` / ``"text_synthetic"``: text classification (see
  `jaxrep.data.text`).
* any other name: a TensorFlow Datasets (TFDS) image- or text-classification
  dataset, read from an already prepared ``data_dir`` without TensorFlow (see
  `jaxrep.data.tfds`); it is text when the builder's supervised input is a
  ``tfds.features.Text`` ("imdb_reviews", "ag_news_subset", ...).

Every image source yields a `Dataset` of float32 images in [0, 1] with shape
[N, H, W, C] and int32 labels; every text source a `Dataset` of int32 token
ids [N, L] with its `vocab` (see `jaxrep.data.text`).

`batch_schedule` turns (seed, subrun) into the fixed sequence of example
indices that every simulated provider of that subrun trains on.
"""

from __future__ import annotations

import dataclasses
import gzip
import math
import os
import zlib

import numpy as np

from jaxrep.core import rng as rng_lib
from jaxrep.core.errors import ConfigError, require

DEFAULT_DATASET = "digits"
FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"

# Names shown in help texts. Any other TFDS image-classification builder name
# is accepted by `load_dataset` as well.
DATASETS = ("digits", "idx", "fashion_mnist_idx", "mnist", "fashion_mnist",
            "kmnist", "cifar10", "svhn_cropped")

# IDX file names of the MNIST family, by split.
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}

_DIGITS_SPLIT_SEED = 0
_DIGITS_TEST_FRACTION = 0.2


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


# ----------------------------------------------------------------------------
# Argument checks.


def _is_int(value) -> bool:
  """True for Python and NumPy integers, False for bools."""
  return isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_))


def _check_limit(value, field: str) -> None:
  """Validates an optional positive example count."""
  require(value is None or (_is_int(value) and value > 0), field,
          f"must be a positive integer or None, got {value!r}")


def _take(x: np.ndarray, limit: int | None) -> np.ndarray:
  """The first `limit` rows of `x` (all of them when limit is None)."""
  return x if limit is None else x[:limit]


# ----------------------------------------------------------------------------
# Digits (scikit-learn).


def _stratified_split(labels: np.ndarray, test_fraction: float,
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


def _load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """scikit-learn digits as (x_train, y_train, x_test, y_test)."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  labels = bunch.target.astype(np.int32)
  train, test = _stratified_split(labels, _DIGITS_TEST_FRACTION,
                                  _DIGITS_SPLIT_SEED)
  return images[train], labels[train], images[test], labels[test]


# ----------------------------------------------------------------------------
# IDX files.


def _read_bytes(path: str) -> bytes:
  """Reads a file, transparently gunzipping it when it starts like gzip."""
  try:
    with open(path, "rb") as f:
      raw = f.read()
  except OSError as e:
    raise ConfigError(f"data_dir: cannot read IDX file {path}: {e}") from e
  if raw[:2] != b"\x1f\x8b":
    return raw
  try:
    return gzip.decompress(raw)
  except (OSError, EOFError, zlib.error) as e:
    raise ConfigError(
        f"data_dir: IDX file {path} is not a valid gzip file: {e}") from e


def parse_idx(content: bytes, source: str = "<bytes>") -> np.ndarray:
  """Parses the bytes of an (uncompressed) IDX file.

  The header is two zero bytes, a type code byte, a byte with the number of
  dimensions, then one big-endian uint32 per dimension; the data follows in
  big-endian order.

  Args:
    content: The file's bytes.
    source: Where the bytes came from, for error messages.

  Returns:
    The array, in native byte order.

  Raises:
    ConfigError: The header is invalid or the data length does not match it.
  """
  def fail(message):
    raise ConfigError(f"data_dir: IDX file {source} {message}")

  if len(content) < 4:
    fail(f"is truncated: {len(content)} bytes, shorter than the 4-byte magic "
         "number")
  if content[0] != 0 or content[1] != 0:
    fail(f"has a bad magic number {content[:4].hex()}: an IDX file starts "
         "with two zero bytes")
  type_code, ndim = content[2], content[3]
  if type_code not in _IDX_DTYPES:
    known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
    fail(f"has unknown type code 0x{type_code:02X}; allowed: {known}")
  if ndim == 0:
    fail("has 0 dimensions; at least 1 is required")
  header_size = 4 + 4 * ndim
  if len(content) < header_size:
    fail(f"is truncated inside its header ({len(content)} of {header_size} "
         "bytes)")
  dims = tuple(int(d) for d in np.frombuffer(content, ">u4", ndim, 4))
  dtype = _IDX_DTYPES[type_code]
  expected = header_size + math.prod(dims) * dtype.itemsize
  if len(content) != expected:
    state = "truncated" if len(content) < expected else "longer than declared"
    fail(f"is {state}: header declares shape {dims} of {dtype.name} "
         f"({expected} bytes in all) but the file has {len(content)} bytes")
  data = np.frombuffer(content, dtype, offset=header_size).reshape(dims)
  return data.astype(dtype.newbyteorder("="))


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (gzipped or plain) into a NumPy array.

  Args:
    path: File path. Gzip is detected from the content, not the name.

  Returns:
    The stored array, in native byte order.

  Raises:
    ConfigError: The file is missing, unreadable or corrupt.
  """
  return parse_idx(_read_bytes(path), path)


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes `array` as an IDX file, gzipped when `path` ends in ".gz".

  Args:
    path: Destination file.
    array: Array of a dtype IDX can hold (uint8, int8, int16, int32, float32,
      float64) with 1 to 255 dimensions.

  Raises:
    ConfigError: The dtype or rank cannot be stored in IDX.
  """
  array = np.asarray(array)
  codes = {dt.newbyteorder("="): code for code, dt in _IDX_DTYPES.items()}
  native = array.dtype.newbyteorder("=")
  require(native in codes, "array",
          f"dtype {array.dtype} cannot be stored in IDX; allowed: "
          + ", ".join(str(d) for d in codes))
  require(1 <= array.ndim <= 255, "array",
          f"IDX holds 1 to 255 dimensions, got {array.ndim}")
  header = bytes([0, 0, codes[native], array.ndim])
  header += np.asarray(array.shape, ">u4").tobytes()
  content = header + array.astype(native.newbyteorder(">")).tobytes()
  if path.endswith(".gz"):
    content = gzip.compress(content, compresslevel=6, mtime=0)
  with open(path, "wb") as f:
    f.write(content)


def find_idx_file(data_dir: str, base_name: str) -> str:
  """Path of `base_name` or `base_name`.gz in `data_dir`.

  Raises:
    ConfigError: Neither file exists; the message names both paths.
  """
  plain = os.path.join(data_dir, base_name)
  for candidate in (plain, plain + ".gz"):
    if os.path.isfile(candidate):
      return candidate
  raise ConfigError(f"data_dir: IDX file not found: neither {plain} nor "
                    f"{plain}.gz exists")


def read_idx_split(data_dir: str,
                   split: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads one split's raw images and labels from IDX files.

  Args:
    data_dir: Directory with the standard MNIST file names.
    split: "train" or "test".

  Returns:
    (images, labels): uint8 [N, H, W, C] (a channel axis of 1 is added to 3-D
    files) and int64 [N] labels.

  Raises:
    ConfigError: Missing or corrupt files, wrong ranks or dtypes, or image and
      label counts that differ.
  """
  images_name, labels_name = IDX_FILES[split]
  images_path = find_idx_file(data_dir, images_name)
  labels_path = find_idx_file(data_dir, labels_name)
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  require(images.dtype == np.uint8, "data_dir",
          f"IDX images {images_path} must be unsigned bytes (type 0x08), got "
          f"{images.dtype}")
  require(images.ndim in (3, 4), "data_dir",
          f"IDX images {images_path} must have 3 dims [N, H, W] or 4 dims "
          f"[N, H, W, C], got shape {images.shape}")
  require(labels.ndim == 1 and np.issubdtype(labels.dtype, np.integer),
          "data_dir", f"IDX labels {labels_path} must be a 1-D integer array, "
          f"got shape {labels.shape} of {labels.dtype}")
  require(len(images) == len(labels), "data_dir",
          f"{images_path} holds {len(images)} images but {labels_path} holds "
          f"{len(labels)} labels")
  require(len(labels) > 0, "data_dir", f"{labels_path} holds no examples")
  require(int(labels.min()) >= 0, "data_dir",
          f"IDX labels {labels_path} must be >= 0, found {int(labels.min())}")
  if images.ndim == 3:
    images = images[..., None]
  return images, labels.astype(np.int64)


def _load_idx(data_dir: str) -> tuple[np.ndarray, ...]:
  """IDX train and test splits as raw (x_train, y_train, x_test, y_test)."""
  require(os.path.isdir(data_dir), "data_dir",
          f"IDX directory {data_dir} does not exist")
  x_train, y_train = read_idx_split(data_dir, "train")
  x_test, y_test = read_idx_split(data_dir, "test")
  require(x_train.shape[1:] == x_test.shape[1:], "data_dir",
          f"train images are {x_train.shape[1:]} but test images are "
          f"{x_test.shape[1:]} in {data_dir}")
  return x_train, y_train, x_test, y_test


# ----------------------------------------------------------------------------
# Public entry point.


def _finish(name: str, x_train, y_train, x_test, y_test, num_classes: int,
            max_train: int | None, max_test: int | None) -> Dataset:
  """Truncates, converts to float32/int32 and packs a `Dataset`."""
  def images(x):
    if x.dtype == np.uint8:
      return x.astype(np.float32) / np.float32(255.0)
    return np.asarray(x, np.float32)

  x_train, y_train = _take(x_train, max_train), _take(y_train, max_train)
  x_test, y_test = _take(x_test, max_test), _take(y_test, max_test)
  return Dataset(name=name,
                 x_train=images(x_train),
                 y_train=np.asarray(y_train, np.int32),
                 x_test=images(x_test),
                 y_test=np.asarray(y_test, np.int32),
                 num_classes=int(num_classes))


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
      Both are ignored for images; see `jaxrep.data.text.load_text_dataset`.

  Returns:
    The dataset; images float32 in [0, 1] or int32 token ids, labels int32.

  Raises:
    ConfigError: Unknown name, missing/corrupt files, a TFDS dataset that is
      not prepared in `data_dir`, or invalid limits.
  """
  require(isinstance(name, str) and name.strip() != "", "dataset",
          f"must be a non-empty name such as one of {', '.join(DATASETS)}; "
          f"got {name!r}")
  require(data_dir is None or isinstance(data_dir, (str, os.PathLike)),
          "data_dir", f"must be a path or None, got {data_dir!r}")
  _check_limit(max_train, "max_train")
  _check_limit(max_test, "max_test")
  name = name.strip()
  data_dir = None if data_dir is None else os.fspath(data_dir)

  from jaxrep.data import text as text_data  # pylint: disable=g-import-not-at-top
  if name in text_data.TEXT_DATASETS:
    return text_data.load_text_dataset(
        name, data_dir, max_len=max_len, vocab_size=vocab_size,
        max_train=max_train, max_test=max_test)
  if name == "digits":
    arrays = _load_digits()
    return _finish(name, *arrays, 10, max_train, max_test)
  if name in ("idx", "fashion_mnist_idx"):
    if data_dir is None and name == "fashion_mnist_idx":
      data_dir = FASHION_MNIST_IDX_DIR
    require(data_dir is not None, "data_dir",
            "dataset 'idx' needs data_dir, the directory holding "
            "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
            "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")
    x_train, y_train, x_test, y_test = _load_idx(data_dir)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    return _finish(name, x_train, y_train, x_test, y_test, num_classes,
                   max_train, max_test)

  from jaxrep.data import tfds as tfds_offline  # pylint: disable=g-import-not-at-top
  if tfds_offline.tfds_modality(name, data_dir) == "text":
    return text_data.load_text_dataset(
        name, data_dir, max_len=max_len, vocab_size=vocab_size,
        max_train=max_train, max_test=max_test)
  x_train, y_train, x_test, y_test, num_classes = tfds_offline.load_tfds_arrays(
      name, data_dir, max_train=max_train, max_test=max_test)
  return _finish(name, x_train, y_train, x_test, y_test, num_classes,
                 max_train, max_test)


def prepare_fashion_mnist_from_idx(
    idx_dir: str = FASHION_MNIST_IDX_DIR,
    data_dir: str | None = None) -> str:
  """Writes TFDS's `fashion_mnist` into `data_dir` from local IDX files.

  Afterwards `load_dataset("fashion_mnist", data_dir=data_dir)` reads it
  through TFDS, offline. See `jaxrep.data.tfds.prepare_tfds_from_idx`.

  Args:
    idx_dir: Directory with the four Fashion-MNIST IDX files.
    data_dir: TFDS data directory to write into (None: TFDS's default).

  Returns:
    The prepared dataset directory (data_dir/fashion_mnist/VERSION).
  """
  from jaxrep.data import tfds as tfds_offline  # pylint: disable=g-import-not-at-top
  return tfds_offline.prepare_tfds_from_idx("fashion_mnist", idx_dir, data_dir)
