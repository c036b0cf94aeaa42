"""TensorFlow Datasets without TensorFlow and without network.

tensorflow-datasets (TFDS) 4.9 can read a prepared dataset with no TensorFlow
installed, as long as the dataset was written in the `array_record` format:
`builder.as_data_source()` gives random access to examples and decodes the
images with Pillow. What does need TensorFlow is most builders' own
download-and-prepare code (MNIST's, for instance, reads its files with
`tf.io.gfile` and PNG-encodes NumPy images with `tf.image`), and reading
datasets prepared in the `tfrecord` format.

This module therefore:

* reads a TFDS image-classification dataset (`load_tfds_arrays`) or the texts
  of a text-classification dataset (`text_builder`, `read_text_splits`) from
  an already prepared `data_dir`. If the dataset is not there it raises a
  `ConfigError` at once, without trying to download: TFDS would otherwise retry
  its downloads for minutes on a machine without network. Setting the
  environment variable JAXREP_TFDS_DOWNLOAD=1 lets it call TFDS's
  `download_and_prepare(file_format="array_record")` instead, which needs
  network and, for most builders, TensorFlow. `tfds_modality` tells the two
  kinds apart from the builder's metadata alone.
* prepares TFDS's `mnist`, `fashion_mnist` and `kmnist` offline from local IDX
  files (`prepare_tfds_from_idx`, `prepare_fashion_mnist_from_idx`), e.g. from
  Debian's `dataset-fashion-mnist` package, and a text-classification builder
  from given (text, label) pairs (`prepare_tfds_text`). It runs the stock TFDS
  builder class with only the source of the examples replaced (for IDX files:
  PNG-encoded with Pillow, keyed by their index exactly like the stock
  builder), so the result has the stock builder's name, version, features and
  TFDS's usual key-hash shuffle, and `tfds.builder(name, data_dir=...)` reads
  it like a regular download.
"""

from __future__ import annotations

import functools
import io
import os
import tempfile

import numpy as np

from jaxrep.core.errors import ConfigError, require
from jaxrep.core.validate import is_int
from jaxrep.data.cache import file_fingerprint
from jaxrep.data.dataset import DATASETS
from jaxrep.data.images import FASHION_MNIST_IDX_DIR, read_idx_split
from jaxrep.data.text import TEXT_DATASETS, Corpus

DOWNLOAD_ENV = "JAXREP_TFDS_DOWNLOAD"

# TFDS builders whose source files are MNIST-style IDX files.
IDX_BUILDERS = ("mnist", "fashion_mnist", "kmnist")

_READ_CHUNK = 4096


