"""Reads data sets written by ``python -m ncl_jax.data.prepare`` (TFDS array_record, no TensorFlow).

Layout under ``data_config.data_dir``: ``<dataset>/<config>/<version>/`` as TFDS writes it,
with ``<config>`` e.g. ``frames_12f_224px`` or ``features_12f``
(:func:`ncl_jax.data.builders.config_name`). Records are read with random access through
``builder.as_data_source(split)``; captions come from the dataset metadata and are tokenised
once per split with the same function for every split, so long captions are truncated alike in
training and evaluation.
"""

from __future__ import annotations

import os
import re
from typing import Sequence

import numpy as np
from ml_collections import ConfigDict

from ncl_jax.data import video as video_lib
from ncl_jax.data.pipeline import RetrievalDataset, Split, augment_frames, sample_frame_indices
from ncl_jax.errors import UserError
from ncl_jax.tokenizer import ClipTokenizer


def _prepare_hint(name: str) -> str:
  return (f"prepare it with `python -m ncl_jax.data.prepare {name} --manual_dir DIR "
          f"--data_dir OUT` and set data.data_dir=OUT (see docs/data.md); "
          "configs/synthetic.py needs no data")


def _find_version_dir(config_dir: str) -> str | None:
  if not os.path.isdir(config_dir):
    return None
  # Only finished copies: TFDS builds into "incomplete.<hex>.<version>" and renames it at the
  # end, so a killed build leaves nothing named like a version.
  versions = sorted((v for v in os.listdir(config_dir)
                     if re.fullmatch(r"\d+\.\d+\.\d+", v)
                     and os.path.isfile(os.path.join(config_dir, v, "dataset_info.json"))),
                    key=lambda v: tuple(int(p) for p in v.split(".")))
  return os.path.join(config_dir, versions[-1]) if versions else None


def find_prepared(data_config: ConfigDict) -> str:
  """The directory of the prepared variant ``data_config`` asks for; UserError if there is none."""
  name = data_config.name
  if not data_config.data_dir:
    raise UserError(f"data.data_dir is not set for data set {name!r}; {_prepare_hint(name)}")
  root = os.path.join(os.path.expanduser(data_config.data_dir), name)
  available = {}
  if os.path.isdir(root):
    for config in sorted(os.listdir(root)):
      found = _find_version_dir(os.path.join(root, config))
      if found:
        available[config] = found
  if data_config.get("builder_config"):
    wanted = [data_config.builder_config]
  else:
    # The builders import TensorFlow Datasets, which only the real sets' loading needs.
    from ncl_jax.data.builders import config_name  # pylint: disable=g-import-not-at-top
    exact = config_name(data_config.input_mode, data_config.max_frames,
                        data_config.get("image_size", 224))
    same_mode = [c for c in available if c.startswith(data_config.input_mode + "_")]
    wanted = [exact] if exact in available else same_mode
  matches = [c for c in wanted if c in available]
  if not matches:
    have = f" (found: {', '.join(available)})" if available else ""
    raise UserError(f"no prepared {name} data in {data_config.input_mode} mode under {root}{have}; "
                    f"{_prepare_hint(name)}")
  if len(matches) > 1:
    raise UserError(f"several prepared {name} variants match ({', '.join(matches)}); choose one "
                    "with data.builder_config")
  return available[matches[0]]


def _default_tokenizer(data_config: ConfigDict):
  """CLIP's BPE tokenizer, with the vocabulary at ``data.vocab_path`` if set."""
  return ClipTokenizer(data_config.get("vocab_path") or None)


