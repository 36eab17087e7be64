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

Sampling, host sharding, batching, worker processes, prefetching and the iterator state are
Grain's (:func:`train_batches`, :func:`iterate`): the order is a pure function of
``(seed, epoch)``, and a restored Grain iterator replays exactly the batches an uninterrupted
one would have produced. Whatever Grain pickles into its worker processes (the splits and the
transforms here) must not import JAX: workers start fresh interpreters.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, Iterator, Sequence

import grain
import numpy as np
from absl import flags

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
    captions: optional list of ``num_texts`` caption strings (None where captions exist only
      as token ids, e.g. the synthetic set).
  """

  caption_to_video: np.ndarray
  num_videos: int
  max_words: int
  max_frames: int
  video_ids: Sequence[str] | None = None
  captions: Sequence[str] | None = None

  @property
  def num_texts(self) -> int:
    return int(self.caption_to_video.shape[0])

  @abc.abstractmethod
  def tokens(self, caption_ids: np.ndarray) -> np.ndarray:
    """Token ids of the given captions: int32 [n, max_words]."""

  @abc.abstractmethod
  def videos(self, video_ids: np.ndarray, rngs: Sequence[np.random.Generator] | None = None,
             out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Videos padded to ``max_frames``: (video [n, T, ...], frame_mask bool [n, T]).

    ``rngs`` (one generator per video) turns on training augmentation; None means none.
    ``out``: an array of the video's shape and dtype to write into (Grain's shared memory in
    worker processes, so that the batch reaches the trainer without another copy).
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

  def videos(self, video_ids, rngs=None, out=None):
    video = np.take(self.video_array, np.asarray(video_ids), axis=0, out=out)
    if rngs is not None and video.dtype == np.uint8:
      for i, rng in enumerate(rngs):
        video[i] = augment_frames(video[i], rng)   # numpy buffers the overlapping flip
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


def _grain_ready() -> None:
  """Lets Grain read its absl flags when the caller parsed none (library use, tests, notebooks).

  Grain's multiprocessing code reads flag values and fails with ``UnparsedFlagAccessError``
  otherwise; marking the flags parsed keeps their defaults and a later ``FLAGS(argv)`` still works.
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _derived_seed(seed: int, stream: int) -> int:
  """A 32-bit seed for one random stream (shuffle, augmentation) of the user's ``seed``.

  Grain reshuffles epoch e with seed + e, so seeds s and s + 1 would share all but one epoch order;
  hashing the user's seed first keeps nearby seeds unrelated.
  """
  if not 0 <= int(seed) < 2**63:
    raise UserError(f"data seed {seed} must be a non-negative integer; change data.seed")
  return int(np.random.SeedSequence([int(seed), stream]).generate_state(1)[0])


class _WithoutAugmentation(grain.transforms.Map):
  """Global batch of caption ids -> ``{"caption_ids": int64 [G]}``."""

  def map(self, caption_ids):
    return {"caption_ids": np.asarray(caption_ids, np.int64)}


class _DrawAugmentationSeeds(grain.transforms.RandomMap):
  """Adds one augmentation seed per caption of a global batch (Grain seeds ``rng`` from the
  pipeline seed and the batch's position, so the draws do not depend on the host count)."""

  def random_map(self, caption_ids, rng: np.random.Generator):
    caption_ids = np.asarray(caption_ids, np.int64)
    return {"caption_ids": caption_ids,
            "augment_seeds": rng.integers(0, 2**63, size=caption_ids.shape, dtype=np.int64)}


@dataclasses.dataclass(frozen=True)
class _HostRows(grain.transforms.Map):
  """Keeps rows ``[start, stop)`` of a global batch: this host's block."""

  start: int
  stop: int

  def map(self, element):
    return {k: v[self.start:self.stop] for k, v in element.items()}