def _tfds():
  """Imports tensorflow_datasets, raising ConfigError when it is missing."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError(
        "dataset: TFDS datasets need the tensorflow-datasets package "
        f"(import failed: {e}); use 'digits' or 'idx' instead, or install "
        "it") from e
  return tfds


# ----------------------------------------------------------------------------
# Builders and what they hold.


def _unknown_name_message(name: str) -> str:
  """Error text for a name that is neither built in nor a TFDS builder."""
  return (f"dataset: unknown dataset {name!r}; allowed: "
          f"{', '.join(DATASETS)}, or the name of any TFDS "
          "image-classification builder (optionally 'name/config')")


def _text_unknown_message(name: str) -> str:
  """Error text for a name that is no dataset jaxrep knows, image or text."""
  return (f"{_unknown_name_message(name)}, or a text dataset: "
          f"{', '.join(TEXT_DATASETS)} or any TFDS "
          "text-classification builder (e.g. imdb_reviews, ag_news_subset)")


def _unknown_builder(name: str, error: Exception, unknown) -> ConfigError:
  """The ConfigError for a name TFDS rejected with `error`."""
  return ConfigError(f"{unknown(name)} (TFDS: {str(error).splitlines()[0]})")


def _builder(name: str, data_dir: str | None, unknown=_unknown_name_message):
  """The TFDS builder for `name` reading from `data_dir`; an unknown name
  raises ConfigError with `unknown(name)`."""
  tfds = _tfds()
  try:
    return tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # TFDS raises a variety of errors for bad names.
    raise _unknown_builder(name, e, unknown) from e


def _any_builder(name: str, data_dir: str | None):
  """The TFDS builder for `name`; the error lists image and text names."""
  return _builder(name, data_dir, _text_unknown_message)


def _supervised_keys(builder) -> tuple[str, str]:
  """(image_key, label_key) of an image-classification builder.

  Raises:
    ConfigError: The dataset is not (image of fixed shape, class label).
  """
  tfds = _tfds()
  info = builder.info
  keys = info.supervised_keys
  ok = (isinstance(keys, tuple) and len(keys) == 2 and
        all(isinstance(k, str) for k in keys))
  if ok:
    image, label = info.features[keys[0]], info.features[keys[1]]
    ok = (isinstance(image, tfds.features.Image) and
          isinstance(label, tfds.features.ClassLabel))
  require(ok, "dataset",
          f"TFDS dataset {builder.name!r} is not an image-classification "
          "dataset (its supervised keys must be an Image and a ClassLabel, "
          f"got {keys!r}); use e.g. mnist, fashion_mnist, cifar10 or "
          "svhn_cropped")
  shape = info.features[keys[0]].shape
  require(all(d is not None for d in shape), "dataset",
          f"TFDS dataset {builder.name!r} has images of varying size "
          f"{shape}; only fixed-size images are supported")
  return keys


def _is_text_builder(builder) -> bool:
  """True when the builder's supervised input is a tfds.features.Text."""
  tfds = _tfds()
  keys = builder.info.supervised_keys
  return (isinstance(keys, tuple) and len(keys) == 2 and
          isinstance(keys[0], str) and keys[0] in builder.info.features and
          isinstance(builder.info.features[keys[0]], tfds.features.Text))


def tfds_modality(name: str, data_dir: str | None) -> str:
  """"text" if TFDS's `name` has a Text supervised input, else "image".

  Only reads the builder's metadata; nothing needs to be prepared.

  Raises:
    ConfigError: `name` is not a TFDS builder.
  """
  return "text" if _is_text_builder(_any_builder(name, data_dir)) else "image"


def _text_keys(builder) -> tuple[str, str]:
  """(text_key, label_key) of a text-classification builder.

  Raises:
    ConfigError: The supervised keys are not a plain Text and a ClassLabel.
  """
  tfds = _tfds()
  keys = builder.info.supervised_keys
  features = builder.info.features
  ok = (_is_text_builder(builder) and keys[1] in features and
        isinstance(features[keys[1]], tfds.features.ClassLabel))
  require(ok, "dataset",
          f"TFDS dataset {builder.name!r} is not a text-classification "
          "dataset (its supervised keys must be a Text and a ClassLabel, got "
          f"{keys!r}); use e.g. imdb_reviews or ag_news_subset")
  require(builder.info.features[keys[0]].encoder is None, "dataset",
          f"TFDS dataset {builder.info.full_name!r} stores its text as "
          "subword ids (a TFDS text encoder); use a plain-text config such as "
          "imdb_reviews/plain_text")
  return keys


# ----------------------------------------------------------------------------
# Prepared data: fail fast when missing, read in chunks.


def _idx_hint(builder) -> str | None:
  """How to prepare an IDX builder offline (None for other builders)."""
  if builder.name not in IDX_BUILDERS:
    return None
  return (f"  * offline from IDX files: python -c \"from jaxrep.data import "
          f"tfds; tfds.prepare_tfds_from_idx('{builder.name}', "
          f"IDX_DIR, DATA_DIR)\"" + (
              f" (Debian's dataset-fashion-mnist installs IDX_DIR="
              f"{FASHION_MNIST_IDX_DIR})"
              if builder.name == "fashion_mnist" else ""))


def _text_hint(name: str) -> str:
  """How to prepare a text-classification builder offline."""
  return ("  * offline from your own (text, label) pairs: python -c "
          "\"from jaxrep.data import tfds; tfds.prepare_tfds_text("
          f"'{name}', TRAIN_PAIRS, TEST_PAIRS, DATA_DIR)\"")


