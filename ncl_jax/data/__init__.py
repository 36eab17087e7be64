"""Data sets for text-video retrieval: the synthetic set, prepared real sets and the pipeline.

Entry points:

* :func:`default_data_config` (``name``) returns the ``config.data`` defaults of a data set.
* :func:`get_dataset` (``data_config``, ``tokenizer``) returns a :class:`RetrievalDataset`
  with ``train_iterator``, ``eval_data``, ``eval_splits`` and ``validation_split``.
* ``python -m ncl_jax.data.prepare DATASET ...`` builds the real sets (see docs/data.md,
  "Preparing datasets").

Importing this package does not import tensorflow_datasets; the real sets import it on use.
"""

from __future__ import annotations

from ml_collections import ConfigDict

from ncl_jax.data import prepared, synthetic
from ncl_jax.data.pipeline import (CLIP_MEAN, CLIP_STD, EvalData, RetrievalDataset, TrainIterator,
                                   normalize_frames, sample_frame_indices)
from ncl_jax.errors import UserError

# coco and flickr30k: image-text retrieval, images as one-frame videos (ncl_jax.data.image_text).
REAL_DATASETS = ("msrvtt", "msvd", "activitynet", "didemo", "coco", "flickr30k")
DATASETS = ("synthetic",) + REAL_DATASETS

# CLIP4Clip's words / frames per data set (retrieval-background.md §2).
_REAL_LIMITS = {"msrvtt": (32, 12), "msvd": (32, 12), "activitynet": (64, 64),
                "didemo": (64, 64), "coco": (32, 1), "flickr30k": (32, 1)}

__all__ = ["CLIP_MEAN", "CLIP_STD", "DATASETS", "EvalData", "REAL_DATASETS", "RetrievalDataset",
           "TrainIterator", "default_data_config", "get_dataset", "normalize_frames",
           "sample_frame_indices"]


def default_data_config(name: str) -> ConfigDict:
  """The ``config.data`` defaults for data set ``name`` (one of :data:`DATASETS`).

  Common fields: ``name``, ``data_dir`` (where ``prepare`` wrote the data; unused by the
  synthetic set), ``max_words`` (L), ``max_frames`` (T), ``input_mode`` ("features" |
  "frames"), ``seed`` (with the epoch it fixes the training order), ``prefetch`` (batches
  prepared ahead), ``num_workers`` (Grain worker processes that read, decode and augment
  training batches; 0 = in the main process) and ``augment``
  (frames mode: random horizontal flips; off by default, as in CLIP4Clip). Real sets add
  ``image_size``, ``builder_config`` (which prepared variant to read; "" picks the only one
  matching ``input_mode``), ``train_split`` (MSR-VTT: "train" = 9k or "train_7k") and
  ``vocab_path`` (CLIP's ``bpe_simple_vocab_16e6.txt.gz`` or a folder holding it, for the
  default tokenizer; "" uses the copy in an installed ``clip`` package).
  """
  if name == "synthetic":
    return synthetic.default_config()
  if name not in REAL_DATASETS:
    raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
  max_words, max_frames = _REAL_LIMITS[name]
  return ConfigDict(dict(
      name=name, data_dir="", input_mode="frames", seed=0, max_words=max_words,
      max_frames=max_frames, image_size=224, builder_config="", train_split="train",
      prefetch=2, augment=False, num_workers=2, vocab_path=""))


def get_dataset(data_config: ConfigDict, tokenizer=None) -> RetrievalDataset:
  """Opens the data set that ``data_config`` describes.

  Args:
    data_config: a ConfigDict as from :func:`default_data_config`.
    tokenizer: for the real sets, an object with ``encode_batch(list[str], context_length) ->
      int32 [N, L]`` (default: CLIP's BPE, ``ncl_jax.tokenizer.ClipTokenizer`` with
      ``data_config.vocab_path``). The synthetic set already has token ids and ignores it.

  Raises:
    UserError: unknown name, or a real set whose prepared data is missing (the message says
      how to prepare it).
  """
  name = data_config.name
  if name == "synthetic":
    return synthetic.make_synthetic(data_config)
  if name not in REAL_DATASETS:
    raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)}")
  return prepared.load_prepared(data_config, tokenizer)