class RecordSplit(Split):
  """A split backed by TFDS array_record data sources (one record per video).

  Args:
    sources: data sources; ``rows[i] = (s, r)`` says video i is record r of source s.
    rows: list of (source index, record index) per video.
    captions: per video, its captions.
    video_ids: per video, its id.
    tokenizer: ``encode_batch(list[str], context_length) -> int32 [N, L]``.
    settings: the builder's stored settings (input_mode, image_size, feature_dim).
    max_words, max_frames: L and T of batches.

  Grain pickles the split into its worker processes: the captions are tokenised once, in the
  main process, and the tokenizer stays behind.
  """

  def __init__(self, sources, rows, captions, video_ids, tokenizer, settings, *, max_words,
               max_frames):
    self._sources = sources
    self._rows = list(rows)
    self.captions = [c for caps in captions for c in caps]
    self.caption_to_video = np.repeat(np.arange(len(captions), dtype=np.int32),
                                      [len(c) for c in captions])
    self.video_ids = list(video_ids)
    self.num_videos = len(self._rows)
    self._tokenizer = tokenizer
    self._tokens: np.ndarray | None = None
    self._mode = settings["input_mode"]
    self._image_size = int(settings.get("image_size", 0))
    self._feature_dim = int(settings.get("feature_dim", 0))
    self.max_words = int(max_words)
    self.max_frames = int(max_frames)

  def __getstate__(self):
    self._tokenize_all()
    state = dict(self.__dict__)
    state["_tokenizer"] = None
    return state

  def tokens(self, caption_ids):
    self._tokenize_all()
    return self._tokens[caption_ids]

  def _tokenize_all(self) -> None:
    if self._tokens is None:
      tokens = np.asarray(self._tokenizer.encode_batch(self.captions, self.max_words), np.int32)
      if tokens.shape != (len(self.captions), self.max_words):
        raise UserError(f"tokenizer returned shape {tokens.shape}, expected "
                        f"({len(self.captions)}, {self.max_words})")
      self._tokens = tokens

  def video_item_shape(self):
    if self._mode == "frames":
      return (self.max_frames, self._image_size, self._image_size, 3), np.dtype(np.uint8)
    return (self.max_frames, self._feature_dim), np.dtype(np.float32)

  def _records(self, video_ids) -> list[dict]:
    out = [None] * len(video_ids)
    by_source: dict[int, list[int]] = {}
    for pos, vid in enumerate(video_ids):
      by_source.setdefault(self._rows[vid][0], []).append(pos)
    for source_index, positions in by_source.items():
      source = self._sources[source_index]
      keys = [self._rows[video_ids[p]][1] for p in positions]
      records = (source.__getitems__(keys) if hasattr(source, "__getitems__")
                 else [source[k] for k in keys])
      for p, record in zip(positions, records):
        out[p] = record
    return out

  def _fill_video(self, record, rng, out: np.ndarray) -> int:
    """Writes one record's frames (or features) into ``out`` [T, ...], zero-padded; returns
    the number of real frames. Decoding straight into the batch saves copies of every frame."""
    if self._mode == "frames":
      encoded = record["frames"]
      keep = sample_frame_indices(len(encoded), self.max_frames)
      for j, index in enumerate(keep):
        out[j] = self._decode(encoded[index], record)
      if rng is not None:
        out[:len(keep)] = augment_frames(out[:len(keep)], rng)   # numpy buffers the overlap
    else:
      features = np.asarray(record["features"], np.float32)
      keep = sample_frame_indices(features.shape[0], self.max_frames)
      out[:len(keep)] = features[keep]
    out[len(keep):] = 0
    return len(keep)

  def _decode(self, data: bytes, record) -> np.ndarray:
    try:
      frame = video_lib.decode_frame(data)
    except (OSError, ValueError) as err:   # PIL's UnidentifiedImageError is an OSError;
      # a raw frame of the wrong length fails its reshape with ValueError.
      raise UserError(f"a stored frame of video {record.get('video_id', '?')!r} cannot be "
                      f"decoded ({err}); the prepared copy is damaged: delete it and run "
                      "`python -m ncl_jax.data.prepare` again") from None
    if frame.shape != (self._image_size, self._image_size, 3):
      raise UserError(f"a stored frame of video {record.get('video_id', '?')!r} is "
                      f"{frame.shape}, not ({self._image_size}, {self._image_size}, 3); the "
                      "prepared copy is damaged: delete it and prepare it again")
    return frame

  def videos(self, video_ids, rngs=None, out=None):
    video_ids = [int(v) for v in video_ids]
    records = self._records(video_ids)
    rngs = rngs if rngs is not None else [None] * len(video_ids)
    shape, dtype = self.video_item_shape()
    video = np.empty((len(video_ids),) + shape, dtype) if out is None else out
    frame_mask = np.zeros((len(video_ids), self.max_frames), bool)
    for i, (record, rng) in enumerate(zip(records, rngs)):
      frame_mask[i, :self._fill_video(record, rng, video[i])] = True
    return video, frame_mask