@dataclasses.dataclass(frozen=True)
class _LoadTrainBatch(grain.transforms.Map):
  """Caption ids (and augmentation seeds) -> a training batch; runs in Grain's workers.

  Pickled into every worker process, so it holds only the split (numpy arrays or data sources).
  """

  split: "Split"
  shared_memory: bool = False

  def map(self, element):
    caption_ids = element["caption_ids"]
    rngs = None
    if "augment_seeds" in element:
      rngs = [np.random.default_rng(int(s)) for s in element["augment_seeds"]]
    out = None
    if self.shared_memory:   # in a worker: Grain hands the block to the trainer as it is
      shape, dtype = self.split.video_item_shape()
      out = grain.multiprocessing.SharedMemoryArray((len(caption_ids),) + tuple(shape), dtype)
    video, frame_mask = self.split.videos(self.split.caption_to_video[caption_ids], rngs, out)
    return {"text_tokens": np.asarray(self.split.tokens(caption_ids), np.int32),
            "video": video, "frame_mask": np.asarray(frame_mask, bool)}


def train_batches(split: "Split", global_batch_size: int, *, seed: int, process_index: int = 0,
                  process_count: int = 1, augment: bool = False, shared_memory: bool = False
                  ) -> grain.MapDataset:
  """The endless Grain ``MapDataset`` of this host's training batches (random access by step).

  Element ``k`` is this host's block of global batch ``k``: epoch ``k // steps_per_epoch``
  shuffles all captions (Grain's global shuffle, seeded from ``seed`` and the epoch), cuts them
  into global batches of ``global_batch_size`` (dropping the incomplete tail) and host ``p`` of
  ``n`` takes rows ``[p*b, (p+1)*b)``, ``b = global_batch_size / n``. Nothing depends on the
  host count except which rows a host keeps, so the global batch is the same for any host
  count and any number of worker processes. ``shared_memory``: write videos straight into
  Grain's shared memory (only for iteration in worker processes, see :func:`iterate`).
  """
  local = global_batch_size // process_count
  ds = (grain.MapDataset.range(split.num_texts)
        .shuffle(seed=_derived_seed(seed, 0))
        .batch(global_batch_size, drop_remainder=True)
        .repeat())   # Every epoch is reshuffled (Grain folds the epoch into the seed).
  if augment:
    ds = ds.random_map(_DrawAugmentationSeeds(), seed=_derived_seed(seed, 1))
  else:
    ds = ds.map(_WithoutAugmentation())
  ds = ds.map(_HostRows(process_index * local, (process_index + 1) * local))
  return ds.map(_LoadTrainBatch(split, shared_memory))


def iterate(dataset: grain.MapDataset, *, num_workers: int, prefetch: int
            ) -> grain.DatasetIterator:
  """A Grain iterator over ``dataset``, computed in ``num_workers`` worker processes.

  ``num_workers=0`` computes elements in this process, ``prefetch`` of them ahead in one
  background thread (0: on demand). With workers, each computes its elements (every
  ``num_workers``-th) sequentially and keeps up to ``max(prefetch, 1)`` ready; Grain interleaves
  them back in order, so the elements do not depend on ``num_workers``.
  """
  if num_workers < 0 or prefetch < 0:
    raise UserError(f"data.num_workers ({num_workers}) and data.prefetch ({prefetch}) must be "
                    ">= 0")
  _grain_ready()
  if num_workers == 0:
    read = grain.ReadOptions(num_threads=1 if prefetch else 0, prefetch_buffer_size=prefetch)
    return iter(dataset.to_iter_dataset(read))
  workers = grain.MultiprocessingOptions(num_workers=num_workers,
                                         per_worker_buffer_size=max(prefetch, 1))
  read = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
  return iter(dataset.to_iter_dataset(read).mp_prefetch(workers))


def state_worker_count(state: dict[str, Any]) -> int:
  """The ``num_workers`` of the iterator (:func:`iterate`) whose ``get_state()`` gave ``state``.

  In process the state is one position (``next_index``); with workers, Grain's interleave keeps
  one entry per worker process in ``exhausted``.
  """
  if "exhausted" in state:
    return len(state["exhausted"])
  return 0


def check_state_workers(saved: dict[str, Any], num_workers: int, where: str = "the state") -> None:
  """Raises UserError unless ``saved`` comes from an iterator with ``num_workers`` workers.

  Grain fails on a mismatch with a bare ``KeyError``/``IndexError``, or (1 worker restored
  with 2) restores silently to a wrong position.
  """
  try:
    saved_workers = state_worker_count(saved)
  except TypeError:
    saved_workers = None
  if saved_workers != num_workers:
    raise UserError(f"{where} holds the data-iterator position of data.num_workers="
                    f"{saved_workers}, but this iterator has num_workers={num_workers}; the "
                    "position is kept per worker process, so restore it with "
                    f"data.num_workers={saved_workers} (the batches do not depend on it)")