def _not_prepared_message(builder, data_dir: str | None,
                          offline: str | None) -> str:
  """Explains that a TFDS dataset is missing and how to get it; `offline`
  is the line on preparing it without network, if there is a way."""
  where = data_dir if data_dir is not None else "TFDS's default data_dir"
  lines = [
      f"data_dir: TFDS dataset {builder.name!r} (version {builder.version}) "
      f"is not prepared in {where} (looked for {builder.data_path}); "
      "jaxrep does not download by itself. To get it:",
  ]
  if offline is not None:
    lines.append(offline)
  lines += [
      f"  * on a machine with network and tensorflow: tfds build "
      f"{builder.name} --data_dir=DATA_DIR --file_format=array_record, then "
      "copy DATA_DIR here",
      f"  * or set {DOWNLOAD_ENV}=1 to let jaxrep run TFDS's download (needs "
      "network and, for most datasets, tensorflow)",
  ]
  return "\n".join(lines)


def _download(builder) -> None:
  """Runs TFDS's own download and preparation in array_record format."""
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as e:  # Network, TensorFlow or builder failures.
    raise ConfigError(
        f"data_dir: {DOWNLOAD_ENV}=1 but TFDS could not download and prepare "
        f"{builder.name!r} into {builder.data_path}: {type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}") from e


def _require_prepared(builder, data_dir: str | None,
                      offline: str | None) -> None:
  """Returns once `builder` is prepared: at once if it is, after TFDS's
  download if JAXREP_TFDS_DOWNLOAD=1; otherwise raises ConfigError saying how
  to prepare it (`_not_prepared_message`)."""
  if builder.is_prepared():
    return
  if os.environ.get(DOWNLOAD_ENV, "") != "1":
    raise ConfigError(_not_prepared_message(builder, data_dir, offline))
  _download(builder)


def _data_sources(builder, name: str):
  """{split: random-access data source} of a prepared builder.

  Raises:
    ConfigError: The dataset is stored in a format that needs TensorFlow.
  """
  try:
    return builder.as_data_source()
  except (NotImplementedError, ValueError) as e:
    raise ConfigError(
        f"data_dir: TFDS dataset {name!r} in {builder.data_path} is stored as "
        f"{builder.info.file_format}, which needs tensorflow to read; jaxrep "
        "reads the array_record format, e.g. from tfds build "
        f"{builder.name} --file_format=array_record ({e})") from e


def _chunks(source, limit: int | None):
  """The first `limit` examples of a data source (all when None), in lists
  of at most `_READ_CHUNK`."""
  count = len(source) if limit is None else min(limit, len(source))
  for start in range(0, count, _READ_CHUNK):
    yield source.__getitems__(range(start, min(start + _READ_CHUNK, count)))


def fingerprint(builder) -> dict:
  """Identity of a prepared dataset, for cache keys: its full name and the
  (path, size, mtime) of its files."""
  path = os.fspath(builder.data_path)
  files = sorted(os.path.join(path, f) for f in os.listdir(path))
  return {"builder": builder.info.full_name,
          "files": file_fingerprint([f for f in files if os.path.isfile(f)])}


# ----------------------------------------------------------------------------
# Image classification.


def _read_split(source, image_key: str, label_key: str,
                limit: int | None) -> tuple[np.ndarray, np.ndarray]:
  """Decodes the first `limit` examples of a TFDS data source."""
  images, labels = [], []
  for examples in _chunks(source, limit):
    images.append(np.stack([np.asarray(ex[image_key]) for ex in examples]))
    labels.append(np.asarray([ex[label_key] for ex in examples], np.int64))
  return np.concatenate(images), np.concatenate(labels)


