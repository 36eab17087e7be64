"""Helpers shared by the data-set tests (imported by the test modules, not collected)."""

import importlib.util
import pathlib
import zlib

import numpy as np

# The builders' dummy annotation files and the script that writes matching small videos.
DUMMY = pathlib.Path(__file__).resolve().parents[1] / "ncl_jax" / "data" / "dummy_data"
_spec = importlib.util.spec_from_file_location("make_dummy_data", DUMMY / "make_dummy_data.py")
dummy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dummy)

SIZE = 16  # Frame side in the data tests (224 in real use).
DATASETS = ("msrvtt", "msvd", "activitynet", "didemo")


def write_dummy_videos(root: pathlib.Path) -> dict:
  """``{dataset: (videos_dir, write_videos' result)}`` for every data set with dummy data."""
  return {name: (str(root / name), dummy.write_videos(name, str(root / name)))
          for name in DATASETS}


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
