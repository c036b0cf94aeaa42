"""Datasets: images and texts loaded into memory as a `Dataset`.

Modules, each importing only those above it:

  dataset   the `Dataset` class, shared argument checks, stratified split
  images    scikit-learn's digits, IDX files (read, write, load)
  text      tokenizer, vocabulary, encoding; the fortunes and synthetic corpora
  cache     the on-disk cache of tokenized text datasets
  tfds      TensorFlow Datasets read and prepared offline, without TensorFlow
  registry  `load_dataset` / `load_text_dataset`: dispatch by name

The public names of all of them are exported here.
"""

from jaxrep.data.cache import CACHE_ENV, default_cache_dir
from jaxrep.data.dataset import DATASETS, DEFAULT_DATASET, Dataset
from jaxrep.data.images import (FASHION_MNIST_IDX_DIR, IDX_DIRS, IDX_FILES,
                                find_idx_file, load_digits, load_idx,
                                parse_idx, read_idx, read_idx_split,
                                write_idx)
from jaxrep.data.registry import load_dataset, load_text_dataset
from jaxrep.data.text import (FORTUNES_CATEGORIES, FORTUNES_DIR, PAD,
                              SPECIALS, TEXT_DATASETS, UNK, Corpus,
                              build_vocab, decode, encode, fortunes_corpus,
                              parse_fortunes, synthetic_corpus, tokenize,
                              tokenize_corpus)
from jaxrep.data.tfds import (DOWNLOAD_ENV, IDX_BUILDERS,
                              prepare_fashion_mnist_from_idx,
                              prepare_tfds_from_idx, prepare_tfds_text,
                              tfds_modality)