def load_prepared(data_config: ConfigDict, tokenizer=None) -> RetrievalDataset:
  """Opens a prepared real data set (see :func:`ncl_jax.data.get_dataset`)."""
  # Only opening a real set imports TensorFlow Datasets (see ncl_jax.data).
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = find_prepared(data_config)
  builder = tfds.builder_from_directory(path)
  meta = builder.info.metadata or {}
  if "splits" not in meta:
    raise UserError(f"{path} lacks the ncl_jax metadata (metadata.json); "
                    f"{_prepare_hint(data_config.name)}")
  settings = meta["settings"]
  if data_config.input_mode == "frames" and settings["input_mode"] == "frames" and \
      int(settings["image_size"]) != int(data_config.get("image_size", settings["image_size"])):
    raise UserError(f"{path} holds {settings['image_size']} px frames but data.image_size is "
                    f"{data_config.image_size}; prepare again or change data.image_size")
  tokenizer = tokenizer if tokenizer is not None else _default_tokenizer(data_config)
  split_names = list(meta["splits"])
  sources = {s: builder.as_data_source(s) for s in split_names}

  def make(parts: Sequence[tuple[str, Sequence[int] | None]]) -> RecordSplit:
    srcs, rows, captions, ids = [], [], [], []
    for split, keep in parts:
      info = meta["splits"][split]
      srcs.append(sources[split])
      chosen = range(len(info["video_ids"])) if keep is None else keep
      for r in chosen:
        rows.append((len(srcs) - 1, r))
        captions.append(info["captions"][r])
        ids.append(info["video_ids"][r])
    return RecordSplit(srcs, rows, captions, ids, tokenizer, settings,
                       max_words=data_config.max_words, max_frames=data_config.max_frames)

  splits = {s: make([(s, None)]) for s in split_names}
  train_split = data_config.get("train_split", "train")
  if train_split not in splits:
    splits[train_split] = _composite_train(train_split, meta, make)
  return RetrievalDataset(
      data_config.name, splits, input_mode=settings["input_mode"], train_split=train_split,
      eval_splits=tuple(s for s in ("val", "test") if s in splits),
      validation_split="val" if "val" in splits else None,
      prefetch=data_config.get("prefetch", 2), augment=data_config.get("augment", False),
      num_workers=data_config.get("num_workers", 2), info={"path": path, "settings": settings,
            "skipped_videos": {s: len(v) for s, v in meta.get("skipped", {}).items()}})


def _composite_train(train_split: str, meta, make) -> RecordSplit:
  """A training split that is a stored subset ("train_7k") or a union ("train+val")."""
  if train_split in meta.get("subsets", {}):
    wanted = set(meta["subsets"][train_split])
    ids = meta["splits"]["train"]["video_ids"]
    return make([("train", [i for i, v in enumerate(ids) if v in wanted])])
  parts = train_split.split("+")
  if len(parts) > 1 and all(p in meta["splits"] for p in parts):
    return make([(p, None) for p in parts])
  choices = list(meta["splits"]) + list(meta.get("subsets", {})) + ["train+val"]
  raise UserError(f"unknown data.train_split {train_split!r}; choose one of {', '.join(choices)}")
