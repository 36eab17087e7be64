"""tensorflow-datasets builders for MSR-VTT, MSVD, ActivityNet Captions and DiDeMo.

No TensorFlow is needed: the builders write ``array_record`` files, which are read back with
random access through ``builder.as_data_source(split)`` (see :mod:`ncl_jax.data.prepared`).

One record per video: its id, its captions, and either its sampled frames (frames mode: JPEG
or raw bytes of each 1-fps frame after resize + centre crop, see :mod:`ncl_jax.data.video`) or its
precomputed per-frame features (features mode: float32 [T, D] from ``{video}.npy``). Records
keep the annotation order (``disable_shuffling``: the pipeline shuffles), and the dataset
metadata repeats every split's video ids and captions so a reader can index captions without
scanning the frames.

A video whose file is missing or cannot be decoded is skipped and recorded in the metadata; the
build fails when more than ``max_bad_fraction`` of a split is bad. Videos are loaded in this
process (threads) or, with ``beam=True``, by Apache Beam workers
(:mod:`ncl_jax.data.beam_prepare`); both write the same records and metadata.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import time
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds

from ncl_jax.data import annotation_readers as annotations_lib
from ncl_jax.data import video as video_lib
from ncl_jax.data.pipeline import sample_frame_indices
from ncl_jax.errors import UserError

VERSION = tfds.core.Version("1.0.0")
DEFAULT_MAX_FRAMES = {"msrvtt": 12, "msvd": 12, "activitynet": 64, "didemo": 64}


@dataclasses.dataclass
class RetrievalConfig(tfds.core.BuilderConfig):
  """How videos are stored.

  Attributes:
    input_mode: "frames" (decoded, sampled, JPEG-encoded frames) or "features" (.npy [T, D]).
    max_frames: T, the most frames kept per video (uniform subsampling above it).
    image_size: frames mode: output height and width after resize + centre crop.
    fps: frames mode: frames sampled per second.
    jpeg_quality: frames mode: JPEG quality of the stored frames.
    frame_format: frames mode: "jpeg" (default) or "raw" uint8 pixels (no decoding when
      training, about 2-10x the disk space; see ncl_jax.data.video.encode_frame).
  """

  input_mode: str = "frames"
  max_frames: int = 12
  image_size: int = 224
  fps: float = 1.0
  jpeg_quality: int = 95
  frame_format: str = "jpeg"


def config_name(input_mode: str, max_frames: int, image_size: int = 224, fps: float = 1.0,
                jpeg_quality: int = 95, frame_format: str = "jpeg") -> str:
  """The builder config name of a storage setting, e.g. "frames_12f_224px", "features_12f".

  Non-default frame rates, JPEG qualities and raw frames are part of the name
  ("..._2fps_q90", "..._raw"), so differently made copies never share a folder.
  """
  if input_mode == "features":
    return f"features_{max_frames}f"
  if input_mode != "frames":
    raise UserError(f"input mode {input_mode!r} is neither 'frames' nor 'features'")
  name = f"frames_{max_frames}f_{image_size}px"
  if fps != 1.0:
    name += f"_{fps:g}fps".replace(".", "p")
  if frame_format not in video_lib.FRAME_FORMATS:
    raise UserError(f"frame format {frame_format!r} is not one of "
                    f"{', '.join(video_lib.FRAME_FORMATS)}")
  if frame_format == "raw":
    return name + "_raw"
  if jpeg_quality != 95:
    name += f"_q{jpeg_quality}"
  return name


def make_config(input_mode: str, max_frames: int, image_size: int = 224, fps: float = 1.0,
                jpeg_quality: int = 95, frame_format: str = "jpeg") -> RetrievalConfig:
  name = config_name(input_mode, max_frames, image_size, fps, jpeg_quality, frame_format)
  return RetrievalConfig(name=name, description=f"{input_mode}, up to {max_frames} frames",
                         input_mode=input_mode, max_frames=max_frames, image_size=image_size,
                         fps=fps, jpeg_quality=jpeg_quality, frame_format=frame_format)


_VIDEO_NOTE = """
Frames mode (default) also needs the videos, found recursively by file name under
`--videos_dir` (default: `<manual_dir>/videos`; .mp4 .webm .avi .mkv .mov ...). Features mode
instead needs one NumPy file `<video>.npy` of shape [T, D] per video under `--features_dir`
(e.g. per-frame CLIP features at 1 fps). Then run
`python -m ncl_jax.data.prepare {name} --manual_dir DIR --data_dir OUT`.
"""


def record_features(input_mode: str,
                    encoding=tfds.features.Encoding.BYTES) -> tfds.features.FeaturesDict:
  """The record layout every builder writes: an id, its captions, and frames or features."""
  if input_mode == "frames":
    stored = {"frames": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_))}
  else:
    stored = {"features": tfds.features.Tensor(shape=(None, None), dtype=np.float32,
                                               encoding=encoding)}
  return tfds.features.FeaturesDict({
      "video_id": tfds.features.Text(),
      "captions": tfds.features.Sequence(tfds.features.Text()),
      **stored})


@dataclasses.dataclass(frozen=True)
class ItemLoader:
  """Loads one item of a split into its record, or says why it cannot: the unit of work of both
  the in-process build (threads) and the Beam build (worker processes), so both store the same
  values. Picklable: the builder class is pickled by reference, its config by value.

  Calling it with ``(index, (entry, path))`` returns ``(status, example)``: ``status`` is the
  JSON-able account of the item (``index``, ``id``, ``captions``, ``path``, ``error`` (None or
  why it was skipped), ``feature_dim``, and when and where it was loaded: ``started`` (epoch
  seconds), ``seconds``, ``pid``), ``example`` its record or None when skipped.
  """

  builder_class: type
  config: Any
  decoder_threads: int = 0   # FFmpeg threads per video (video.set_decoder_threads); 0 = auto

  def __call__(self, index: int, item) -> tuple[dict[str, Any], dict[str, Any] | None]:
    entry, path = item
    # Set here, not once per process: Beam runs the loader in worker processes.
    video_lib.set_decoder_threads(self.decoder_threads)
    item_id = self.builder_class.item_id(entry)
    status = {"index": index, "id": item_id, "captions": list(entry.captions), "path": path,
              "error": None, "feature_dim": None, "started": time.time(), "pid": os.getpid()}
    loaded = None
    if path is None:
      status["error"] = "file not found"
    else:
      try:
        loaded = self.builder_class.load_item(self.config, entry, path)
      except video_lib.VideoDecodeError as err:
        status["error"] = str(err)
    status["seconds"] = time.time() - status["started"]
    if loaded is None:
      return status, None
    if "features" in loaded:
      status["feature_dim"] = int(loaded["features"].shape[1])
    return status, {"video_id": item_id, "captions": list(entry.captions), **loaded}


class StoredItemsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """What the video and image-text builders share: bad-item accounting, parallel loading and
  record writing. Subclasses plan the splits and define ``load_item(config, entry, path)``, which
  returns the stored frames or features of one entry and raises VideoDecodeError for an
  unusable file.

  Items are loaded either in this process by a pool of ``num_workers`` threads, or, with
  ``beam=True``, by Apache Beam worker processes (:mod:`ncl_jax.data.beam_prepare`; the runner
  and its options come with ``download_and_prepare``'s ``DownloadConfig``). Both record the same
  examples, metadata and skipped items.

  Args (besides the TFDS ones; the prepare command passes them unchanged to every builder):
    videos_dir: the folder of videos (or images) in frames mode.
    features_dir: the folder of ``.npy`` feature files in features mode.
    max_bad_fraction: fail when a larger fraction of a split is missing or unreadable.
    num_workers: decoding threads of the in-process build.
    beam: build with Apache Beam instead.
    decoder_threads: FFmpeg threads that decode one video (0 = FFmpeg's choice).
  """

  VERSION = VERSION
  DATASET = ""
  ITEM_NOUN = "videos"  # what an item is called in error messages

  def __init__(self, *, videos_dir: str | None = None, features_dir: str | None = None,
               max_bad_fraction: float = 0.01, num_workers: int = 2, beam: bool = False,
               decoder_threads: int = 0, **kwargs):
    self._videos_dir = videos_dir
    self._features_dir = features_dir
    self._max_bad_fraction = max_bad_fraction
    self._num_workers = max(int(num_workers), 1)
    self._beam = bool(beam)
    self._decoder_threads = int(decoder_threads)
    self._beam_splits: dict[str, tuple[int, str]] = {}   # split -> (items, status folder)
    self._load_times: list[tuple[float, float, int]] = []   # (start, end, pid) per item
    super().__init__(**kwargs)

  # TFDS prints "Downloading and preparing dataset Unknown size (...)" (these sets are read from
  # local files, so it knows no size) and "... Subsequent calls will reuse this data." to stdout;
  # the prepare command prints its own summary, so both lines would only be noise.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def loading_stats(self) -> dict[str, Any] | None:
    """How the items of this build were loaded: count, seconds during which at least one item
    was loading (Beam's start-up, the gaps between splits and the writing of records excluded),
    the sum of the items' own loading times (busy / seconds: how many loaded at once on
    average), processes used, and items per second of loading. None when nothing was built (an existing copy
    was reused)."""
    if not self._load_times:
      return None
    span, covered_until = 0.0, float("-inf")
    for start, end, _ in sorted(self._load_times):
      if end > covered_until:
        span += end - max(start, covered_until)
        covered_until = end
    busy = sum(end - start for start, end, _ in self._load_times)
    return {"items": len(self._load_times), "seconds": round(span, 3),
            "busy_seconds": round(busy, 3),
            "processes": len({t[2] for t in self._load_times}), "noun": self.ITEM_NOUN,
            "items_per_s": round(len(self._load_times) / max(span, 1e-9), 3)}

  def _check_bad(self, split: str, bad: int, total: int, what: str, examples: list[str]):
    if total and bad / total > self._max_bad_fraction:
      raise UserError(
          f"{bad} of {total} {self.ITEM_NOUN} of the {self.DATASET} {split} split are {what} "
          f"(e.g. {', '.join(examples[:3])}), more than "
          f"--max_bad_fraction={self._max_bad_fraction}; check the {self.ITEM_NOUN} folder or "
          "raise --max_bad_fraction")

  def _check_missing(self, split: str, missing: list[str], total: int, folder: str):
    """Stops when every item of a split is missing (an empty split) or too many are."""
    if total and len(missing) == total:
      raise UserError(f"the {self.DATASET} {split} split is empty: none of its {total} "
                      f"{self.ITEM_NOUN} (e.g. {missing[0]}) is in {folder}; check "
                      "--videos_dir / --features_dir")
    self._check_bad(split, len(missing), total, "missing", missing)

  @staticmethod
  def item_id(entry) -> str:
    return entry.video_id

  @classmethod
  def load_item(cls, config, entry, path: str) -> dict[str, Any]:
    """The stored features of one item at ``path`` (the abstract hook every builder defines)."""
    raise NotImplementedError(f"{cls.__name__} must define load_item(config, entry, path)")

  @staticmethod
  def _check_feature_dims(kept: list[dict[str, Any]]) -> int | None:
    """The one feature size of a split's kept items (features mode), else a UserError."""
    dims = {s["feature_dim"] for s in kept if s["feature_dim"] is not None}
    if len(dims) > 1:
      first = kept[0]["feature_dim"]
      odd = next(s for s in kept if s["feature_dim"] != first)
      raise UserError(f"feature files disagree on the feature size ({sorted(dims)}); "
                      f"{odd['path']} differs from {kept[0]['path']}")
    return dims.pop() if dims else None

  def _finish_split(self, split: str, statuses: list[dict[str, Any]], total: int) -> None:
    """Records a split's kept and skipped items (in item order) in the metadata; stops when too
    many are bad or none is left."""
    statuses = sorted(statuses, key=lambda s: s["index"])
    self._load_times.extend((s["started"], s["started"] + s["seconds"], s["pid"])
                            for s in statuses)
    kept = [s for s in statuses if s["error"] is None]
    skipped = [[s["id"], s["error"]] for s in statuses if s["error"] is not None]
    meta = self.info.metadata
    dim = self._check_feature_dims(kept)
    if dim is not None:
      meta["settings"]["feature_dim"] = dim
    meta["splits"][split] = {"video_ids": [s["id"] for s in kept],
                             "captions": [s["captions"] for s in kept]}
    meta["skipped"][split] = skipped
    self._check_bad(split, len(skipped), total, "missing or undecodable", [s[0] for s in skipped])
    if not kept:
      raise UserError(f"the {self.DATASET} {split} split is empty: all {total} "
                      f"{self.ITEM_NOUN} are missing or undecodable (e.g. {skipped[0][0]}: "
                      f"{skipped[0][1]})")

  def _loader(self) -> ItemLoader:
    return ItemLoader(type(self), self.builder_config, self._decoder_threads)

  def _loaded(self, items) -> Iterator[tuple[dict[str, Any], dict[str, Any] | None]]:
    """(status, example) per item in input order, loaded by a bounded thread pool."""
    load = self._loader()
    window = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(self._num_workers) as pool:
      for index, item in enumerate(items):
        window.append(pool.submit(load, index, item))
        if len(window) >= 4 * self._num_workers:
          yield window.popleft().result()
      while window:
        yield window.popleft().result()

  def _generate_examples(self, split: str, items):
    if self._beam:
      return self._beam_examples(split, items)
    return self._serial_examples(split, items)

  def _serial_examples(self, split: str, items):
    statuses, first_kept = [], None
    for status, example in self._loaded(items):
      statuses.append(status)
      if example is not None:
        # Fail early, not after hours of decoding, when feature files disagree.
        first_kept = first_kept or status
        self._check_feature_dims([first_kept, status])
        yield f"{status['index']:08d}", example
    self._finish_split(split, statuses, len(items))

  # Apache Beam --------------------------------------------------------------------------------

  def _beam_examples(self, split: str, items):
    """The split's examples as a Beam transform; each worker also writes the status of the items
    it loaded under the (temporary) output folder, read back by _process_pipeline_result."""
    from ncl_jax.data import beam_prepare  # pylint: disable=g-import-not-at-top
    status_dir = os.path.join(os.fspath(self.data_dir), beam_prepare.STATUS_FOLDER, split)
    self._beam_splits[split] = (len(items), status_dir)
    return beam_prepare.load_examples(self._loader(), items, status_dir, self.ITEM_NOUN)

  def _process_pipeline_result(self, pipeline_result) -> None:
    """After the Beam pipeline: the metadata and the checks of the in-process build."""
    from ncl_jax.data import beam_prepare  # pylint: disable=g-import-not-at-top
    del pipeline_result
    for split, (total, status_dir) in self._beam_splits.items():
      statuses = beam_prepare.read_statuses(status_dir)
      if len(statuses) != total:
        raise UserError(f"the Beam workers reported {len(statuses)} of the {total} "
                        f"{self.ITEM_NOUN} of the {split} split; prepare again")
      self._finish_split(split, statuses, total)
    beam_prepare.remove_statuses(os.path.join(os.fspath(self.data_dir),
                                              beam_prepare.STATUS_FOLDER))

  def _generate_splits(self, dl_manager, download_config):
    if not self._beam:
      return super()._generate_splits(dl_manager, download_config)
    from ncl_jax.data import beam_prepare  # pylint: disable=g-import-not-at-top
    try:
      return super()._generate_splits(dl_manager, download_config)
    except UserError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      # A worker failed, or TFDS refused a split the workers left empty. Explain the latter
      # with the items' own reasons where every item reported back.
      for split, (total, status_dir) in self._beam_splits.items():
        statuses = beam_prepare.read_statuses(status_dir)
        if len(statuses) == total:
          self._finish_split(split, statuses, total)
      raise UserError(f"the Beam pipeline failed: {beam_prepare.short_error(err)}; nothing was "
                      "written. Run with --num_workers 1 to see the full error") from err


class _RetrievalBuilder(StoredItemsBuilder, skip_registration=True):
  """Shared logic of the four video builders: read annotations, find videos, decode, write."""

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} text-video retrieval ({cfg.name}).",
        features=record_features(cfg.input_mode),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
        homepage="https://github.com/ArrowLuo/CLIP4Clip",
    )

  # Split planning ------------------------------------------------------------------------------

  def _source_dir(self, manual_dir: str) -> str:
    if self.builder_config.input_mode == "frames":
      folder = self._videos_dir or os.path.join(manual_dir, "videos")
      flag = "--videos_dir"
    else:
      folder = self._features_dir
      flag = "--features_dir"
      if not folder:
        raise UserError("features mode needs --features_dir, the folder of <video>.npy files")
    if not os.path.isdir(folder):
      raise UserError(f"video folder {folder} does not exist; pass it with {flag}")
    return folder

  def _file_finder(self, folder: str):
    """entry -> (path or None, number of matching files): videos in frames mode by the rules of
    :class:`ncl_jax.data.video.FileIndex`, ``<name or stem>.npy`` in features mode."""
    if self.builder_config.input_mode == "frames":
      index = video_lib.FileIndex(folder)
      return lambda e: index.find(e.file_names, e.stems)
    index = video_lib.FileIndex(folder, (".npy",))
    return lambda e: index.find((), (*e.file_names, *e.stems))

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    if self.builder_config.input_mode == "frames":
      try:
        import av  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
      except ImportError as err:
        raise UserError("frames mode decodes videos with PyAV: pip install 'ncl_jax[video]' "
                        "(or pass --features_dir for features mode)") from err
    annotations = annotations_lib.READERS[self.DATASET](manual_dir)
    folder = self._source_dir(manual_dir)
    find = self._file_finder(folder)
    meta = self.info.metadata
    meta["settings"] = {"dataset": self.DATASET, **dataclasses.asdict(self.builder_config)}
    meta["settings"] = {k: v for k, v in meta["settings"].items()
                        if isinstance(v, (str, int, float, bool))}
    meta["subsets"] = annotations.subsets
    meta["splits"], meta["skipped"] = {}, {}
    meta["without_captions"] = annotations.without_captions
    meta["several_files"] = {}
    generators = {}
    for split, entries in annotations.splits.items():
      found = [find(e) for e in entries]
      paths = [path for path, _ in found]
      missing = [e.video_id for e, p in zip(entries, paths) if p is None]
      self._check_missing(split, missing, len(entries), folder)
      meta["several_files"][split] = [[e.video_id, p] for e, (p, n) in zip(entries, found)
                                      if n > 1]
      generators[split] = self._generate_examples(split, list(zip(entries, paths)))
    return generators

  # Example generation -----------------------------------------------------------------------

  @classmethod
  def load_item(cls, config, entry: annotations_lib.VideoEntry, path: str) -> dict[str, Any]:
    """The stored video of one entry; raises VideoDecodeError for unusable files."""
    cfg = config
    if cfg.input_mode == "frames":
      frames = video_lib.decode_video(path, fps=cfg.fps, max_frames=cfg.max_frames,
                                      size=cfg.image_size, start=entry.start, end=entry.end)
      return {"frames": [video_lib.encode_frame(f, cfg.frame_format, cfg.jpeg_quality)
                         for f in frames]}
    try:
      features = np.load(path)
    except (OSError, ValueError) as err:
      raise video_lib.VideoDecodeError(f"{path}: {err}") from err
    if features.ndim != 2 or features.shape[0] == 0 or not np.isfinite(features).all():
      raise video_lib.VideoDecodeError(f"{path}: expected finite features [T, D], got shape "
                                       f"{features.shape}")
    keep = sample_frame_indices(features.shape[0], cfg.max_frames)
    return {"features": features[keep].astype(np.float32)}

