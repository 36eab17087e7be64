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

import numpy as np
from PIL import Image

from ncl_jax.data.pipeline import sample_frame_indices

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v", ".mpg", ".mpeg")


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
      next_time = start
      for frame in container.decode(stream):
        if frame.time is None:
          continue
        if end is not None and frame.time > end + 1e-6:
          break
        if frame.time + 1e-6 >= next_time:
          picked.append(frame.to_ndarray(format="rgb24"))
          # The next sample is the first frame at or after the next whole step.
          steps = math.floor((frame.time - start) * fps + 1e-6) + 1
          next_time = start + steps / fps
  except av.error.FFmpegError as err:
    raise VideoDecodeError(f"{path}: {err}") from err
  if not picked:
    raise VideoDecodeError(f"{path}: no frames decoded")
  keep = sample_frame_indices(len(picked), max_frames)
  return np.stack([resize_and_center_crop(picked[i], size) for i in keep])


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


def index_video_files(videos_dir: str) -> dict[str, str]:
  """Maps every video file's stem under ``videos_dir`` (searched recursively) to its path."""
  import os  # pylint: disable=g-import-not-at-top
  found = {}
  for root, _, files in os.walk(videos_dir):
    for name in sorted(files):
      stem, ext = os.path.splitext(name)
      if ext.lower() in VIDEO_EXTENSIONS:
        found.setdefault(stem, os.path.join(root, name))
  return found
