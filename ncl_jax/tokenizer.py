"""CLIP's byte-level BPE tokenizer (49,408 ids), fed by the vocabulary files CLIP ships.

The text is cleaned as CLIP does (ftfy repair, HTML entities unescaped twice, whitespace runs
collapsed, lower case), split into words by CLIP's pattern, each word's UTF-8 bytes are mapped to
printable stand-in characters, and the word is merged by the ranked BPE merges. Ids: 256 byte
symbols, the same with an end-of-word marker, 48,894 merges, then ``<|startoftext|>`` (49406) and
``<|endoftext|>`` (49407); 0 pads.

Two file layouts hold the same vocabulary: OpenAI's ``bpe_simple_vocab_16e6.txt.gz`` (merges
only; the ids follow from the order above) and Hugging Face's ``vocab.json`` (token → id) with
``merges.txt`` beside it, as transformers' CLIP directories and open_clip's Hub snapshots carry
them. With the latter the ids are read from ``vocab.json``.

Rows longer than the context are truncated as CLIP4Clip does with ``max_words``: the start
token, the first ``context_length - 2`` BPE tokens, the end token.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
import json
import pathlib

import ftfy
import numpy as np
import regex

from ncl_jax.errors import UserError

VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
HF_VOCAB_FILE, HF_MERGES_FILE = "vocab.json", "merges.txt"
START, END = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # the merges CLIP uses from its file (the rest are never read)
END_OF_WORD = "</w>"
# CLIP's word splitter: special tokens, English contractions, letter runs, single digits, and
# runs of everything else except whitespace.
WORD_PATTERN = regex.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
    regex.IGNORECASE)


def byte_symbols() -> list[tuple[int, str]]:
  """(byte, stand-in character) pairs in vocabulary order.

  Printable Latin-1 bytes stand for themselves; the 68 others (controls, space, soft hyphen...)
  are mapped to U+0100 onwards in byte order, so that no symbol is whitespace or a control.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  kept = set(printable)
  others = [b for b in range(256) if b not in kept]
  return ([(b, chr(b)) for b in printable]
          + [(b, chr(256 + i)) for i, b in enumerate(others)])


def clean_text(text: str) -> str:
  """CLIP's clean-up: ftfy, double HTML unescape, collapsed whitespace, lower case."""
  text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
  return regex.sub(r"\s+", " ", text).strip().lower()


def merge_word(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
  """Applies BPE merges to one word: repeatedly merge the best-ranked adjacent pair everywhere.

  Args:
    symbols: the word's byte symbols, the last one carrying the end-of-word marker.
    ranks: merge pair → priority (lower merges first).

  Returns:
    The merged symbols. Occurrences of the chosen pair are merged left to right without overlap.
  """
  while len(symbols) > 1:
    best, best_rank = None, None
    for pair in zip(symbols, symbols[1:]):
      rank = ranks.get(pair)
      if rank is not None and (best_rank is None or rank < best_rank):
        best, best_rank = pair, rank
    if best is None:
      break
    merged, i = [], 0
    while i < len(symbols):
      if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
        merged.append(symbols[i] + symbols[i + 1])
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return symbols


def _package_vocab() -> pathlib.Path:
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise UserError(f"no CLIP vocabulary given: pass ClipTokenizer(PATH) with {VOCAB_FILE}, "
                    f"{HF_VOCAB_FILE} (with {HF_MERGES_FILE} beside it) or a directory made by "
                    "tools/convert_clip.py (which copies the vocabulary there)")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def find_vocab(vocab_path=None) -> pathlib.Path:
  """Resolves the vocabulary: OpenAI's ``bpe_simple_vocab_16e6.txt.gz``, Hugging Face's
  ``vocab.json`` (its ``merges.txt`` must sit beside it), a directory holding either (e.g. a
  converted CLIP directory; OpenAI's file wins), or (None) the installed OpenAI ``clip``
  package's copy.

  Returns:
    The path of the ``.txt.gz`` or ``vocab.json`` file.

  Raises:
    UserError: if no vocabulary is found.
  """
  path = pathlib.Path(vocab_path).expanduser() if vocab_path is not None else _package_vocab()
  if path.is_dir():
    path = path / VOCAB_FILE if (path / VOCAB_FILE).is_file() else path / HF_VOCAB_FILE
  if not path.is_file():
    raise UserError(f"CLIP vocabulary {path} not found; pass {VOCAB_FILE}, {HF_VOCAB_FILE} or "
                    "a converted CLIP directory")
  if path.name.endswith(".json") and not (path.parent / HF_MERGES_FILE).is_file():
    raise UserError(f"{path} needs {HF_MERGES_FILE} beside it (Hugging Face's CLIP tokenizer "
                    "is the pair of files)")
  return path


def vocab_files(vocab_path=None) -> list[pathlib.Path]:
  """Every file of the vocabulary :func:`find_vocab` resolves (one, or vocab.json + merges.txt),
  for copying a tokenizer next to weights or into a bundle."""
  path = find_vocab(vocab_path)
  return [path, path.parent / HF_MERGES_FILE] if path.name.endswith(".json") else [path]


def _check_merges(path, merges) -> tuple[tuple[str, str], ...]:
  if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
    raise UserError(f"{path} is not CLIP's BPE vocabulary (expected {NUM_MERGES} merge lines of "
                    "two symbols after a header)")
  return tuple(merges)


@functools.lru_cache(maxsize=4)
def _read_merges(path: str) -> tuple[tuple[str, str], ...]:
  if path.endswith(".json"):  # Hugging Face: merges.txt beside vocab.json, "#version" header
    lines = (pathlib.Path(path).parent / HF_MERGES_FILE).read_text(encoding="utf-8").split("\n")
  else:
    with gzip.open(path, "rt", encoding="utf-8") as f:
      lines = f.read().split("\n")
  # Line 0 is a version header; CLIP uses the next NUM_MERGES lines.
  return _check_merges(path, [tuple(line.split()) for line in lines[1:NUM_MERGES + 1]])


def _openai_vocab(merges) -> list[str]:
  """OpenAI's id order: byte symbols, the same with the end-of-word marker, merges, specials."""
  symbols = [char for _, char in byte_symbols()]
  return symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges] + [START, END]


