"""Video decoding for the frames mode: PyAV decode, 1 fps sampling, resize and centre crop, JPEG.

CLIP4Clip's recipe (``RawVideoExtractor``, ``feature_framerate=1``, ``slice_framepos=2``):
take one frame per second (the first frame at or after each whole second of the clip window,
both ends included),
subsample uniformly to ``max_frames`` when the clip is longer, resize the shorter side to 224
with bicubic interpolation and centre-crop 224 x 224 (OpenAI CLIP's ``_transform``).
"""

from __future__ import annotations

import io
import math
import os
import struct

import numpy as np
from PIL import Image

from ncl_jax.data.pipeline import sample_frame_indices

# Containers FFmpeg opens, in the order a file is preferred when several copies of one video
# exist under different extensions (see FileIndex.find). The tail covers the camera and phone
# formats of DiDeMo's Flickr originals (.3gp .3g2 .wmv .mts .m2ts .qt .asf .divx ...).
VIDEO_EXTENSIONS = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".3gp",
                    ".3g2", ".3gpp", ".wmv", ".asf", ".mts", ".m2ts", ".ts", ".qt", ".divx",
                    ".flv", ".ogv", ".vob", ".dv", ".mxf")


class VideoDecodeError(Exception):
  """A video file that cannot be decoded (corrupt, empty, or no video stream)."""


def resize_and_center_crop(frame: np.ndarray, size: int) -> np.ndarray:
  """Bicubic resize of the shorter side to ``size``, then a centre crop: uint8 [size, size, 3].

  Sizes follow torchvision's ``Resize(size)`` on PIL images (the longer side becomes
  ``int(size * long / short)``) and the crop offset its ``CenterCrop``: ``round((h - size) / 2)``.
  """
  image = Image.fromarray(frame)
  width, height = image.size
  if width <= height:
    new_w, new_h = size, int(size * height / width)
  else:
    new_w, new_h = int(size * width / height), size
  image = image.resize((new_w, new_h), Image.BICUBIC)
  left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
  return np.asarray(image.crop((left, top, left + size, top + size)).convert("RGB"))


# FFmpeg decoding threads per video in this process (see set_decoder_threads).
_DECODER_THREADS = {"threads": 0}


def set_decoder_threads(threads: int) -> None:
  """FFmpeg decoding threads per video for this process's later ``decode_video`` calls.

  0 (the default) lets FFmpeg choose, about one per core: best when one video is decoded at a
  time. A build that decodes several videos at once (threads or worker processes) sets
  cores / videos-at-once instead, so its decoders do not oversubscribe the cores.
  """
  if threads < 0:
    raise ValueError(f"decoder threads must be >= 0 (got {threads})")
  _DECODER_THREADS["threads"] = int(threads)


def decode_video(path: str, *, fps: float = 1.0, max_frames: int = 12, size: int = 224,
                 start: float = 0.0, end: float | None = None) -> np.ndarray:
  """Decodes ``path`` into CLIP4Clip-style frames: uint8 [T, size, size, 3], T <= max_frames.

  Args:
    path: a video file any FFmpeg build behind PyAV reads (.mp4, .webm, .avi, ...).
    fps: frames kept per second of video.
    max_frames: upper bound on T; longer clips are subsampled uniformly.
    size: output height and width.
    start, end: the clip window in seconds, both included as in CLIP4Clip's
      ``RawVideoExtractor`` (end None: to the end of the file).

  Raises:
    VideoDecodeError: the file has no video stream, cannot be decoded, or yields no frame in
      the window.
  """
  import av  # pylint: disable=g-import-not-at-top  (only frames mode needs PyAV)

  picked = []
  try:
    with av.open(path) as container:
      if not container.streams.video:
        raise VideoDecodeError(f"{path}: no video stream")
      stream = container.streams.video[0]
      stream.thread_type = "AUTO"
      stream.thread_count = _DECODER_THREADS["threads"]
      # Times count from the stream's first frame, as CLIP4Clip's frame positions do: MPEG-TS
      # files (.mts/.m2ts camera videos) start at a non-zero timestamp.
      origin = (float(stream.start_time * stream.time_base)
                if stream.start_time is not None else 0.0)
      next_time = start
      for frame in container.decode(stream):
        if frame.time is None:
          continue
        time = frame.time - origin
        if end is not None and time > end + 1e-6:
          break
        if time + 1e-6 >= next_time:
          picked.append(frame.to_ndarray(format="rgb24"))
          # The next sample is the first frame at or after the next whole step.
          steps = math.floor((time - start) * fps + 1e-6) + 1
          next_time = start + steps / fps
  except av.error.FFmpegError as err:
    raise VideoDecodeError(f"{path}: {err}") from err
  if not picked:
    raise VideoDecodeError(f"{path}: no frames decoded")
  keep = sample_frame_indices(len(picked), max_frames)
  return np.stack([resize_and_center_crop(picked[i], size) for i in keep])


