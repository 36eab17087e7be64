"""TFDS builders, the prepare command and the prepared-data reader, on the dummy data in the
real formats with small real videos written by PyAV."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ncl_jax.data import default_data_config, get_dataset, prepare, sample_frame_indices
from ncl_jax.errors import UserError, run_cli

from data_testutils import DUMMY, SIZE, WordTokenizer, dummy, write_dummy_videos

TOLERANCE = 10     # Codec + JPEG error on solid colours.


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  return write_dummy_videos(tmp_path_factory.mktemp("videos"))


def _prepare(capsys, dataset, out, *extra):
  argv = [dataset, "--manual_dir", str(DUMMY / dataset), "--data_dir", str(out),
          "--image_size", str(SIZE), "--threads", "2", *extra]
  assert prepare.main(argv) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  return json.loads(lines[-1])


def _config(name, data_dir, **overrides):
  cfg = default_data_config(name)
  cfg.update(dict(data_dir=str(data_dir), image_size=SIZE, max_words=8, prefetch=0,
                  num_workers=0), **overrides)
  return cfg


EXPECTED = {   # split: (videos, captions) from the dummy annotation files.
    "msrvtt": {"train": (7, 22), "val": (1, 3), "test": (2, 2)},
    "msvd": {"train": (3, 9), "val": (1, 2), "test": (2, 5)},
    "activitynet": {"train": (3, 3), "val": (1, 1), "test": (2, 2)},
    "didemo": {"train": (6, 6), "val": (1, 1), "test": (4, 4)},
}
# Listed ids their caption files lack (ActivityNet: one per id list, as in the public files;
# DiDeMo: one listed video without descriptions).
WITHOUT_CAPTIONS = {"msrvtt": 0, "msvd": 0, "activitynet": 2, "didemo": 1}


@pytest.mark.parametrize("dataset", sorted(EXPECTED))
def test_frames_mode_counts_maps_and_decoded_frames(dataset, videos, tmp_path, capsys):
  videos_dir, colour_of = videos[dataset]
  summary = _prepare(capsys, dataset, tmp_path, "--videos_dir", videos_dir)
  assert summary == {"dataset": dataset, "skipped_videos": 0, "splits": {
      s: {"videos": v, "captions": c} for s, (v, c) in EXPECTED[dataset].items()},
                     "ids_without_captions": WITHOUT_CAPTIONS[dataset]}
  ds = get_dataset(_config(dataset, tmp_path), WordTokenizer())
  assert ds.eval_splits == ("val", "test") and ds.validation_split == "val"
  assert ds.num_train_examples == EXPECTED[dataset]["train"][1]
  for split, (num_videos, num_captions) in EXPECTED[dataset].items():
    data = ds.eval_data(split)
    assert (data.num_videos, data.num_texts) == (num_videos, num_captions)
    tokens = np.concatenate([b["text_tokens"][b["mask"]] for b in data.text_batches(4)])
    for caption, video in zip(tokens, data.caption_to_video):
      # Every dummy caption starts with its video's id, except the long one.
      name = data.video_ids[video]
      long_one = caption[1] == WordTokenizer().encode_batch(["word0"], 3)[0, 1]
      assert caption[1] == WordTokenizer().encode_batch([name], 3)[0, 1] or (
          long_one and name in ("video1", "video9"))
    # The caption strings, aligned with their tokens (the explorer shows them).
    np.testing.assert_array_equal(
        WordTokenizer().encode_batch(list(data.captions), tokens.shape[1]), tokens)
    start = 0
    for batch in data.video_batches(3):
      assert batch["video"].shape == (3, ds.max_frames, SIZE, SIZE, 3)
      assert batch["video"].dtype == np.uint8
      for row in np.flatnonzero(batch["mask"]):
        video_id = data.video_ids[start + row]
        frames = batch["video"][row][batch["frame_mask"][row]]
        assert len(frames) == 3, video_id   # 3-second videos at 1 fps.
        for second, frame in enumerate(frames):
          expected = dummy.frame_colour(colour_of[video_id], second).astype(int)
          assert np.abs(frame.astype(int) - expected).max() <= TOLERANCE, (video_id, second)
      start += 3


def test_msrvtt_maps_subsets_and_truncation(videos, tmp_path, capsys):
  _prepare(capsys, "msrvtt", tmp_path, "--videos_dir", videos["msrvtt"][0])
  ds = get_dataset(_config("msrvtt", tmp_path), WordTokenizer())
  test = ds.eval_data("test")
  assert list(test.video_ids) == ["video8", "video9"]
  np.testing.assert_array_equal(test.caption_to_video, [0, 1])
  val = ds.eval_data("val")
  assert list(val.video_ids) == ["video0"]    # Every 18th of the sorted 9k list: the first.
  train = ds.eval_data("train")
  assert "video0" not in train.video_ids
  np.testing.assert_array_equal(np.bincount(train.caption_to_video), [4, 3, 3, 3, 3, 3, 3])
  # The long caption is truncated identically in train (video1) and test (video9).
  train_tokens = np.concatenate([b["text_tokens"][b["mask"]] for b in train.text_batches(8)])
  test_tokens = np.concatenate([b["text_tokens"][b["mask"]] for b in test.text_batches(8)])
  long_row = WordTokenizer().encode_batch([dummy.LONG_CAPTION], 8)[0]
  assert (train_tokens == long_row).all(axis=1).sum() == 1
  np.testing.assert_array_equal(test_tokens[1], long_row)
  assert long_row[-1] == 2
  seven = get_dataset(_config("msrvtt", tmp_path, train_split="train_7k"), WordTokenizer())
  assert seven.num_train_examples == 3 + 3 + 3 + 4   # video1..video4 (video0 is held out).
  full = get_dataset(_config("msrvtt", tmp_path, train_split="train+val"), WordTokenizer())
  assert full.num_train_examples == 25
  with pytest.raises(UserError, match="train_split"):
    get_dataset(_config("msrvtt", tmp_path, train_split="train_5k"), WordTokenizer())
  # Without a tokenizer the real sets use CLIP's BPE (an independent OpenAI CLIP implementation
  # checks it elsewhere): start 49406 ... end 49407, the long caption cut to 8 tokens.
  clip = get_dataset(_config("msrvtt", tmp_path)).eval_data("test")
  clip_tokens = next(clip.text_batches(2))["text_tokens"]
  assert (clip_tokens[:, 0] == 49406).all() and clip_tokens[1, -1] == 49407
  assert (clip_tokens[1] > 0).all() and (clip_tokens[0] == 0).any()


def test_training_batches_from_prepared_frames_resume_exactly(videos, tmp_path, capsys):
  _prepare(capsys, "msrvtt", tmp_path, "--videos_dir", videos["msrvtt"][0])
  # 2 Grain worker processes decode the JPEGs (and flip them) in frames mode.
  ds = get_dataset(_config("msrvtt", tmp_path, prefetch=2, augment=True, num_workers=2),
                   WordTokenizer())
  it = ds.train_iterator(4, seed=0)
  batches = [next(it) for _ in range(7)]
  assert batches[0]["video"].shape == (4, 12, SIZE, SIZE, 3)
  assert batches[0]["frame_mask"].sum(axis=1).tolist() == [3, 3, 3, 3]
  state = json.loads(json.dumps(it.get_state()))
  more = [next(it) for _ in range(3)]
  resumed = ds.train_iterator(4, seed=0)
  resumed.set_state(state)
  for want in more:
    got = next(resumed)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
  it.close()
  resumed.close()
  # Decoding in this process gives the same batches; host 1 of 2 gets rows 2:4 of each.
  in_process = ds.train_iterator(4, seed=0, num_workers=0)
  host1 = ds.train_iterator(4, seed=0, process_index=1, process_count=2, num_workers=0)
  for want in batches[:2]:
    got, half = next(in_process), next(host1)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])
      np.testing.assert_array_equal(half[key], want[key][2:])
  in_process.close()
  host1.close()


def test_features_mode_subsamples_npy_rows(tmp_path, capsys):
  features_dir = tmp_path / "features"
  features_dir.mkdir()
  ids = [v for split in dummy.MSVD.values() for v in split]
  rng = np.random.default_rng(0)
  stored = {}
  for k, vid in enumerate(ids):
    stored[vid] = rng.standard_normal((3 + 3 * k, 6)).astype(np.float32)
    np.save(features_dir / f"{vid}.npy", stored[vid])
  summary = _prepare(capsys, "msvd", tmp_path / "out", "--features_dir", str(features_dir),
                     "--max_frames", "5")
  assert summary["skipped_videos"] == 0
  ds = get_dataset(_config("msvd", tmp_path / "out", input_mode="features", max_frames=5),
                   WordTokenizer())
  data = ds.eval_data("test")
  batch = next(data.video_batches(4))
  assert batch["video"].shape == (4, 5, 6) and batch["video"].dtype == np.float32
  for row, vid in enumerate(data.video_ids):
    want = stored[vid][sample_frame_indices(len(stored[vid]), 5)]
    np.testing.assert_allclose(batch["video"][row][:len(want)], want, rtol=1e-6)
    assert batch["frame_mask"][row].sum() == len(want)
  np.testing.assert_array_equal(data.caption_to_video, [0, 0, 1, 1, 1])


def test_missing_and_corrupt_videos_are_skipped_and_counted(videos, tmp_path, capsys):
  videos_dir = tmp_path / "videos"
  dummy.write_videos("msvd", str(videos_dir))
  (videos_dir / "vidB_2_6.avi").write_bytes(b"this is not a video" * 50)
  (videos_dir / "vidE_5_9.avi").unlink()
  summary = _prepare(capsys, "msvd", tmp_path / "ok", "--videos_dir", str(videos_dir),
                     "--max_bad_fraction", "0.5")
  assert summary["skipped_videos"] == 2
  assert summary["splits"]["train"] == {"videos": 2, "captions": 2 + 4}
  assert summary["splits"]["test"] == {"videos": 1, "captions": 3}
  with pytest.raises(SystemExit) as exit_info:
    run_cli(lambda: prepare.main(["msvd", "--manual_dir", str(DUMMY / "msvd"), "--data_dir",
                                  str(tmp_path / "strict"), "--videos_dir", str(videos_dir)]))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert "max_bad_fraction" in err and "Traceback" not in err
  with pytest.raises(UserError):
    get_dataset(_config("msvd", tmp_path / "strict"), WordTokenizer())


def test_missing_annotation_file_names_it(tmp_path, capsys):
  manual = tmp_path / "manual"
  manual.mkdir()
  for name in ("train.json", "train_ids.json", "val_1.json"):
    (manual / name).write_bytes((DUMMY / "activitynet" / name).read_bytes())
  (manual / "videos").mkdir()
  with pytest.raises(SystemExit) as exit_info:
    run_cli(lambda: prepare.main(["activitynet", "--manual_dir", str(manual), "--data_dir",
                                  str(tmp_path / "out")]))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert str(manual / "val_ids.json") in err and "Preparing datasets" in err


def test_unprepared_dataset_says_how_to_prepare(tmp_path):
  # A build killed mid-way leaves TFDS's "incomplete.<hex>.<version>" folder: never read.
  left_over = tmp_path / "msvd" / "frames_12f_16px" / f"incomplete.{'ab' * 16}.1.0.0"
  left_over.mkdir(parents=True)
  (left_over / "dataset_info.json").write_text("{}")
  for data_dir in ("", str(tmp_path)):
    with pytest.raises(UserError, match=r"python -m ncl_jax.data.prepare msvd.*synthetic.py"):
      get_dataset(_config("msvd", data_dir), WordTokenizer())


def test_builders_publish_manual_download_instructions():
  from ncl_jax.data import builders
  for name, cls in builders.BUILDERS.items():
    from ncl_jax.data import annotation_readers
    for required in annotation_readers.REQUIRED_FILES[name]:
      assert required in cls.MANUAL_DOWNLOAD_INSTRUCTIONS, (name, required)


def _prepare_fails(capsys, argv):
  """Runs prepare as the CLI does; returns its stderr after checking for one error line."""
  with pytest.raises(SystemExit) as exit_info:
    run_cli(lambda: prepare.main(argv))
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  # Above it stderr holds only progress bars.
  assert err.count("error: ") == 1 and "Traceback" not in err
  last = err.strip().splitlines()[-1]
  assert last.startswith("error: ")
  return last


def test_summary_names_ids_without_captions(videos, tmp_path, capsys):
  argv = ["activitynet", "--manual_dir", str(DUMMY / "activitynet"), "--data_dir",
          str(tmp_path), "--image_size", str(SIZE), "--videos_dir", videos["activitynet"][0]]
  assert prepare.main(argv) == 0
  out = capsys.readouterr().out
  assert "1 ids of the train list have no captions and were left out: v_D_XMD02v690" in out
  assert "1 ids of the test list have no captions and were left out: v_UBQfURrVB_Y" in out
  assert json.loads(out.strip().splitlines()[-1])["ids_without_captions"] == 2


def test_empty_splits_stop_with_one_error_line(tmp_path, capsys):
  empty = tmp_path / "empty_videos"
  empty.mkdir()
  base = ["msvd", "--manual_dir", str(DUMMY / "msvd"), "--image_size", str(SIZE),
          "--max_bad_fraction", "1"]
  err = _prepare_fails(capsys, base + ["--data_dir", str(tmp_path / "a"), "--videos_dir",
                                       str(empty)])
  assert f"the msvd train split is empty: none of its 3 videos (e.g. vidA_1_5) is in {empty}" \
      in err
  # Every video of the val split (one) undecodable: the split would be written empty.
  broken = tmp_path / "broken_videos"
  dummy.write_videos("msvd", str(broken), seconds=1.0)
  (broken / "vidD_4_8.avi").write_bytes(b"not a video" * 20)
  err = _prepare_fails(capsys, base + ["--data_dir", str(tmp_path / "b"), "--videos_dir",
                                       str(broken)])
  assert "the msvd val split is empty: all 1 videos are missing or undecodable (e.g. " \
      "vidD_4_8" in err
  for out in ("a", "b"):
    with pytest.raises(UserError, match="no prepared msvd data"):
      get_dataset(_config("msvd", tmp_path / out), WordTokenizer())
  # A failed build leaves nothing behind: "a" and "b" were new, so they are gone, and a folder
  # that existed keeps exactly what it held (no TFDS config record, no empty folders).
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
  kept = tmp_path / "kept"
  kept.mkdir()
  (kept / "notes.txt").write_text("mine")
  _prepare_fails(capsys, base + ["--data_dir", str(kept), "--videos_dir", str(empty)])
  assert sorted(p.name for p in kept.rglob("*")) == ["notes.txt"]


def test_rerun_into_a_prepared_copy_says_it_was_reused(videos, tmp_path, capsys):
  _prepare(capsys, "msvd", tmp_path, "--videos_dir", videos["msvd"][0])
  empty = tmp_path / "no_videos"
  empty.mkdir()
  argv = ["msvd", "--manual_dir", str(DUMMY / "msvd"), "--data_dir", str(tmp_path),
          "--image_size", str(SIZE), "--videos_dir", str(empty)]
  assert prepare.main(argv) == 0
  out = capsys.readouterr().out
  copy = tmp_path / "msvd" / "frames_12f_16px" / "1.0.0"
  assert f"reused the copy prepared earlier in {copy}; nothing was rebuilt" in out
  assert "delete that folder or give a new --data_dir" in out and "written to" not in out


def test_raw_frames_are_the_decoded_frames_exactly(videos, tmp_path, capsys):
  from ncl_jax.data import video
  videos_dir, _ = videos["msvd"]
  _prepare(capsys, "msvd", tmp_path, "--videos_dir", videos_dir, "--frame_format", "raw")
  assert [p.name for p in (tmp_path / "msvd").glob("frames_*")] == ["frames_12f_16px_raw"]
  data = get_dataset(_config("msvd", tmp_path), WordTokenizer()).eval_data("test")
  batch = next(data.video_batches(2))
  for row, video_id in enumerate(data.video_ids):
    want = video.decode_video(os.path.join(videos_dir, f"{video_id}.avi"), size=SIZE)
    np.testing.assert_array_equal(batch["video"][row][batch["frame_mask"][row]], want)


def test_loading_stats_count_only_time_when_some_item_was_loading():
  from ncl_jax.data import builders

  class Built:   # the two attributes loading_stats reads
    ITEM_NOUN = "videos"
    _load_times = [(10.0, 11.0, 7), (10.5, 12.0, 8), (13.0, 14.0, 7), (13.2, 13.5, 8)]

  # Covered: [10, 12] and [13, 14]: 3 s for 4 videos in 2 processes; the gap is excluded.
  assert builders.StoredItemsBuilder.loading_stats(Built()) == {
      "items": 4, "seconds": 3.0, "busy_seconds": 3.8, "processes": 2, "noun": "videos",
      "items_per_s": 1.333}


def test_summary_reports_videos_stored_under_several_names(tmp_path, capsys):
  videos_dir = tmp_path / "videos"
  colours = dummy.write_videos("didemo", str(videos_dir), seconds=1.0)
  # A transcoded copy beside the original: the original name wins (FileIndex rule 1).
  dummy.write_video(str(videos_dir / "11@N01_1_aa.mp4"), 99, seconds=1.0)
  argv = ["didemo", "--manual_dir", str(DUMMY / "didemo"), "--data_dir", str(tmp_path / "out"),
          "--image_size", str(SIZE), "--videos_dir", str(videos_dir)]
  assert prepare.main(argv) == 0
  out = capsys.readouterr().out
  assert (f"1 train videos match several files; the first by the matching rules (docs/data.md) "
          f"was used, e.g. 11@N01_1_aa.mov -> {videos_dir / '11@N01_1_aa.mov'}") in out
  data = get_dataset(_config("didemo", tmp_path / "out"), WordTokenizer()).eval_data("train")
  row = list(data.video_ids).index("11@N01_1_aa.mov")
  batch = next(data.video_batches(len(data.video_ids)))
  want = dummy.frame_colour(colours["11@N01_1_aa.mov"], 0).astype(int)
  assert np.abs(batch["video"][row, 0].astype(int) - want).max() <= TOLERANCE


def test_prepare_without_a_terminal_prints_no_progress_debris(videos, tmp_path):
  """Run with pipes (a log file, CI): no carriage-return progress bars and no TFDS size line."""
  repo = DUMMY.parents[2]
  proc = subprocess.run(
      [sys.executable, "-m", "ncl_jax.data.prepare", "msvd", "--manual_dir", str(DUMMY / "msvd"),
       "--videos_dir", videos["msvd"][0], "--data_dir", str(tmp_path), "--image_size", str(SIZE)],
      cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)), capture_output=True, text=True,
      timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  output = proc.stdout + proc.stderr
  assert "\r" not in output
  assert "Downloading and preparing" not in output and "Subsequent calls" not in output
  assert "written to" in proc.stdout and proc.stdout.strip().splitlines()[-1].startswith("{")
