"""Tests for jaxrep.data.text: tokenizer, vocabulary and the corpora."""

import os

import numpy as np
import pytest

from jaxrep.core.errors import ConfigError
from jaxrep.data import text

needs_fortunes = pytest.mark.skipif(
    not os.path.isdir(text.FORTUNES_DIR),
    reason=f"{text.FORTUNES_DIR} is absent (Debian package fortunes not "
    "installed; make datasets installs it as root)")


# ---------------------------------------------------------------------------
# Tokenizer


@pytest.mark.parametrize("sentence,tokens", [
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
def test_tokenize_cases(sentence, tokens):
  assert text.tokenize(sentence) == tokens


def test_tokenize_is_deterministic_and_rejects_non_str():
  sentence = "The Quick, brown fox's \u00c9t\u00e9 -- 42!"
  assert text.tokenize(sentence) == text.tokenize(sentence)
  assert text.tokenize(sentence) == ["the", "quick", "brown", "fox's",
                                     "\u00e9t\u00e9", "42"]
  with pytest.raises(ConfigError, match="^text:"):
    text.tokenize(b"bytes")


# ---------------------------------------------------------------------------
# Vocabulary, encode, decode


def test_build_vocab_orders_by_count_then_alphabet_and_cuts():
  lists = [["b", "a", "c", "b"], ["c", "b", "d"], ["a", "e", "<pad>"]]
  # Counts: b 3, a 2, c 2, d 1, e 1; "<pad>" is not counted.
  assert text.build_vocab(lists, 100) == ("<pad>", "<unk>", "b", "a",
                                          "c", "d", "e")
  assert text.build_vocab(lists, 5) == ("<pad>", "<unk>", "b", "a", "c")
  assert text.build_vocab(lists, 3) == ("<pad>", "<unk>", "b")
  assert text.build_vocab([], 10) == ("<pad>", "<unk>")
  assert text.build_vocab(iter(lists), 4) == ("<pad>", "<unk>", "b", "a")


@pytest.mark.parametrize("size", [2, 0, -1, 3.0, True, None])
def test_build_vocab_rejects_small_size(size):
  with pytest.raises(ConfigError, match="^vocab_size:"):
    text.build_vocab([["a"]], size)


def test_encode_truncates_pads_and_maps_unknown_words():
  vocab = ("<pad>", "<unk>", "the", "cat", "sat")
  ids = text.encode([["the", "cat", "sat", "on", "the", "mat"],
                     ["cat"], [], ["dog", "the"]], vocab, 4)
  assert ids.dtype == np.int32 and ids.shape == (4, 4)
  np.testing.assert_array_equal(ids, [[2, 3, 4, 1], [3, 0, 0, 0],
                                      [0, 0, 0, 0], [1, 2, 0, 0]])
  assert text.decode(ids[0], vocab) == "the cat sat <unk>"
  assert text.decode(ids[2], vocab) == ""
  assert text.encode([], vocab, 3).shape == (0, 3)


def test_encode_decode_bad_inputs():
  vocab = ("<pad>", "<unk>", "a")
  for bad in (0, -2, 1.5, None):
    with pytest.raises(ConfigError, match="^max_len:"):
      text.encode([["a"]], vocab, bad)
  with pytest.raises(ConfigError, match="^vocab:"):
    text.encode([["a"]], ("a", "b"), 3)
  with pytest.raises(ConfigError, match="^ids:"):
    text.decode([0, 3], vocab)
  with pytest.raises(ConfigError, match="^ids:"):
    text.decode([[2]], vocab)


# ---------------------------------------------------------------------------
# Synthetic corpus


def test_synthetic_corpus_is_deterministic_balanced_and_documented():
  a, b = text.synthetic_corpus(), text.synthetic_corpus()
  assert a.train_texts == b.train_texts and a.test_texts == b.test_texts
  np.testing.assert_array_equal(a.y_train, b.y_train)
  assert (len(a.train_texts), len(a.test_texts)) == (2000, 500)
  assert a.num_classes == 4
  assert np.bincount(a.y_train).tolist() == [500] * 4
  assert np.bincount(a.y_test).tolist() == [125] * 4
  lengths = [len(text.tokenize(t)) for t in a.train_texts]
  assert min(lengths) == 8 and max(lengths) == 40
  allowed = set(text.SYNTHETIC_FILLER_WORDS).union(
      *text.SYNTHETIC_TOPIC_WORDS)
  assert {w for t in a.train_texts for w in text.tokenize(t)} == allowed
  assert not set(a.train_texts) & set(a.test_texts)


def test_text_synthetic_is_learnable_but_not_by_one_word():
  ds = text.tokenize_corpus("text_synthetic", text.synthetic_corpus(),
                            max_len=64, vocab_size=10000)
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


def test_tokenize_corpus_builds_vocab_on_train_only():
  corpus = text.Corpus(("b a b", "c b"), np.array([0, 1]), ("a z",),
                       np.array([1]), 2)
  ds = text.tokenize_corpus("t", corpus, max_len=3, vocab_size=10)
  assert ds.vocab == ("<pad>", "<unk>", "b", "a", "c")
  np.testing.assert_array_equal(ds.x_train, [[2, 3, 2], [4, 2, 0]])
  np.testing.assert_array_equal(ds.x_test, [[3, 1, 0]])
  assert ds.y_train.dtype == np.int32 and ds.num_classes == 2
  empty = text.Corpus((), np.zeros(0), ("a",), np.array([0]), 2)
  with pytest.raises(ConfigError, match="^dataset:.*empty split"):
    text.tokenize_corpus("t", empty, max_len=3, vocab_size=10)


# ---------------------------------------------------------------------------
# fortunes


def test_parse_fortunes():
  content = "first\nline\n%\n\n%\n  second  \n%\nthird"
  assert text.parse_fortunes(content) == ["first\nline", "second",
                                          "third"]
  assert text.parse_fortunes("") == []


def test_fortunes_missing_dir_says_how_to_install(tmp_path):
  with pytest.raises(ConfigError, match="^data_dir:.*apt-get install "
                     "fortunes"):
    text.fortunes_corpus(str(tmp_path / "absent"))
  with pytest.raises(ConfigError, match="^data_dir:.*missing"):
    text.fortunes_corpus(str(tmp_path))


def test_fortunes_from_small_files(tmp_path):
  for i, category in enumerate(text.FORTUNES_CATEGORIES):
    entries = [f"{category} entry number {j} word{i}" for j in range(10)]
    entries += ["shared quote", entries[0]]  # Ambiguous, and a duplicate.
    (tmp_path / category).write_text("\n%\n".join(entries) + "\n%\n")
  corpus = text.fortunes_corpus(str(tmp_path))
  assert (len(corpus.train_texts), len(corpus.test_texts)) == (32, 8)
  assert np.bincount(corpus.y_test).tolist() == [2, 2, 2, 2]
  assert "shared quote" not in corpus.train_texts + corpus.test_texts
  for entry, label in zip(corpus.train_texts, corpus.y_train):
    assert entry.startswith(text.FORTUNES_CATEGORIES[label])
  prefix = text.truncate(corpus, 8, None)
  assert set(prefix.y_train.tolist()) == {0, 1, 2, 3}  # Holds all classes.
  assert prefix.train_texts == corpus.train_texts[:8]
  assert prefix.test_texts == corpus.test_texts


@needs_fortunes
def test_fortunes_real_corpus():
  ds = text.tokenize_corpus("fortunes", text.fortunes_corpus(), max_len=64,
                            vocab_size=10000)
  assert ds.num_classes == 4 and ds.modality == "text"
  assert 3000 < len(ds.y_train) < 3600 and 750 < len(ds.y_test) < 900
  assert abs(len(ds.y_test) / (len(ds.y_train) + len(ds.y_test)) - 0.2) < 0.01
  assert np.bincount(ds.y_train).min() > 500
  assert len(ds.vocab) == 10000 and ds.input_shape == (64,)
  assert ds.vocab[2:5] == ("the", "a", "to")
  words = ds.x_test[ds.x_test != text.PAD]
  assert np.mean(words == text.UNK) < 0.2
  again = text.tokenize_corpus("fortunes", text.fortunes_corpus(),
                               max_len=64, vocab_size=10000)
  np.testing.assert_array_equal(again.x_test, ds.x_test)