def _json_vocab(path: str, merges) -> list[str]:
  """The tokens of a Hugging Face vocab.json by id; checks it can encode every byte and merge."""
  encoder = json.loads(pathlib.Path(path).read_text(encoding="utf-8"))
  if not isinstance(encoder, dict) or sorted(encoder.values()) != list(range(len(encoder))):
    raise UserError(f"{path} is not a vocabulary (token → ids 0..n-1)")
  needed = set(_openai_vocab(merges))
  absent = [t for t in needed if t not in encoder]
  if absent:
    raise UserError(f"{path} lacks {len(absent)} tokens CLIP's BPE produces (e.g. "
                    f"{sorted(absent)[:5]}); it does not belong to {HF_MERGES_FILE}")
  vocab = [""] * len(encoder)
  for token, i in encoder.items():
    vocab[i] = token
  return vocab


class ClipTokenizer:
  """CLIP's tokenizer.

  Args:
    vocab_path: ``bpe_simple_vocab_16e6.txt.gz``, Hugging Face's ``vocab.json`` (with
      ``merges.txt`` beside it), a directory holding either (e.g. a converted CLIP directory),
      or None for the copy inside an installed OpenAI ``clip`` package.
  """

  def __init__(self, vocab_path=None):
    path = str(find_vocab(vocab_path))
    merges = _read_merges(path)
    vocab = _json_vocab(path, merges) if path.endswith(".json") else _openai_vocab(merges)
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = vocab
    self.byte_to_symbol = dict(byte_symbols())
    self.symbol_to_byte = {c: b for b, c in byte_symbols()}
    self.ranks = {pair: i for i, pair in enumerate(merges)}
    self.start_id = self.encoder[START]
    self.end_id = self.encoder[END]
    self._word_cache: dict[str, list[int]] = {}

  @property
  def vocab_size(self) -> int:
    return len(self.decoder)

  def _word_ids(self, word: str) -> list[int]:
    ids = self._word_cache.get(word)
    if ids is None:
      if word in (START, END):
        ids = [self.encoder[word]]
      else:
        symbols = [self.byte_to_symbol[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        ids = [self.encoder[s] for s in merge_word(symbols, self.ranks)]
      self._word_cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """BPE ids of ``text`` without start/end tokens."""
    ids: list[int] = []
    for word in WORD_PATTERN.findall(clean_text(text)):
      ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids) -> str:
    """Text of BPE ids (start/end tokens and padding zeros are not special-cased)."""
    text = "".join(self.decoder[int(i)] for i in ids)
    data = bytearray()
    for word in text.split(END_OF_WORD):
      data.extend(self.symbol_to_byte[c] for c in word)
      data.extend(b" ")
    return data.decode("utf-8", errors="replace").strip()

  def encode_batch(self, texts: list[str], context_length: int = 77,
                   truncate: bool = True) -> np.ndarray:
    """Token rows [N, context_length] int32: start, BPE ids, end, zero padding.

    Args:
      texts: N strings.
      context_length: row length (CLIP: 77; CLIP4Clip's max_words, e.g. 32).
      truncate: keep the first context_length - 2 BPE ids of longer texts (CLIP4Clip's rule);
        if False, a text that does not fit raises UserError.
    """
    if isinstance(texts, str):
      raise UserError("encode_batch takes a list of strings; wrap a single caption in [ ]")
    if context_length < 2:
      raise UserError(f"context_length must be at least 2 (start and end token), got "
                      f"{context_length}")
    rows = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
      ids = self.encode(text)
      if len(ids) > context_length - 2:
        if not truncate:
          raise UserError(f"caption {i} has {len(ids)} BPE tokens, more than context_length - 2 "
                          f"= {context_length - 2}: {text[:60]!r}; pass truncate=True")
        ids = ids[:context_length - 2]
      row = [self.start_id, *ids, self.end_id]
      rows[i, :len(row)] = row
    return rows