def load_tfds_arrays(name: str, data_dir: str | None, *,
                     max_train: int | None = None,
                     max_test: int | None = None):
  """Reads a prepared TFDS image-classification dataset, offline.

  Args:
    name: TFDS builder name, optionally with config/version
      ("emnist/balanced").
    data_dir: TFDS data directory; None for TFDS's default.
    max_train: Read only the first `max_train` training examples.
    max_test: Read only the first `max_test` test examples.

  Returns:
    (x_train, y_train, x_test, y_test, num_classes) with raw images as stored
    (uint8 [N, H, W, C] for the usual datasets) and int64 labels.

  Raises:
    ConfigError: Unknown or non-image-classification name, dataset not
      prepared in `data_dir` (raised immediately, no download unless
      JAXREP_TFDS_DOWNLOAD=1), or stored in a format that needs TensorFlow.
  """
  builder = _builder(name, data_dir)
  image_key, label_key = _supervised_keys(builder)
  _require_prepared(builder, data_dir, _idx_hint(builder))
  splits = builder.info.splits
  for split in ("train", "test"):
    require(split in splits, "dataset",
            f"TFDS dataset {name!r} needs 'train' and 'test' splits, has "
            f"{sorted(splits)}")
  sources = _data_sources(builder, name)
  x_train, y_train = _read_split(sources["train"], image_key, label_key,
                                 max_train)
  x_test, y_test = _read_split(sources["test"], image_key, label_key,
                               max_test)
  num_classes = builder.info.features[label_key].num_classes
  return x_train, y_train, x_test, y_test, num_classes


# ----------------------------------------------------------------------------
# Text classification.


def _text_test_split(builder) -> str:
  """The split used as test set: "test", else "validation" (documented)."""
  splits = builder.info.splits
  require("train" in splits, "dataset",
          f"TFDS dataset {builder.name!r} has no 'train' split; it has "
          f"{sorted(splits)}")
  for split in ("test", "validation"):
    if split in splits:
      return split
  raise ConfigError(
      f"dataset: TFDS dataset {builder.name!r} has neither a 'test' nor a "
      f"'validation' split to test on; it has {sorted(splits)}")


def text_builder(name: str, data_dir: str | None):
  """The prepared TFDS builder of a text-classification dataset.

  Fails fast, without downloading, when the dataset is not prepared in
  `data_dir` (unless JAXREP_TFDS_DOWNLOAD=1, as for images).

  Args:
    name: TFDS builder name, optionally "name/config".
    data_dir: TFDS data directory; None for TFDS's default.

  Returns:
    The builder, prepared in `data_dir`.

  Raises:
    ConfigError: Unknown name, not a text-classification dataset, not
      prepared, or without a train and a test (or validation) split.
  """
  builder = _any_builder(name, data_dir)
  _text_keys(builder)
  _require_prepared(builder, data_dir, _text_hint(name))
  _text_test_split(builder)
  return builder


def _as_text(value) -> str:
  """A TFDS Text value (bytes, str or 0-d array) as str, decoding UTF-8."""
  if isinstance(value, np.ndarray):
    value = value.item()
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  return str(value)


def _read_text_split(source, text_key: str, label_key: str,
                     limit: int | None) -> tuple[list[str], np.ndarray]:
  """Texts and labels of the first `limit` examples of a data source."""
  texts, labels = [], []
  for examples in _chunks(source, limit):
    texts += [_as_text(ex[text_key]) for ex in examples]
    labels += [int(ex[label_key]) for ex in examples]
  return texts, np.asarray(labels, np.int64)


def read_text_splits(builder, *, max_train: int | None = None,
                     max_test: int | None = None) -> Corpus:
  """Reads the texts and labels of a prepared text-classification builder.

  The test set is the "test" split, or "validation" when there is no "test"
  split (GLUE-style datasets).

  Args:
    builder: From `text_builder`.
    max_train: Read only the first `max_train` training examples.
    max_test: Read only the first `max_test` test examples.

  Returns:
    A `jaxrep.data.text.Corpus` (texts decoded from UTF-8, int64 labels).

  Raises:
    ConfigError: Stored in a format that needs TensorFlow, or labels outside
      [0, num_classes) (e.g. an unlabelled split).
  """
  text_key, label_key = _text_keys(builder)
  test_split = _text_test_split(builder)
  name = builder.info.full_name
  sources = _data_sources(builder, name)
  num_classes = builder.info.features[label_key].num_classes
  splits = {}
  for split, limit in (("train", max_train), (test_split, max_test)):
    texts, labels = _read_text_split(sources[split], text_key, label_key,
                                     limit)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    require(bad.size == 0, "dataset",
            f"TFDS dataset {name!r} split {split!r} has labels outside "
            f"[0, {num_classes}), e.g. {bad[:3].tolist()} (an unlabelled "
            "split?)")
    splits[split] = (tuple(texts), labels)
  return Corpus(*splits["train"], *splits[test_split], int(num_classes))


