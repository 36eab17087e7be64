"""The input pipeline shared by every data set: splits, training iterators and evaluation batches.

A data set is a few *splits*. A split holds ``num_videos`` videos and ``num_texts`` captions;
``caption_to_video[i]`` is the video of caption ``i`` (several captions may share a video). The
storage behind a split (arrays in memory for the synthetic set, TFDS array_record files for the
real ones) only has to answer two random-access queries, :meth:`Split.tokens` and
:meth:`Split.videos`; everything else (sharding, shuffling, batching, padding, prefetching,
resumable state) lives here once.

Training samples are captions: each caption with its video is one example, so a video with 20
captions (MSR-VTT) is seen 20 times per epoch, as in CLIP4Clip. Batches have static shapes:

* ``text_tokens``: int32 [b, L]
* ``video``: float32 [b, T, D] (features mode) or uint8 [b, T, H, W, 3] (frames mode; apply
  :func:`normalize_frames` on the device, which keeps host-to-device copies 4x smaller)
* ``frame_mask``: bool [b, T], True for real frames

Shuffling is a permutation per epoch drawn from ``(seed, epoch)``, so an iterator's position is
just ``(epoch, step)`` and a restored iterator replays exactly the batches an uninterrupted one
would have produced.
"""

from __future__ import annotations

import abc
import dataclasses
import queue
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from ncl_jax.errors import UserError

# CLIP's image normalisation (OpenAI CLIP, `clip/clip.py::_transform`), RGB order.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize_frames(frames, xp=np):
  """Maps uint8 RGB frames [..., H, W, 3] to CLIP-normalised float32 (works with jax.numpy too)."""
  mean = xp.asarray(CLIP_MEAN, dtype=xp.float32) * 255.0
  std = xp.asarray(CLIP_STD, dtype=xp.float32) * 255.0
  return (xp.asarray(frames).astype(xp.float32) - mean) / std


def sample_frame_indices(num_frames: int, max_frames: int) -> np.ndarray:
  """Indices of at most ``max_frames`` frames spread uniformly over ``num_frames`` (int64 [k]).

  CLIP4Clip's ``slice_framepos=2``: keep every frame when there are few enough, otherwise take
  ``max_frames`` evenly spaced indices from the first to the last frame.
  """
  if num_frames <= max_frames:
    return np.arange(num_frames)
  return np.linspace(0, num_frames - 1, num=max_frames).astype(np.int64)


