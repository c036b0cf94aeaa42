"""Image sources on the local machine: scikit-learn's digits and IDX files.

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits. Embedded in the
  scikit-learn wheel, so it needs no network and no files. The test split is a
  fixed stratified 20 % of each class.
* ``"idx"`` / ``"fashion_mnist_idx"``: MNIST-style IDX files (gzipped or not)
  read from a directory. ``fashion_mnist_idx`` defaults to the directory of
  Debian's ``dataset-fashion-mnist`` package (`IDX_DIRS`).

`image_dataset` turns raw arrays (these, or TFDS's) into a `Dataset` of
float32 images in [0, 1].
"""

from __future__ import annotations

import gzip
import math
import os
import zlib

import numpy as np

from jaxrep.core.errors import ConfigError, require
from jaxrep.data.dataset import Dataset, stratified_split, take

FASHION_MNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"

# IDX datasets and their default directory (None: data_dir is required).
IDX_DIRS = {"idx": None, "fashion_mnist_idx": FASHION_MNIST_IDX_DIR}

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


def image_dataset(name: str, x_train, y_train, x_test, y_test,
                  num_classes: int, max_train: int | None,
                  max_test: int | None) -> Dataset:
  """Truncates raw image arrays, converts them to float32/int32 and packs a
  `Dataset`; uint8 pixels are scaled to [0, 1]."""
  def images(x):
    if x.dtype == np.uint8:
      return x.astype(np.float32) / np.float32(255.0)
    return np.asarray(x, np.float32)

  x_train, y_train = take(x_train, max_train), take(y_train, max_train)
  x_test, y_test = take(x_test, max_test), take(y_test, max_test)
  return Dataset(name=name,
                 x_train=images(x_train),
                 y_train=np.asarray(y_train, np.int32),
                 x_test=images(x_test),
                 y_test=np.asarray(y_test, np.int32),
                 num_classes=int(num_classes))


# ----------------------------------------------------------------------------
# Digits (scikit-learn).


def load_digits(max_train: int | None = None,
                max_test: int | None = None) -> Dataset:
  """scikit-learn's digits, [N, 8, 8, 1] in [0, 1], split 80/20 per class."""
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  bunch = datasets.load_digits()
  images = (bunch.images / 16.0).astype(np.float32)[..., None]
  labels = bunch.target.astype(np.int32)
  train, test = stratified_split(labels, _DIGITS_TEST_FRACTION,
                                 _DIGITS_SPLIT_SEED)
  return image_dataset("digits", images[train], labels[train], images[test],
                       labels[test], 10, max_train, max_test)


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


def load_idx(name: str, data_dir: str | None, *,
             max_train: int | None = None,
             max_test: int | None = None) -> Dataset:
  """An IDX dataset of `IDX_DIRS`; its number of classes is the largest label
  of either split plus one.

  Args:
    name: "idx" or "fashion_mnist_idx".
    data_dir: Directory of the four IDX files; None for the name's default.
    max_train: Keep only the first `max_train` training examples.
    max_test: Keep only the first `max_test` test examples.

  Raises:
    ConfigError: No directory, or missing, corrupt or inconsistent files.
  """
  data_dir = IDX_DIRS[name] if data_dir is None else data_dir
  require(data_dir is not None, "data_dir",
          "dataset 'idx' needs data_dir, the directory holding "
          "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], "
          "t10k-images-idx3-ubyte[.gz] and t10k-labels-idx1-ubyte[.gz]")
  require(os.path.isdir(data_dir), "data_dir",
          f"IDX directory {data_dir} does not exist")
  x_train, y_train = read_idx_split(data_dir, "train")
  x_test, y_test = read_idx_split(data_dir, "test")
  require(x_train.shape[1:] == x_test.shape[1:], "data_dir",
          f"train images are {x_train.shape[1:]} but test images are "
          f"{x_test.shape[1:]} in {data_dir}")
  num_classes = int(max(y_train.max(), y_test.max())) + 1
  return image_dataset(name, x_train, y_train, x_test, y_test, num_classes,
                       max_train, max_test)
