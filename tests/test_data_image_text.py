"""COCO / Flickr30k builders (Karpathy splits, images as one-frame videos) on dummy data in the
real formats, with tiny JPEGs written here."""

import json
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from ncl_jax.data import default_data_config, get_dataset, image_text, prepare
from ncl_jax.errors import UserError

from data_testutils import WordTokenizer

DUMMY = pathlib.Path(__file__).resolve().parents[1] / "ncl_jax" / "data" / "dummy_data"
REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = 16
TOLERANCE = 8   # JPEG error (written at quality 95, stored again at 95) on solid colours.


def _karpathy(dataset):
  return json.loads((DUMMY / dataset / image_text.ANNOTATION_FILES[dataset]).read_text())


def _colour(index):
  return np.array([(37 * index + 20) % 256, (91 * index + 60) % 256, (53 * index + 100) % 256],
                  np.uint8)


def _write_images(dataset, root, skip=()):
  """Solid-colour JPEGs (non-square, so the crop is exercised) at the Karpathy file paths."""
  colours = {}
  for i, image in enumerate(_karpathy(dataset)["images"]):
    if image["filename"] in skip:
      continue
    folder = os.path.join(root, image.get("filepath", "flickr30k-images"))
    os.makedirs(folder, exist_ok=True)
    pixels = np.broadcast_to(_colour(i), (24, 40, 3)).copy()
    Image.fromarray(pixels).save(os.path.join(folder, image["filename"]), quality=95)
    colours[os.path.splitext(image["filename"])[0]] = _colour(i)
  return colours


def _prepare(capsys, dataset, out, *extra):
  argv = [dataset, "--manual_dir", str(DUMMY / dataset), "--data_dir", str(out),
          "--image_size", str(SIZE), *extra]
  assert prepare.main(argv) == 0
  return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _expected(dataset):
  """{split: (images, captions)} counted from the file independently of the reader."""
  counts = {}
  for image in _karpathy(dataset)["images"]:
    n = len(image["sentences"])
    if image["split"] in ("val", "test"):
      n = min(n, 5)
    images, captions = counts.get(image["split"], (0, 0))
    counts[image["split"]] = (images + 1, captions + n)
  return counts


@pytest.mark.parametrize("dataset", ["coco", "flickr30k"])
def test_frames_mode_counts_maps_and_pixels(dataset, tmp_path, capsys):
  colours = _write_images(dataset, str(tmp_path / "images"))
  summary = _prepare(capsys, dataset, tmp_path / "out", "--videos_dir", str(tmp_path / "images"))
  expected = _expected(dataset)
  assert summary == {"dataset": dataset, "skipped_videos": 0, "ids_without_captions": 0,
                     "splits": {s: {"videos": v, "captions": c} for s, (v, c) in expected.items()}}
  config = default_data_config(dataset)
  config.update(dict(data_dir=str(tmp_path / "out"), image_size=SIZE, max_words=8, prefetch=0))
  if dataset == "coco":
    config.train_split = "train+restval"
  ds = get_dataset(config, WordTokenizer())
  assert ds.eval_splits == ("val", "test") and ds.validation_split == "val"
  assert ds.max_frames == 1 and ds.input_mode == "frames"
  train_captions = expected["train"][1] + expected.get("restval", (0, 0))[1]
  assert ds.num_train_examples == train_captions
  files = {os.path.splitext(i["filename"])[0]: i for i in _karpathy(dataset)["images"]}
  for split in ("val", "test"):
    data = ds.eval_data(split)
    assert (data.num_videos, data.num_texts) == expected[split]
    tokens = np.concatenate([b["text_tokens"][b["mask"]] for b in data.text_batches(4)])
    for caption_tokens, image in zip(tokens, data.caption_to_video):
      # Every dummy caption starts with its image's name ("IMG<id> caption j.").
      image_id = data.video_ids[image]
      name = files[image_id]["sentences"][0]["tokens"][0].upper()
      assert caption_tokens[1] == WordTokenizer().encode_batch([name], 3)[0, 1]
    batches = list(data.video_batches(3))
    frames = np.concatenate([b["video"][b["mask"]] for b in batches])
    masks = np.concatenate([b["frame_mask"][b["mask"]] for b in batches])
    assert frames.shape == (data.num_videos, 1, SIZE, SIZE, 3) and masks.all()
    for image_id, pixels in zip(data.video_ids, frames):
      diff = np.abs(pixels.astype(int) - colours[image_id].astype(int)).max()
      assert diff <= TOLERANCE, (image_id, diff)
  # At most 5 test captions per image although the file lists 7 for one COCO image.
  if dataset == "coco":
    assert np.bincount(ds.eval_data("test").caption_to_video).tolist() == [5, 5]


