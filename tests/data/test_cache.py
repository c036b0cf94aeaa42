"""Tests for jaxrep.data.cache: tokenized text datasets cached on disk."""

import os

import numpy as np
import pytest

from jaxrep import data
from jaxrep.data import cache, registry


def _cache_files(root):
  """Cache files (no temporaries) under root/text."""
  directory = os.path.join(root, "text")
  if not os.path.isdir(directory):
    return []
  return sorted(os.path.join(directory, f) for f in os.listdir(directory))


def _tiny():
  x = np.array([[2, 3, 0], [4, 0, 0]], np.int32)
  return data.Dataset("t", x, np.array([0, 1], np.int32), x[:1],
                      np.array([1], np.int32), 2,
                      vocab=("<pad>", "<unk>", "a", "b", "c"))


def _key(source=None, **changes):
  args = dict(max_len=3, vocab_size=5, max_train=None, max_test=None)
  args.update(changes)
  return cache.text_key("t", source or {"synthetic": 1}, **args)


def test_write_then_read_round_trip(tmp_path):
  key = _key()
  path = cache.cache_path("t", key, str(tmp_path))
  assert path.startswith(str(tmp_path / "text"))
  ds = _tiny()
  cache.write(path, key, ds)
  back = cache.read(path, key, 3, 5)
  assert (back.name, back.num_classes, back.vocab) == ("t", 2, ds.vocab)
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(back, field), getattr(ds, field))


def test_read_rejects_other_keys_and_settings(tmp_path):
  key = _key()
  path = cache.cache_path("t", key, str(tmp_path))
  cache.write(path, key, _tiny())
  assert cache.read(path, _key(max_train=7), 3, 5) is None
  assert cache.read(path, key, 4, 5) is None      # Rows of another length.
  assert cache.read(path, key, 3, 4) is None      # Vocabulary too large.
  assert cache.read(str(tmp_path / "absent.npz"), key, 3, 5) is None


def test_key_and_path_depend_on_every_setting(tmp_path):
  keys = [_key(), _key(max_len=4), _key(vocab_size=6), _key(max_train=1),
          _key(max_test=1), _key({"other": 1})]
  paths = {cache.cache_path("t", k, str(tmp_path)) for k in keys}
  assert len(paths) == len(keys)
  assert cache.cache_path("a/b c", _key(), "r").startswith(
      os.path.join("r", "text", "a_b_c-"))


def test_write_failure_only_warns(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("")
  path = str(blocker / "text" / "x.npz")          # A file as a directory.
  with pytest.warns(UserWarning, match="could not write"):
    cache.write(path, _key(), _tiny())


def test_file_fingerprint_changes_with_the_file(tmp_path):
  path = tmp_path / "f"
  path.write_text("one")
  first = cache.file_fingerprint([str(path)])
  assert first[0][0] == os.path.realpath(path) and first[0][1] == 3
  path.write_text("longer")
  assert cache.file_fingerprint([str(path)]) != first


# ---------------------------------------------------------------------------
# Through load_text_dataset


def test_second_load_is_served_from_cache(tmp_path, monkeypatch):
  root = str(tmp_path / "c")
  first = data.load_text_dataset("text_synthetic", cache_dir=root,
                                 max_len=20, vocab_size=40)
  files = _cache_files(root)
  assert len(files) == 1 and files[0].endswith(".npz")

  def fail(*args, **kwargs):
    raise AssertionError("the corpus was read again")
  monkeypatch.setattr(registry, "_read_corpus", fail)
  second = data.load_text_dataset("text_synthetic", cache_dir=root,
                                  max_len=20, vocab_size=40)
  assert second.vocab == first.vocab and second.num_classes == 4
  for field in ("x_train", "y_train", "x_test", "y_test"):
    np.testing.assert_array_equal(getattr(second, field),
                                  getattr(first, field))
  # A different setting is a different key: it must build (and so fail here).
  with pytest.raises(AssertionError, match="read again"):
    data.load_text_dataset("text_synthetic", cache_dir=root,
                           max_len=21, vocab_size=40)


def test_default_cache_dir_comes_from_env(tmp_path, monkeypatch):
  monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
  assert cache.default_cache_dir() == str(tmp_path / "env")
  data.load_dataset("text_synthetic", max_train=50, max_test=10)
  assert len(_cache_files(str(tmp_path / "env"))) == 1
  monkeypatch.delenv(cache.CACHE_ENV)
  assert cache.default_cache_dir() == os.path.join(
      os.path.expanduser("~"), ".cache", "jaxrep")


@pytest.mark.parametrize("damage", ["garbage", "truncate", "wrong_shape"])
def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch, damage):
  root = str(tmp_path / "c")
  good = data.load_text_dataset("text_synthetic", cache_dir=root,
                                max_len=12, max_train=40, max_test=8)
  (path,) = _cache_files(root)
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
  real = registry._read_corpus
  monkeypatch.setattr(registry, "_read_corpus",
                      lambda *a: calls.append(1) or real(*a))
  again = data.load_text_dataset("text_synthetic", cache_dir=root,
                                 max_len=12, max_train=40, max_test=8)
  assert calls == [1]  # Rebuilt, not used.
  np.testing.assert_array_equal(again.x_train, good.x_train)
  assert again.vocab == good.vocab
  assert _cache_files(root) == [path]  # Rewritten in place, no temporaries.
  data.load_text_dataset("text_synthetic", cache_dir=root, max_len=12,
                         max_train=40, max_test=8)
  assert calls == [1]  # And now valid again.