class Split(abc.ABC):
  """Random access to one split's captions and videos.

  Attributes:
    caption_to_video: int32 [num_texts], the video index of each caption.
    num_videos: number of videos.
    max_words: L, the token length of every caption.
    max_frames: T, the frame count every video is padded to.
    video_ids: optional list of ``num_videos`` names, for reports and score dumps.
  """

  caption_to_video: np.ndarray
  num_videos: int
  max_words: int
  max_frames: int
  video_ids: Sequence[str] | None = None

  @property
  def num_texts(self) -> int:
    return int(self.caption_to_video.shape[0])

  @abc.abstractmethod
  def tokens(self, caption_ids: np.ndarray) -> np.ndarray:
    """Token ids of the given captions: int32 [n, max_words]."""

  @abc.abstractmethod
  def videos(self, video_ids: np.ndarray,
             rngs: Sequence[np.random.Generator] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Videos padded to ``max_frames``: (video [n, T, ...], frame_mask bool [n, T]).

    ``rngs`` (one generator per video) turns on training augmentation; None means none.
    """

  @abc.abstractmethod
  def video_item_shape(self) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one padded video, e.g. ((T, D), float32)."""


@dataclasses.dataclass
class ArraySplit(Split):
  """A split held in memory as arrays (the synthetic set, tests).

  Attributes:
    text_tokens: int32 [num_texts, L].
    video_array: [num_videos, T, ...] (float32 features or uint8 frames), zero where masked.
    frame_mask: bool [num_videos, T].
    caption_to_video: int32 [num_texts].
  """

  text_tokens: np.ndarray
  video_array: np.ndarray
  frame_mask: np.ndarray
  caption_to_video: np.ndarray
  video_ids: Sequence[str] | None = None

  def __post_init__(self):
    self.num_videos = int(self.video_array.shape[0])
    self.max_words = int(self.text_tokens.shape[1])
    self.max_frames = int(self.video_array.shape[1])

  def tokens(self, caption_ids):
    return self.text_tokens[caption_ids]

  def videos(self, video_ids, rngs=None):
    video = self.video_array[video_ids]
    if rngs is not None and video.dtype == np.uint8:
      video = np.stack([augment_frames(v, r) for v, r in zip(video, rngs)])
    return video, self.frame_mask[video_ids]

  def video_item_shape(self):
    return tuple(self.video_array.shape[1:]), self.video_array.dtype


def augment_frames(frames: np.ndarray, rng: np.random.Generator) -> np.ndarray:
  """Training augmentation for uint8 frames [T, H, W, 3]: a horizontal flip with probability 1/2.

  The same flip applies to every frame of a clip, so motion stays consistent. (CLIP4Clip trains
  without augmentation; this is off unless ``data_config.augment`` is set.)
  """
  if rng.random() < 0.5:
    return frames[:, :, ::-1, :]
  return frames


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pads ``array`` along axis 0 to ``rows`` rows."""
  missing = rows - array.shape[0]
  if missing == 0:
    return array
  return np.concatenate([array, np.zeros((missing,) + array.shape[1:], array.dtype)])


class EvalData:
  """One evaluation split served as padded, masked batches; nothing is ever dropped.

  Attributes:
    name: the split name.
    num_texts, num_videos: query and gallery counts.
    caption_to_video: int32 [num_texts], the ground-truth video of each caption.
    video_ids: the videos' names, or None.
  """

  def __init__(self, split: Split, name: str):
    self._split = split
    self.name = name
    self.num_texts = split.num_texts
    self.num_videos = split.num_videos
    self.caption_to_video = np.asarray(split.caption_to_video, np.int32)
    self.video_ids = split.video_ids

  def text_batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{"text_tokens": int32 [bs, L], "mask": bool [bs]}``, the last batch zero-padded.

    With several processes, each global batch of ``batch_size`` rows is split into
    ``process_count`` contiguous blocks and this host gets block ``process_index`` (bs =
    batch_size / process_count); every host yields the same number of batches.
    """
    for ids, rows in self._blocks(self.num_texts, batch_size, process_index, process_count):
      yield {"text_tokens": _pad_rows(self._split.tokens(ids), rows),
             "mask": _pad_rows(np.ones(len(ids), bool), rows)}

  def video_batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{"video", "frame_mask", "mask": bool [bs]}``, the last batch zero-padded
    (hosts split each global batch as in :meth:`text_batches`)."""
    for ids, rows in self._blocks(self.num_videos, batch_size, process_index, process_count):
      if len(ids):
        video, frame_mask = self._split.videos(ids)
      else:   # This host's block is all padding.
        shape, dtype = self._split.video_item_shape()
        video, frame_mask = np.zeros((0,) + shape, dtype), np.zeros((0, shape[0]), bool)
      yield {"video": _pad_rows(video, rows), "frame_mask": _pad_rows(frame_mask, rows),
             "mask": _pad_rows(np.ones(len(ids), bool), rows)}

  @staticmethod
  def _blocks(total: int, batch_size: int, process_index: int, process_count: int):
    """(item ids, padded row count) of this host's block of every global batch."""
    if batch_size <= 0 or batch_size % process_count or not 0 <= process_index < process_count:
      raise UserError(f"evaluation batch size {batch_size} must be a positive multiple of the "
                      f"process count {process_count} (process index {process_index})")
    rows = batch_size // process_count
    for start in range(0, total, batch_size):
      first = min(start + process_index * rows, total)
      yield np.arange(first, min(first + rows, start + batch_size, total)), rows


class TrainIterator:
  """Endless iterator of fixed-size, per-host training batches with a saveable position.

  Each epoch shuffles all training captions with ``np.random.default_rng([seed, epoch])`` and
  cuts the permutation into global batches of ``global_batch_size`` (the incomplete tail is
  dropped); host ``process_index`` takes rows ``[p*b, (p+1)*b)`` of every global batch, so hosts
  see disjoint examples. A background thread prepares up to ``prefetch`` batches ahead.
  """

  def __init__(self, split: Split, global_batch_size: int, *, seed: int, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2, augment: bool = False):
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise UserError(f"global batch size {global_batch_size} must be a positive multiple of the "
                      f"process count {process_count}; change the batch size in the config")
    if not 0 <= process_index < process_count:
      raise UserError(f"process_index {process_index} is outside [0, {process_count})")
    self.steps_per_epoch = split.num_texts // global_batch_size
    if self.steps_per_epoch == 0:
      raise UserError(f"global batch size {global_batch_size} exceeds the {split.num_texts} "
                      "training examples; use a smaller batch")
    self._split = split
    self._global = global_batch_size
    self._local = global_batch_size // process_count
    self._offset = process_index * self._local
    self._seed = int(seed)
    self._prefetch = max(int(prefetch), 0)
    self._augment = augment
    self._epoch = 0
    self._step = 0
    self._perm_cache: tuple[int, np.ndarray] | None = None
    self._worker: _Prefetcher | None = None

  # Position and state ------------------------------------------------------------------------

  def get_state(self) -> dict[str, int]:
    """The position of the next batch ``next()`` returns, as a small JSON-serialisable dict."""
    return {"epoch": self._epoch, "step": self._step, "seed": self._seed,
            "global_batch_size": self._global}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position saved by :meth:`get_state` (same seed and global batch size)."""
    if int(state["seed"]) != self._seed or int(state["global_batch_size"]) != self._global:
      raise UserError(
          f"iterator state was saved with seed {state['seed']} and global batch size "
          f"{state['global_batch_size']}, but this run uses {self._seed} and {self._global}; "
          "resume with the original data settings")
    self._stop_worker()
    self._epoch, self._step = int(state["epoch"]), int(state["step"])

  # Batches -----------------------------------------------------------------------------------

  def _permutation(self, epoch: int) -> np.ndarray:
    if self._perm_cache is None or self._perm_cache[0] != epoch:
      rng = np.random.default_rng([self._seed, epoch])
      self._perm_cache = (epoch, rng.permutation(self._split.num_texts))
    return self._perm_cache[1]

  def batch_at(self, epoch: int, step: int) -> dict[str, np.ndarray]:
    """The local batch at a position; pure in (seed, epoch, step, process index)."""
    start = step * self._global + self._offset
    caption_ids = np.sort(self._permutation(epoch)[start:start + self._local])
    # Sorting keeps storage reads near-sequential; it only reorders rows inside the batch.
    rngs = None
    if self._augment:
      rngs = [np.random.default_rng([self._seed, epoch, int(c), 1]) for c in caption_ids]
    video, frame_mask = self._split.videos(self._split.caption_to_video[caption_ids], rngs)
    return {"text_tokens": np.asarray(self._split.tokens(caption_ids), np.int32),
            "video": video, "frame_mask": np.asarray(frame_mask, bool)}

  def _positions(self, epoch: int, step: int) -> Iterator[tuple[int, int]]:
    while True:
      yield epoch, step
      step += 1
      if step == self.steps_per_epoch:
        epoch, step = epoch + 1, 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._prefetch == 0:
      batch = self.batch_at(self._epoch, self._step)
    else:
      if self._worker is None:
        self._worker = _Prefetcher(self, self._positions(self._epoch, self._step), self._prefetch)
      try:
        batch = self._worker.get()
      except BaseException:
        self._stop_worker()   # The next call retries the same position with a fresh thread.
        raise
    self._step += 1
    if self._step == self.steps_per_epoch:
      self._epoch, self._step = self._epoch + 1, 0
    return batch

  def _stop_worker(self):
    if getattr(self, "_worker", None) is not None:
      self._worker.stop()
      self._worker = None

  def close(self) -> None:
    """Stops the prefetch thread (also safe to skip: the thread is a daemon)."""
    self._stop_worker()

  def __del__(self):
    self._stop_worker()


class _Prefetcher:
  """A daemon thread that fills a bounded queue with batches in position order."""

  def __init__(self, owner: TrainIterator, positions: Iterator[tuple[int, int]], depth: int):
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(owner, positions), daemon=True)
    self._thread.start()

  def _run(self, owner: TrainIterator, positions: Iterator[tuple[int, int]]):
    for epoch, step in positions:
      try:
        item = owner.batch_at(epoch, step)
      except BaseException as err:  # Handed to the consumer, which re-raises it.
        item = err
      while not self._stop.is_set():
        try:
          self._queue.put(item, timeout=0.1)
          break
        except queue.Full:
          continue
      if self._stop.is_set() or isinstance(item, BaseException):
        return

  def get(self) -> dict[str, np.ndarray]:
    item = self._queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def stop(self):
    self._stop.set()
    self._thread.join(timeout=10)


class RetrievalDataset:
  """A text-video retrieval data set: training iterator plus evaluation splits.

  Attributes:
    name: the data set name.
    input_mode: "features" or "frames".
    max_words, max_frames: L and T of every batch.
    train_split: name of the split used for training.
    eval_splits: the evaluation split names, validation first, e.g. ("val", "test").
    validation_split: the split to select models on (never the test split), or None.
    info: free-form dict describing how the data was made (shown in reports).
  """

  def __init__(self, name: str, splits: dict[str, Split], *, input_mode: str,
               train_split: str = "train", eval_splits: Sequence[str] = ("val", "test"),
               validation_split: str | None = "val", prefetch: int = 2, augment: bool = False,
               info: dict[str, Any] | None = None):
    self.name = name
    self._splits = dict(splits)
    self.input_mode = input_mode
    self.train_split = train_split
    self.eval_splits = tuple(eval_splits)
    self.validation_split = validation_split
    self._prefetch = prefetch
    self._augment = augment
    self.info = dict(info or {})
    train = self._splits[train_split]
    self.max_words = train.max_words
    self.max_frames = train.max_frames

  @property
  def split_names(self) -> tuple[str, ...]:
    return tuple(self._splits)

  @property
  def num_train_examples(self) -> int:
    return self._splits[self.train_split].num_texts

  def steps_per_epoch(self, global_batch_size: int) -> int:
    """Full global batches per epoch (the incomplete tail batch is dropped)."""
    return self.num_train_examples // global_batch_size

  def video_item_shape(self) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one video in a batch, e.g. ((8, 64), float32)."""
    return self._splits[self.train_split].video_item_shape()

  def train_iterator(self, global_batch_size: int, *, seed: int, process_index: int = 0,
                     process_count: int = 1) -> TrainIterator:
    """An endless iterator of this host's training batches (see :class:`TrainIterator`)."""
    return TrainIterator(self._splits[self.train_split], global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count,
                         prefetch=self._prefetch, augment=self._augment)

  def eval_data(self, split: str) -> EvalData:
    """Padded evaluation batches of ``split``: any of ``split_names``, e.g. the training split
    for a bank of training queries."""
    if split not in self._splits:
      raise UserError(f"data set {self.name!r} has no split {split!r}; "
                      f"available: {', '.join(self._splits)}")
    return EvalData(self._splits[split], split)
