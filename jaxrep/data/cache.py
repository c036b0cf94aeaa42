"""The on-disk cache of tokenized text datasets.

Tokenized datasets are cached under `cache_dir`/text (default:
$JAXREP_CACHE_DIR, else ~/.cache/jaxrep), keyed by the dataset name, a
fingerprint of its source (`file_fingerprint` of its files, or the parameters
of a generated corpus), `jaxrep.data.text.TOKENIZER_VERSION` and every
argument that changes the arrays (`text_key`). Cache files are written
atomically, and one that cannot be read or is inconsistent is rebuilt rather
than used (`read` returns None).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
from typing import Sequence

import numpy as np

from jaxrep.core.validate import is_int
from jaxrep.data.dataset import Dataset
from jaxrep.data.text import SPECIALS, TOKENIZER_VERSION

CACHE_ENV = "JAXREP_CACHE_DIR"
_FORMAT = 1


def default_cache_dir() -> str:
  """$JAXREP_CACHE_DIR, else ~/.cache/jaxrep."""
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "jaxrep")


def file_fingerprint(paths: Sequence[str]) -> list:
  """(real path, size, mtime in ns) of each file: cheap, and changes with it."""
  out = []
  for path in paths:
    st = os.stat(path)
    out.append([os.path.realpath(path), st.st_size, st.st_mtime_ns])
  return out


def text_key(name: str, source, *, max_len: int, vocab_size: int,
             max_train: int | None, max_test: int | None) -> dict:
  """The cache key of a tokenized text dataset whose source has fingerprint
  `source`."""
  return {"format": _FORMAT, "name": name, "source": source,
          "tokenizer": TOKENIZER_VERSION, "vocab_size": int(vocab_size),
          "max_len": int(max_len),
          "max_train": None if max_train is None else int(max_train),
          "max_test": None if max_test is None else int(max_test)}


def cache_path(name: str, key: dict, cache_dir: str | None = None) -> str:
  """Cache file of a dataset with cache key `key`."""
  digest = hashlib.sha256(
      json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()[:32]
  safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name)
  root = default_cache_dir() if cache_dir is None else cache_dir
  return os.path.join(root, "text", f"{safe}-{digest}.npz")


def read(path: str, key: dict, max_len: int,
         vocab_size: int) -> Dataset | None:
  """The cached dataset at `path`, or None if absent, unreadable or wrong."""
  if not os.path.isfile(path):
    return None
  try:
    with np.load(path, allow_pickle=False) as z:
      meta = json.loads(str(z["meta"]))
      arrays = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
      vocab = tuple(str(w) for w in z["vocab"])
  except Exception:  # Truncated zip, bad JSON, missing member, ...
    return None
  try:
    num_classes = meta["num_classes"]
    ok = (meta["key"] == json.loads(json.dumps(key)) and
          is_int(num_classes) and num_classes > 0 and
          vocab[:len(SPECIALS)] == SPECIALS and len(vocab) <= vocab_size)
    for split in ("train", "test"):
      x, y = arrays["x_" + split], arrays["y_" + split]
      ok = ok and (x.dtype == np.int32 and x.ndim == 2 and
                   x.shape[1] == max_len and y.dtype == np.int32 and
                   y.shape == (len(x),) and len(x) > 0 and
                   0 <= x.min() and x.max() < len(vocab) and
                   0 <= y.min() and y.max() < num_classes)
  except Exception:  # Meta of the wrong type or shape.
    return None
  if not ok:
    return None
  return Dataset(meta["name"], arrays["x_train"], arrays["y_train"],
                 arrays["x_test"], arrays["y_test"], num_classes, vocab=vocab)


def write(path: str, key: dict, ds: Dataset) -> None:
  """Writes `ds` to `path` atomically; warns (only) if that fails."""
  tmp = None
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".npz",
                               dir=os.path.dirname(path))
    meta = {"key": key, "name": ds.name, "num_classes": ds.num_classes}
    with os.fdopen(fd, "wb") as f:
      np.savez(f, x_train=ds.x_train, y_train=ds.y_train, x_test=ds.x_test,
               y_test=ds.y_test, vocab=np.asarray(ds.vocab, dtype=str),
               meta=np.asarray(json.dumps(meta)))
    os.replace(tmp, path)
    tmp = None
  except OSError as e:
    warnings.warn(f"jaxrep: could not write the text cache {path}: {e}")
  finally:
    if tmp is not None and os.path.exists(tmp):
      os.unlink(tmp)
