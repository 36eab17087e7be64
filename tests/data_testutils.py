"""Helpers shared by the data-set tests (imported by the test modules, not collected)."""

import zlib

import numpy as np


class WordTokenizer:
  """Whitespace tokenizer with CLIP-like framing: start=1, words, end=2, zero padding.

  Stands in for CLIP's BPE so builder tests need no vocabulary file; a word's id is a hash, so
  the same word gets the same id in every split.
  """

  def encode_batch(self, texts, context_length):
    out = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
      words = [3 + zlib.crc32(w.encode()) % 30000 for w in text.split()][:context_length - 2]
      out[i, :len(words) + 2] = [1] + words + [2]
    return out