FRAME_FORMATS = ("jpeg", "raw")
# Raw frames: this tag, height and width (uint16 little-endian), then the uint8 RGB pixels. JPEG
# data starts with FF D8, so the two never mix up.
_RAW_TAG = b"NCLRAW1"
_RAW_HEADER = struct.Struct("<7sHH")


def encode_frame(frame: np.ndarray, frame_format: str = "jpeg", quality: int = 95) -> bytes:
  """The stored bytes of one uint8 RGB frame [H, W, 3]: JPEG, or "raw" uint8 pixels (H * W * 3
  bytes plus an 11-byte header; read back without decoding)."""
  if frame_format == "jpeg":
    return encode_jpeg(frame, quality)
  if frame_format == "raw":
    frame = np.ascontiguousarray(frame, np.uint8)
    return _RAW_HEADER.pack(_RAW_TAG, frame.shape[0], frame.shape[1]) + frame.tobytes()
  raise ValueError(f"frame format {frame_format!r} is not one of {FRAME_FORMATS}")


def decode_frame(data: bytes) -> np.ndarray:
  """uint8 RGB [H, W, 3] from the bytes :func:`encode_frame` stored (JPEG or raw)."""
  if data[:len(_RAW_TAG)] == _RAW_TAG:
    _, height, width = _RAW_HEADER.unpack_from(data)
    return np.frombuffer(data, np.uint8, offset=_RAW_HEADER.size).reshape(height, width, 3)
  return decode_jpeg(data)


def encode_jpeg(frame: np.ndarray, quality: int = 95) -> bytes:
  """JPEG bytes of one uint8 RGB frame [H, W, 3]."""
  buffer = io.BytesIO()
  # 4:4:4 chroma: no colour subsampling on top of the codec's own (PIL defaults to 4:2:0).
  Image.fromarray(frame).save(buffer, format="JPEG", quality=quality, subsampling=0)
  return buffer.getvalue()


def decode_jpeg(data: bytes) -> np.ndarray:
  """uint8 RGB [H, W, 3] from JPEG bytes."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))


class FileIndex:
  """The files under a folder (searched recursively), found by the names a data set's own tools
  give them.

  :meth:`find` tries, in this order, and takes the first rule that matches:

  1. a file named exactly as the annotations list it (DiDeMo's original Flickr names such as
     ``X.mov``, ``X.3gp`` or ``X.`` with a bare trailing dot);
  2. the same name ignoring case (``X.MOV``);
  3. a file ``<name or stem>.<ext>`` with ``ext`` one of ``extensions``, ignoring case: the
     ``<name>.mp4`` copies of DiDeMo's AWS download script (``X.mov.mp4``) and transcoded
     copies under the bare id (``X.mp4``, ``video0.mp4``, ``abc.webm`` for ``v_abc``). Names
     are tried before stems, then stems in the order given; for one name, extensions earlier in
     ``extensions`` win (``.mp4`` before ``.webm`` before ``.avi`` ...).

  Within a rule, several files (the same name in two sub-folders) resolve to the first path in
  sorted order. :meth:`find` also returns how many files matched any rule, so callers can
  report videos stored more than once.

  Args:
    folder: the root folder.
    extensions: lower-case extensions (with the dot) that rule 3 accepts, in order of preference.
  """

  def __init__(self, folder: str, extensions=VIDEO_EXTENSIONS):
    self._rank = {ext: i for i, ext in enumerate(extensions)}
    self._exact: dict[str, list[str]] = {}
    self._folded: dict[str, list[str]] = {}
    self._by_stem: dict[str, list[tuple[int, str]]] = {}
    for root, _, files in os.walk(folder):
      for name in files:
        path = os.path.join(root, name)
        self._exact.setdefault(name, []).append(path)
        self._folded.setdefault(name.casefold(), []).append(path)
        stem, ext = os.path.splitext(name)
        if ext.lower() in self._rank:
          self._by_stem.setdefault(stem.casefold(), []).append((self._rank[ext.lower()], path))

  def find(self, names=(), stems=()) -> tuple[str | None, int]:
    """(path, number of matching files) of the file for a video listed under ``names`` (file
    names with their extension) or ``stems`` (ids without one); path None when none matches."""
    exact = [p for n in names for p in sorted(self._exact.get(n, []))]
    folded = [p for n in names for p in sorted(self._folded.get(n.casefold(), []))]
    by_stem = [p for s in (*names, *stems)
               for _, p in sorted(self._by_stem.get(s.casefold(), []))]
    ordered = list(dict.fromkeys(exact + folded + by_stem))
    return (ordered[0] if ordered else None), len(ordered)