# ----------------------------------------------------------------------------
# Offline preparation: the stock builder, fed with given examples.


@functools.cache
def _builder_from_examples(name: str):
  """Subclass of TFDS's stock `name` builder whose examples are given.

  The subclass keeps the stock builder's name, version, configs and `_info`
  (features), so the data it writes is read back by the stock builder. It is
  not registered with TFDS, so `tfds.builder(name)` still returns the stock
  class.
  """
  tfds = _tfds()
  base = tfds.builder_cls(name)
  base_name = base.name

  class FromExamples(base, skip_registration=True):
    """Stock builder whose examples come from `self.given_splits`."""
    name = base_name
    # Set on the instance: {split: () -> iterable of (key, example dict)}.
    given_splits = None

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      # TFDS uses the code path only to find the checksums of downloads; there
      # are none here. (Resolving it for a module of a namespace package also
      # fails in TFDS 4.9.10 without the importlib_resources backport.)
      return None

    def _split_generators(self, dl_manager):
      del dl_manager  # Nothing is downloaded.
      return {split: examples() for split, examples in
              self.given_splits.items()}

  FromExamples.__name__ = FromExamples.__qualname__ = (
      f"{base.__name__}FromExamples")
  # Recorded as moduleName in dataset_info.json: make it the stock one.
  FromExamples.__module__ = base.__module__
  return FromExamples


def _write(builder, splits) -> str:
  """Prepares `builder` from `splits` ({split: () -> (key, example) pairs}) in
  array_record format, without downloads or statistics; returns its
  directory. An already prepared dataset there is left as it is."""
  tfds = _tfds()
  builder.given_splits = splits
  config = tfds.download.DownloadConfig(
      compute_stats=tfds.download.ComputeStatsMode.SKIP)
  with tempfile.TemporaryDirectory(prefix="jaxrep_tfds_") as scratch:
    builder.download_and_prepare(download_dir=scratch,
                                 download_config=config,
                                 file_format="array_record")
  return os.fspath(builder.data_path)