class TrainIterator:
  """Endless iterator of fixed-size, per-host training batches (a Grain pipeline).

  See :func:`train_batches` for the order and the sharding, :func:`iterate` for the workers.
  The position lives in :attr:`grain_iterator`; :meth:`get_state` / :meth:`set_state` (or
  ``ncl_jax.checkpointing.Checkpointer`` with ``data_iterator=it.grain_iterator``) save and
  restore it, and a restored iterator yields exactly the batches an uninterrupted one would.
  The state holds one position per worker process, so restore with the same ``num_workers``.
  """

  def __init__(self, split: Split, global_batch_size: int, *, seed: int, process_index: int = 0,
               process_count: int = 1, prefetch: int = 2, augment: bool = False,
               num_workers: int = 0):
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise UserError(f"global batch size {global_batch_size} must be a positive multiple of the "
                      f"process count {process_count}; change the batch size in the config")
    if not 0 <= process_index < process_count:
      raise UserError(f"process_index {process_index} is outside [0, {process_count})")
    self.steps_per_epoch = split.num_texts // global_batch_size
    if self.steps_per_epoch == 0:
      raise UserError(f"global batch size {global_batch_size} exceeds the {split.num_texts} "
                      "training examples; use a smaller batch")
    self.dataset = train_batches(split, global_batch_size, seed=seed,
                                 process_index=process_index, process_count=process_count,
                                 augment=augment, shared_memory=num_workers > 0)
    self.num_workers = int(num_workers)
    self.grain_iterator = iterate(self.dataset, num_workers=self.num_workers,
                                  prefetch=int(prefetch))

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The local batch of global step ``step`` (counting across epochs), computed here."""
    return self.dataset[step]

  def get_state(self) -> dict[str, Any]:
    """The position of the next batch, as Grain's JSON-serialisable state dict."""
    return self.grain_iterator.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position saved by :meth:`get_state` (same data settings and workers)."""
    check_state_workers(state, self.num_workers)
    self.grain_iterator.set_state(state)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    try:
      return next(self.grain_iterator)
    except RuntimeError as err:
      if "terminated unexpectedly" not in str(err):
        raise
      # Grain's message when the OS killed a worker (most often: out of memory).
      raise UserError(f"a data worker process died ({err.args[0].splitlines()[0]}); the "
                      "host may be out of memory: lower data.num_workers or data.prefetch, "
                      "or the global batch size") from err

  def close(self) -> None:
    """Stops the worker processes and threads (also done on garbage collection)."""
    close = getattr(self.grain_iterator, "close", None)
    if close is not None:
      close()


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  """Zero-pads ``array`` along axis 0 to ``rows`` rows."""
  missing = rows - array.shape[0]
  if missing == 0:
    return array
  return np.concatenate([array, np.zeros((missing,) + array.shape[1:], array.dtype)])


def _eval_block(total: int, batch_size: int, process_index: int, process_count: int, batch: int
                ) -> tuple[np.ndarray, int]:
  """(item ids, padded row count) of this host's block of global evaluation batch ``batch``."""
  rows = batch_size // process_count
  start = batch * batch_size
  first = min(start + process_index * rows, total)
  return np.arange(first, min(first + rows, start + batch_size, total)), rows


@dataclasses.dataclass(frozen=True)
class _LoadEvalTexts(grain.transforms.Map):
  split: "Split"
  batch_size: int
  process_index: int
  process_count: int

  def map(self, batch):
    ids, rows = _eval_block(self.split.num_texts, self.batch_size, self.process_index,
                            self.process_count, int(batch))
    return {"text_tokens": _pad_rows(np.asarray(self.split.tokens(ids), np.int32), rows),
            "mask": _pad_rows(np.ones(len(ids), bool), rows)}


