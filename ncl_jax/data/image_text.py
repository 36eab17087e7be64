"""Image-text retrieval (NCL's future work): COCO and Flickr30k with Karpathy's splits.

An image is stored as a one-frame "video", in exactly the record layout of the video builders
(:mod:`ncl_jax.data.builders`): ``{"video_id", "captions", "frames": [JPEG]}`` (or
``"features": float32 [1, D]``) plus the same dataset metadata. So ``python -m
ncl_jax.data.prepare coco ...`` writes it, :func:`ncl_jax.data.get_dataset` reads it, and the
dual encoder embeds it with the CLIP image tower followed by the video head (meanP over one
frame is the image embedding itself). Text-to-image is the "t2v" direction of every report.

Annotations: Karpathy's ``dataset_coco.json`` / ``dataset_flickr30k.json``,
``{"images": [{"filename", "filepath" (COCO only), "split", "sentences": [{"raw", "tokens"}]}]}``
with ``split`` in train / restval / val / test. Each Karpathy split becomes a stored split of the
same name (Flickr30k has no restval). Evaluation splits keep the first
:data:`EVAL_CAPTIONS` captions of an image (the usual 5k-image / 25k-caption COCO and
1k / 5k Flickr30k test protocols; a few COCO images have 6 or 7); training splits keep all.

No TensorFlow: the builders write ``array_record`` files (see :mod:`ncl_jax.data.builders`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from ncl_jax.data import builders
from ncl_jax.data import video as video_lib
from ncl_jax.errors import UserError

ANNOTATION_FILES = {"coco": "dataset_coco.json", "flickr30k": "dataset_flickr30k.json"}
KARPATHY_SPLITS = ("train", "restval", "val", "test")
EVAL_SPLITS = ("val", "test")
EVAL_CAPTIONS = 5
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# What configs/coco.py trains on: Karpathy's train plus restval (113,287 images).
DEFAULT_TRAIN_SPLIT = {"coco": "train+restval", "flickr30k": "train"}

_HINT = ("see `python -m ncl_jax.data.prepare --help` or docs/data.md, section 'Image-text "
         "retrieval' for the files it needs")


@dataclasses.dataclass(frozen=True)
class ImageEntry:
  """One image of a split: its id (file name without extension), captions and file name."""

  image_id: str
  captions: tuple[str, ...]
  filename: str


def read_karpathy(manual_dir: str, dataset: str) -> dict[str, list[ImageEntry]]:
  """Reads Karpathy's split file of ``dataset`` ("coco" or "flickr30k") from ``manual_dir``.

  Returns:
    ``{split: [ImageEntry, ...]}`` for the non-empty splits among train, restval, val, test, in
    file order.

  Raises:
    UserError: the file is missing, is not JSON, or does not have Karpathy's layout.
  """
  path = os.path.join(manual_dir, ANNOTATION_FILES[dataset])
  if not os.path.isfile(path):
    raise UserError(f"annotation file {path} is missing; {_HINT}")
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except json.JSONDecodeError as err:
    raise UserError(f"{path} is not valid JSON ({err}); download it again") from err
  if not isinstance(data, dict) or not isinstance(data.get("images"), list):
    raise UserError(f"{path} has no 'images' list; it is not a Karpathy split file ({_HINT})")
  splits: dict[str, list[ImageEntry]] = {s: [] for s in KARPATHY_SPLITS}
  seen = set()
  for image in data["images"]:
    try:
      filename, split, sentences = image["filename"], image["split"], image["sentences"]
    except (KeyError, TypeError) as err:
      raise UserError(f"{path}: an image entry lacks {err}; expected filename, split and "
                      "sentences") from err
    if split not in splits:
      raise UserError(f"{path}: image {filename} has split {split!r}, expected one of "
                      f"{', '.join(KARPATHY_SPLITS)}")
    # Captions: the raw sentence; CLIP's tokenizer does its own clean-up. Karpathy's "tokens"
    # are lowercased and stripped of punctuation, the fallback for files without "raw".
    captions = [(s.get("raw") or " ".join(s.get("tokens", []))).strip() for s in sentences]
    captions = [c for c in captions if c]
    if split in EVAL_SPLITS:
      captions = captions[:EVAL_CAPTIONS]
    if not captions:
      raise UserError(f"{path}: image {filename} has no caption")
    image_id = os.path.splitext(filename)[0]
    if image_id in seen:
      raise UserError(f"{path}: image {filename} is listed twice")
    seen.add(image_id)
    splits[split].append(ImageEntry(image_id, tuple(captions), filename))
  return {s: entries for s, entries in splits.items() if entries}


def index_image_files(folder: str, extensions=IMAGE_EXTENSIONS) -> dict[str, str]:
  """Maps every image file name (e.g. ``COCO_val2014_000000391895.jpg``) under ``folder``
  (searched recursively: COCO's ``train2014/`` and ``val2014/`` may sit side by side) to its
  path."""
  found = {}
  for root, _, files in os.walk(folder):
    for name in sorted(files):
      if name.lower().endswith(extensions):
        found.setdefault(name, os.path.join(root, name))
  return found


def load_image(path: str, size: int) -> np.ndarray:
  """An image file as CLIP sees it: bicubic resize of the shorter side to ``size``, centre crop
  (the frames mode's :func:`ncl_jax.data.video.resize_and_center_crop`): uint8 [size, size, 3].

  Raises:
    ncl_jax.data.video.VideoDecodeError: the file cannot be read as an image.
  """
  try:
    with Image.open(path) as image:
      pixels = np.asarray(image.convert("RGB"))
  except (OSError, UnidentifiedImageError, ValueError) as err:
    raise video_lib.VideoDecodeError(f"{path}: {err}") from err
  return video_lib.resize_and_center_crop(pixels, size)


def _config_name(input_mode: str, image_size: int) -> str:
  # The names of ncl_jax.data.builders.config_name for one frame, so the reader finds them.
  return "features_1f" if input_mode == "features" else f"frames_1f_{image_size}px"


@dataclasses.dataclass
class ImageTextConfig(tfds.core.BuilderConfig):
  """How images are stored: "frames" (one JPEG after resize + crop) or "features" (.npy)."""

  input_mode: str = "frames"
  max_frames: int = 1
  image_size: int = 224
  fps: float = 1.0
  jpeg_quality: int = 95
  frame_format: str = "jpeg"


def _make_config(input_mode: str, image_size: int = 224) -> ImageTextConfig:
  return ImageTextConfig(name=_config_name(input_mode, image_size),
                         description=f"{input_mode}, one frame per image",
                         input_mode=input_mode, image_size=image_size)


_IMAGE_NOTE = """
Frames mode (default) also needs the images, found recursively by file name under
`--videos_dir` (here: the image folder; default `<manual_dir>/images`). Features mode instead
needs one NumPy file `<image stem>.npy` of shape [D] or [1, D] per image under
`--features_dir`. Then run
`python -m ncl_jax.data.prepare {name} --manual_dir DIR --data_dir OUT`.
"""


class _ImageTextBuilder(builders.StoredItemsBuilder, skip_registration=True):
  """Karpathy split file + images -> one-frame retrieval records (the video builders' layout).

  ``videos_dir`` is the image folder in frames mode; the other arguments are the video builders'.
  """

  ITEM_NOUN = "images"

  def __init__(self, **kwargs):
    super().__init__(**kwargs)
    cfg = self.builder_config
    if int(cfg.max_frames) != 1:
      raise UserError(f"{self.DATASET} stores one frame per image; drop --max_frames "
                      f"(got {cfg.max_frames})")

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"{self.DATASET} image-text retrieval, Karpathy splits, images as one-frame "
                    f"videos ({self.builder_config.name}).",
        features=builders.record_features(self.builder_config.input_mode,
                                          tfds.features.Encoding.ZLIB),
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(),
        homepage="https://cs.stanford.edu/people/karpathy/deepimagesent/",
    )

  @staticmethod
  def item_id(entry) -> str:
    return entry.image_id

  def _source(self, manual_dir: str) -> tuple[dict[str, str], str, str]:
    """(file index, what it holds, folder): image files by name, or .npy files by image stem."""
    if self.builder_config.input_mode == "frames":
      folder = self._videos_dir or os.path.join(manual_dir, "images")
      if not os.path.isdir(folder):
        raise UserError(f"image folder {folder} does not exist; pass it with --videos_dir")
      return index_image_files(folder), "frames", folder
    if not self._features_dir or not os.path.isdir(self._features_dir):
      raise UserError("features mode needs --features_dir, an existing folder of "
                      "<image stem>.npy files")
    found = index_image_files(self._features_dir, (".npy",))
    return {name[:-4]: path for name, path in found.items()}, "features", self._features_dir

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    splits = read_karpathy(manual_dir, self.DATASET)
    files, kind, folder = self._source(manual_dir)
    cfg = self.builder_config
    meta = self.info.metadata
    meta["settings"] = {"dataset": self.DATASET, "name": cfg.name, "input_mode": cfg.input_mode,
                        "max_frames": 1, "image_size": int(cfg.image_size), "fps": 1.0,
                        "jpeg_quality": int(cfg.jpeg_quality),
                        "frame_format": cfg.frame_format}
    meta["subsets"] = {}
    meta["splits"], meta["skipped"] = {}, {}
    generators = {}
    for split, entries in splits.items():
      keys = [e.filename if kind == "frames" else e.image_id for e in entries]
      paths = [files.get(k) for k in keys]
      missing = [e.image_id for e, p in zip(entries, paths) if p is None]
      self._check_missing(split, missing, len(entries), folder)
      generators[split] = self._generate_examples(split, list(zip(entries, paths)))
    return generators

  @classmethod
  def load_item(cls, config, entry, path: str) -> dict[str, Any]:
    del entry  # an image is found by its path alone
    cfg = config
    if cfg.input_mode == "frames":
      return {"frames": [video_lib.encode_frame(load_image(path, int(cfg.image_size)),
                                                cfg.frame_format, int(cfg.jpeg_quality))]}
    try:
      features = np.load(path)
    except (OSError, ValueError) as err:
      raise video_lib.VideoDecodeError(f"{path}: {err}") from err
    features = features.reshape(1, -1) if features.ndim == 1 else features
    if features.ndim != 2 or features.shape[0] != 1 or not np.isfinite(features).all():
      raise video_lib.VideoDecodeError(f"{path}: expected finite features [D] or [1, D], got "
                                       f"shape {features.shape}")
    return {"features": features.astype(np.float32)}


class Coco(_ImageTextBuilder):
  """MS-COCO 2014 captions, Karpathy splits: 82,783 train + 30,504 restval / 5k val / 5k test."""

  DATASET = "coco"
  BUILDER_CONFIGS = [_make_config("frames"), _make_config("features")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
Put in one folder, `--manual_dir`:
* `dataset_coco.json`: Karpathy's COCO splits (`caption_datasets.zip` from
  https://cs.stanford.edu/people/karpathy/deepimagesent/, also mirrored on Kaggle as
  "Karpathy splits").
* The COCO 2014 images, `train2014/` and `val2014/` (https://cocodataset.org/#download,
  `train2014.zip`, `val2014.zip`), under `<manual_dir>/images/` or any folder given with
  `--videos_dir` (searched recursively by file name).
Splits: train (82,783 images), restval (30,504; configs/coco.py trains on train+restval),
val (5,000), test (5,000; the 5k test, first 5 captions per image).
""" + _IMAGE_NOTE.format(name="coco")


class Flickr30k(_ImageTextBuilder):
  """Flickr30k, Karpathy splits: 29,000 train / 1,014 val / 1,000 test images, 5 captions each."""

  DATASET = "flickr30k"
  BUILDER_CONFIGS = [_make_config("frames"), _make_config("features")]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
Put in one folder, `--manual_dir`:
* `dataset_flickr30k.json`: Karpathy's Flickr30k splits (`caption_datasets.zip` from
  https://cs.stanford.edu/people/karpathy/deepimagesent/).
* The Flickr30k images `<id>.jpg` (`flickr30k-images/`, on request from
  https://shannon.cs.illinois.edu/DenotationGraph/), under `<manual_dir>/images/` or any folder
  given with `--videos_dir`.
Splits: train (29,000 images), val (1,014), test (1,000).
""" + _IMAGE_NOTE.format(name="flickr30k")


BUILDERS = {"coco": Coco, "flickr30k": Flickr30k}