class Msrvtt(_RetrievalBuilder):
  """MSR-VTT: 9k (and 7k) training videos with 20 captions each; 1k-A test."""

  DATASET = "msrvtt"
  BUILDER_CONFIGS = [make_config("frames", 12), make_config("features", 12)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
Put these files (CLIP4Clip's MSR-VTT instructions) in one folder, `--manual_dir`:
* `MSRVTT_data.json`: all captions (`sentences[{video_id, caption}]`), in
  https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msrvtt_data.zip (official
  release: http://ms-multimedia-challenge.com/2017/dataset).
* `MSRVTT_train.9k.csv`, `MSRVTT_train.7k.csv`: training video lists (column `video_id`),
  in the same zip.
* `MSRVTT_JSFUSION_test.csv`: the 1k-A test pairs (`key,vid_key,video_id,sentence`), same zip.
* Videos `video0.mp4` ... `video9999.mp4`: `MSRVTT/videos/all/` inside
  https://www.robots.ox.ac.uk/~maxbain/frozen-in-time/data/MSRVTT.zip (Frozen in Time's copy,
  which CLIP4Clip's README points to).
A fixed 500-video validation list is held out of the 9k training set (every 18th id of the
sorted list), so model selection never looks at the test split.
""" + _VIDEO_NOTE.format(name="msrvtt")


class Msvd(_RetrievalBuilder):
  """MSVD: 1200 / 100 / 670 videos, all captions (multi-caption evaluation)."""

  DATASET = "msvd"
  BUILDER_CONFIGS = [make_config("frames", 12), make_config("features", 12)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
Put these files (CLIP4Clip's MSVD instructions: they are in
https://github.com/ArrowLuo/CLIP4Clip/releases/download/v0.0/msvd_data.zip, taken from
collaborative-experts' misc/datasets/msvd) in one folder, `--manual_dir`:
* `raw-captions.pkl`: a pickled dict, video id -> list of captions as token lists.
* `train_list.txt` (1200 ids), `val_list.txt` (100), `test_list.txt` (670): one id a line.
* Videos `<id>.avi` from the MSVD release (`YouTubeClips.tar`,
  https://www.cs.utexas.edu/users/ml/clamp/videoDescription/).
""" + _VIDEO_NOTE.format(name="msvd")


class Activitynet(_RetrievalBuilder):
  """ActivityNet Captions, paragraph retrieval; val_1 is the test split."""

  DATASET = "activitynet"
  BUILDER_CONFIGS = [make_config("frames", 64), make_config("features", 64)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
Put these files (ActivityNet Captions, https://cs.stanford.edu/people/ranjaykrishna/densevid/,
as used by CLIP4Clip) in one folder, `--manual_dir`:
* `train.json`, `val_1.json`: id -> {duration, timestamps, sentences} (`captions.zip`).
* `train_ids.json`, `val_ids.json`: the id lists (`v_` prefixed), from
  https://github.com/albanie/collaborative-experts (misc/datasets/activity-net), as CLIP4Clip's
  README says.
* Videos `<id>.mp4` (or .mkv/.webm), named with or without the `v_` prefix, from the
  ActivityNet download (http://activity-net.org/download.html).
val_1 (4,917 videos) is the test split; a fixed ~500-video validation list is held out of
train (every 20th id of the sorted list). Each video's sentences are joined into one paragraph.
""" + _VIDEO_NOTE.format(name="activitynet")


class Didemo(_RetrievalBuilder):
  """DiDeMo, paragraph retrieval: train / val / test."""

  DATASET = "didemo"
  BUILDER_CONFIGS = [make_config("frames", 64), make_config("features", 64)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
Put these files (DiDeMo annotations from https://github.com/LisaAnne/LocalizingMoments
`data/`; split lists from https://github.com/albanie/collaborative-experts, misc/datasets/didemo,
as CLIP4Clip's README says) in one folder, `--manual_dir`:
* `train_data.json`, `val_data.json`, `test_data.json`: lists of
  {video, description, times, ...}.
* `train_list.txt`, `val_list.txt`, `test_list.txt`: the video names of each split.
* The videos (e.g. `<name>.mp4`), matched by file name with or without the extension given
  in the lists; download script in the LocalizingMoments repository.
Each video's descriptions are joined into one paragraph over [0, 31] s.
""" + _VIDEO_NOTE.format(name="didemo")


BUILDERS = {"msrvtt": Msrvtt, "msvd": Msvd, "activitynet": Activitynet, "didemo": Didemo}