@dataclasses.dataclass(frozen=True)
class _LoadEvalVideos(grain.transforms.Map):
  split: "Split"
  batch_size: int
  process_index: int
  process_count: int

  def map(self, batch):
    ids, rows = _eval_block(self.split.num_videos, self.batch_size, self.process_index,
                            self.process_count, int(batch))
    if len(ids):
      video, frame_mask = self.split.videos(ids)
    else:   # This host's block is all padding.
      shape, dtype = self.split.video_item_shape()
      video, frame_mask = np.zeros((0,) + shape, dtype), np.zeros((0, shape[0]), bool)
    return {"video": _pad_rows(video, rows), "frame_mask": _pad_rows(frame_mask, rows),
            "mask": _pad_rows(np.ones(len(ids), bool), rows)}


class EvalData:
  """One evaluation split served as padded, masked batches; nothing is ever dropped.

  Batches come from a Grain ``MapDataset`` read ahead by ``num_threads`` threads of this process
  (evaluation is short and runs between training steps, so it does not start worker processes;
  JPEG decoding releases the GIL).

  Attributes:
    name: the split name.
    num_texts, num_videos: query and gallery counts.
    caption_to_video: int32 [num_texts], the ground-truth video of each caption.
    video_ids: the videos' names, or None.
    captions: the caption strings, or None (token ids only).
  """

  def __init__(self, split: Split, name: str, *, num_threads: int = 1, prefetch: int = 2):
    self._split = split
    self.name = name
    self.num_texts = split.num_texts
    self.num_videos = split.num_videos
    self.caption_to_video = np.asarray(split.caption_to_video, np.int32)
    self.video_ids = split.video_ids
    self.captions = split.captions
    self._num_threads = max(int(num_threads), 1)
    self._prefetch = max(int(prefetch), 0)

  def text_batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1
                   ) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{"text_tokens": int32 [bs, L], "mask": bool [bs]}``, the last batch zero-padded.

    With several processes, each global batch of ``batch_size`` rows is split into
    ``process_count`` contiguous blocks and this host gets block ``process_index`` (bs =
    batch_size / process_count); every host yields the same number of batches.
    """
    return self._batches(self.num_texts, _LoadEvalTexts(self._split, batch_size, process_index,
                                                        process_count))

  def video_batches(self, batch_size: int, *, process_index: int = 0, process_count: int = 1
                    ) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``{"video", "frame_mask", "mask": bool [bs]}``, the last batch zero-padded
    (hosts split each global batch as in :meth:`text_batches`)."""
    return self._batches(self.num_videos, _LoadEvalVideos(self._split, batch_size, process_index,
                                                         process_count))

  def _batches(self, total: int, load) -> Iterator[dict[str, np.ndarray]]:
    if (load.batch_size <= 0 or load.batch_size % load.process_count
        or not 0 <= load.process_index < load.process_count):
      raise UserError(f"evaluation batch size {load.batch_size} must be a positive multiple of "
                      f"the process count {load.process_count} (process index "
                      f"{load.process_index})")
    num_batches = -(-total // load.batch_size)
    dataset = grain.MapDataset.range(num_batches).map(load)
    threads = min(self._num_threads, self._prefetch) if self._prefetch else 0
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=self._prefetch)
    return iter(dataset.to_iter_dataset(read))


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
               num_workers: int = 0, info: dict[str, Any] | None = None):
    self.name = name
    self._splits = dict(splits)
    self.input_mode = input_mode
    self.train_split = train_split
    self.eval_splits = tuple(eval_splits)
    self.validation_split = validation_split
    self._prefetch = prefetch
    self._augment = augment
    self._num_workers = int(num_workers)
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
                     process_count: int = 1, num_workers: int | None = None) -> TrainIterator:
    """An endless iterator of this host's training batches (see :class:`TrainIterator`);
    ``num_workers`` (default: the data set's ``data.num_workers``) Grain worker processes."""
    workers = self._num_workers if num_workers is None else num_workers
    return TrainIterator(self._splits[self.train_split], global_batch_size, seed=seed,
                         process_index=process_index, process_count=process_count,
                         prefetch=self._prefetch, augment=self._augment, num_workers=workers)

  def eval_data(self, split: str) -> EvalData:
    """Padded evaluation batches of ``split``: any of ``split_names``, e.g. the training split
    for a bank of training queries."""
    if split not in self._splits:
      raise UserError(f"data set {self.name!r} has no split {split!r}; "
                      f"available: {', '.join(self._splits)}")
    return EvalData(self._splits[split], split, num_threads=max(self._num_workers, 1),
                    prefetch=self._prefetch)