def _png_examples(images, labels):
  """Yields (index, example) like the stock MNIST builders do."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  for index, (image, label) in enumerate(zip(images, labels)):
    buffer = io.BytesIO()
    Image.fromarray(image[..., 0]).save(buffer, format="png")
    yield index, {"image": buffer.getvalue(), "label": int(label)}


def prepare_tfds_from_idx(name: str, idx_dir: str,
                          data_dir: str | None = None) -> str:
  """Prepares TFDS's `name` dataset in `data_dir` from local IDX files.

  Needs neither network nor TensorFlow. The dataset is written in the
  array_record format under data_dir/NAME/VERSION, exactly where
  `tfds.builder(name, data_dir=data_dir)` looks for it. An already prepared
  dataset there is left as it is (TFDS's REUSE_DATASET_IF_EXISTS).

  Args:
    name: One of "mnist", "fashion_mnist", "kmnist".
    idx_dir: Directory with the four IDX files (train-images-idx3-ubyte,
      train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte,
      each optionally gzipped) of that dataset.
    data_dir: TFDS data directory to write into; None for TFDS's default.

  Returns:
    The directory of the prepared dataset.

  Raises:
    ConfigError: Unsupported name, or IDX files that are missing, corrupt or
      do not match the builder's image shape and number of classes.
  """
  require(name in IDX_BUILDERS, "dataset",
          f"can prepare only {', '.join(IDX_BUILDERS)} from IDX files, got "
          f"{name!r}")
  require(os.path.isdir(idx_dir), "idx_dir",
          f"IDX directory {idx_dir} does not exist")
  builder = _builder_from_examples(name)(data_dir=data_dir)
  info = builder.info
  shape = tuple(info.features["image"].shape)
  num_classes = info.features["label"].num_classes
  splits = {}
  for split in ("train", "test"):
    images, labels = read_idx_split(idx_dir, split)
    require(images.shape[1:] == shape, "idx_dir",
            f"{name} needs {shape} images but the {split} IDX images in "
            f"{idx_dir} are {images.shape[1:]}")
    require(int(labels.max()) < num_classes, "idx_dir",
            f"{name} has {num_classes} classes but the {split} IDX labels in "
            f"{idx_dir} go up to {int(labels.max())}")
    splits[split] = functools.partial(_png_examples, images, labels)
  return _write(builder, splits)


def prepare_fashion_mnist_from_idx(
    idx_dir: str = FASHION_MNIST_IDX_DIR,
    data_dir: str | None = None) -> str:
  """Writes TFDS's `fashion_mnist` into `data_dir` from local IDX files.

  Afterwards `load_dataset("fashion_mnist", data_dir=data_dir)` reads it
  through TFDS, offline. See `prepare_tfds_from_idx`.

  Args:
    idx_dir: Directory with the four Fashion-MNIST IDX files (default: where
      Debian's dataset-fashion-mnist installs them).
    data_dir: TFDS data directory to write into (None: TFDS's default).

  Returns:
    The prepared dataset directory (data_dir/fashion_mnist/VERSION).
  """
  return prepare_tfds_from_idx("fashion_mnist", idx_dir, data_dir)


def _text_examples(examples, split: str, features, text_key: str,
                   label_key: str) -> list:
  """(index, feature dict) pairs of (text, label) examples, checked.

  Text features other than `text_key` (ag_news_subset's "title") are left
  empty.
  """
  tfds = _tfds()
  num_classes = features[label_key].num_classes
  others = {k: "" for k, f in features.items()
            if k not in (text_key, label_key) and
            isinstance(f, tfds.features.Text)}
  out = []
  for index, example in enumerate(examples):
    ok = isinstance(example, (tuple, list)) and len(example) == 2
    text, label = example if ok else (None, None)
    require(ok and isinstance(text, str) and is_int(label) and
            0 <= label < num_classes, f"{split}_examples",
            f"example {index} must be (text: str, label: int in "
            f"[0, {num_classes})), got {example!r:.80}")
    out.append((index, {**others, text_key: text, label_key: int(label)}))
  require(out, f"{split}_examples", "must hold at least one example")
  return out


def prepare_tfds_text(name: str, train_examples, test_examples,
                      data_dir: str | None = None) -> str:
  """Prepares a TFDS text-classification dataset from given examples.

  Needs neither network nor TensorFlow. Runs the stock TFDS builder class of
  `name` (e.g. "ag_news_subset", "imdb_reviews") with only the source of the
  examples replaced, keyed by their index, and writes it in the array_record
  format under data_dir/NAME/[CONFIG/]VERSION, where
  `tfds.builder(name, data_dir=data_dir)` reads it like a regular download.
  Only "train" and "test" splits are written. An already prepared dataset
  there is left as it is.

  Args:
    name: A TFDS builder whose supervised keys are a Text and a ClassLabel,
      optionally "name/config".
    train_examples: Iterable of (text, label) pairs.
    test_examples: Same for the test split.
    data_dir: TFDS data directory to write into; None for TFDS's default.

  Returns:
    The directory of the prepared dataset.

  Raises:
    ConfigError: Unknown or non-text name, a builder with features that
      cannot be left empty, or malformed examples.
  """
  tfds = _tfds()
  require(isinstance(name, str) and name.strip() != "", "dataset",
          f"must be a TFDS builder name, got {name!r}")
  try:
    dataset_name, kwargs = tfds.core.naming.parse_builder_name_kwargs(name)
    builder = _builder_from_examples(dataset_name.name)(data_dir=data_dir,
                                                        **kwargs)
  except Exception as e:  # Unknown builder or config.
    raise _unknown_builder(name, e, _text_unknown_message) from e
  text_key, label_key = _text_keys(builder)
  features = builder.info.features
  extra = [k for k, f in features.items()
           if k not in (text_key, label_key) and
           not isinstance(f, tfds.features.Text)]
  require(not extra, "dataset",
          f"can prepare {name!r} only from (text, label) examples, but it "
          f"also has the non-text features {extra}")
  splits = {
      split: functools.partial(
          iter, _text_examples(examples, split, features, text_key, label_key))
      for split, examples in (("train", train_examples),
                              ("test", test_examples))}
  return _write(builder, splits)