def test_tokens_fallback_and_train_batches(tmp_path, capsys):
  _write_images("coco", str(tmp_path / "images"))
  _prepare(capsys, "coco", tmp_path / "out", "--videos_dir", str(tmp_path / "images"))
  splits = image_text.read_karpathy(str(DUMMY / "coco"), "coco")
  # The sentence without "raw" falls back to its tokens.
  assert splits["train"][1].captions[0] == "img25 caption 0"
  assert splits["train"][0].captions[0] == "IMG9 caption 0."
  config = default_data_config("coco")
  config.update(dict(data_dir=str(tmp_path / "out"), image_size=SIZE, max_words=8, prefetch=0,
                     train_split="train+restval", num_workers=0))
  batch = next(get_dataset(config, WordTokenizer()).train_iterator(4, seed=0))
  assert batch["video"].shape == (4, 1, SIZE, SIZE, 3) and batch["video"].dtype == np.uint8
  assert batch["text_tokens"].shape == (4, 8) and batch["frame_mask"].all()


def test_features_mode_and_missing_images(tmp_path, capsys):
  images = _karpathy("flickr30k")["images"]
  features_dir = tmp_path / "features"
  features_dir.mkdir()
  rng = np.random.default_rng(0)
  stored = {}
  for i, image in enumerate(images):
    stem = os.path.splitext(image["filename"])[0]
    stored[stem] = rng.normal(size=(7,)).astype(np.float32)
    # Both accepted layouts: [D] and [1, D].
    np.save(features_dir / f"{stem}.npy", stored[stem] if i % 2 else stored[stem][None])
  summary = _prepare(capsys, "flickr30k", tmp_path / "out", "--features_dir", str(features_dir))
  assert summary["skipped_videos"] == 0
  config = default_data_config("flickr30k")
  config.update(dict(data_dir=str(tmp_path / "out"), input_mode="features", max_words=8,
                     prefetch=0))
  data = get_dataset(config, WordTokenizer()).eval_data("test")
  batch = next(data.video_batches(4))
  for row, image_id in enumerate(data.video_ids):
    np.testing.assert_array_equal(batch["video"][row, 0], stored[image_id])

  # A missing image is skipped and counted while under --max_bad_fraction, fatal above it.
  missing = images[0]["filename"]
  _write_images("flickr30k", str(tmp_path / "some"), skip=(missing,))
  summary = _prepare(capsys, "flickr30k", tmp_path / "out2", "--videos_dir",
                     str(tmp_path / "some"), "--max_bad_fraction", "0.5")
  assert summary["skipped_videos"] == 1 and summary["splits"]["train"]["videos"] == 2
  with pytest.raises(UserError, match=r"1 of 3 images of the flickr30k train split are missing"):
    _prepare(capsys, "flickr30k", tmp_path / "out3", "--videos_dir", str(tmp_path / "some"))


def test_bad_inputs_give_clear_errors(tmp_path):
  with pytest.raises(UserError, match="dataset_coco.json is missing"):
    image_text.read_karpathy(str(tmp_path), "coco")
  (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"annotations": []}))
  with pytest.raises(UserError, match="no 'images' list"):
    image_text.read_karpathy(str(tmp_path), "flickr30k")
  (tmp_path / "dataset_flickr30k.json").write_text(json.dumps(
      {"images": [{"filename": "a.jpg", "split": "dev", "sentences": [{"raw": "x"}]}]}))
  with pytest.raises(UserError, match="split 'dev'"):
    image_text.read_karpathy(str(tmp_path), "flickr30k")
  with pytest.raises(UserError, match="one frame per image"):
    prepare.main(["coco", "--manual_dir", str(DUMMY / "coco"), "--data_dir", str(tmp_path),
                  "--max_frames", "4"])


def test_instructions_name_every_file_and_configs_load():
  for name, cls in image_text.BUILDERS.items():
    assert image_text.ANNOTATION_FILES[name] in cls.MANUAL_DOWNLOAD_INSTRUCTIONS
  assert "train2014" in image_text.Coco.MANUAL_DOWNLOAD_INSTRUCTIONS
  import importlib.util
  for name in ("coco", "flickr30k"):
    spec = importlib.util.spec_from_file_location(f"cfg_{name}", REPO / "configs" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    assert config.data.name == name and config.data.max_frames == 1
    assert config.model.max_frames == 1 and config.model.input_mode == "frames"
    assert config.data.train_split == image_text.DEFAULT_TRAIN_SPLIT[name]
    assert config.model.text.context_length >= config.data.max_words == 32
    assert config.global_batch_size == 128 and config.clip_dir
    assert f"--config=configs/{name}.py" in module.__doc__
    config.lock()
    config.to_dict()
