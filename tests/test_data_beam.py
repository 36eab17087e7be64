"""`prepare --num_workers N`: the Apache Beam build against the in-process one, and its bad input."""

import json
import os
import sys

import numpy as np
import pytest

import tensorflow_datasets as tfds

import ncl_jax.data
from ncl_jax.data import builders, default_data_config, get_dataset, prepare
from ncl_jax.errors import UserError, run_cli

from data_testutils import DUMMY, SIZE, WordTokenizer, dummy
from suite_testutils import require_module

require_module("apache_beam")



@pytest.fixture(scope="module")
def msvd_videos(tmp_path_factory):
  """The MSVD dummy videos with one undecodable (train) and one missing (test)."""
  folder = tmp_path_factory.mktemp("msvd_videos")
  dummy.write_videos("msvd", str(folder))
  (folder / "vidB_2_6.avi").write_bytes(b"not a video" * 50)
  (folder / "vidE_5_9.avi").unlink()
  return folder


def _argv(out, videos, *extra):
  return ["msvd", "--manual_dir", str(DUMMY / "msvd"), "--data_dir", str(out),
          "--videos_dir", str(videos), "--image_size", str(SIZE), *extra]


def _fails(capfd, argv):
  """Runs the CLI; returns its last stderr line after checking it is the one error line."""
  with pytest.raises(SystemExit) as exit_info:
    run_cli(lambda: prepare.main(argv))
  assert exit_info.value.code == 2
  err = capfd.readouterr().err
  lines = [line for line in err.splitlines() if line.startswith("error: ")]
  assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err[-2000:]
  return lines[0]


def _records(out):
  """Per split: video id -> (captions, frames) read back as training reads them, plus the
  metadata, checking record r is the metadata's video r."""
  path = out / "msvd" / f"frames_12f_{SIZE}px" / "1.0.0"
  assert sorted(os.listdir(path)) == sorted(  # no worker status files left behind
      ["dataset_info.json", "features.json", "metadata.json"]
      + [f"msvd-{s}.array_record-00000-of-00001" for s in ("train", "val", "test")])
  builder = tfds.builder_from_directory(str(path))
  meta = builder.info.metadata
  by_split = {}
  for split, info in meta["splits"].items():
    source = builder.as_data_source(split)
    records = [source[i] for i in range(len(source))]
    assert [r["video_id"].decode() for r in records] == info["video_ids"]
    by_split[split] = {r["video_id"].decode(): ([c.decode() for c in r["captions"]],
                                                list(r["frames"])) for r in records}
  return by_split, dict(meta)


@pytest.mark.slow
def test_beam_build_holds_the_serial_build(msvd_videos, tmp_path, capfd):
  summaries = {}
  for name, extra in (("serial", ()), ("beam", ("--num_workers", "2"))):
    assert prepare.main(_argv(tmp_path / name, msvd_videos, "--max_bad_fraction", "0.5",
                              *extra)) == 0
    out, err = capfd.readouterr()
    summaries[name] = json.loads(out.strip().splitlines()[-1])
    if name == "beam":
      assert "prepare worker" in err and "videos loaded" in err   # progress while decoding
  assert summaries["beam"] == summaries["serial"]
  assert summaries["beam"]["skipped_videos"] == 2
  assert summaries["beam"]["splits"]["train"] == {"videos": 2, "captions": 2 + 4}
  serial, serial_meta = _records(tmp_path / "serial")
  beam, beam_meta = _records(tmp_path / "beam")
  assert beam_meta == serial_meta   # ids, captions, skipped videos with their reasons
  assert beam == serial             # same JPEG bytes, keyed by video id
  assert sorted(beam["train"]) == ["vidA_1_5", "vidC_3_7"]
  assert all(len(frames) == 3 for split in beam.values() for _, frames in split.values())
  # The Beam copy trains like the serial one.
  config = default_data_config("msvd")
  config.update(dict(data_dir=str(tmp_path / "beam"), image_size=SIZE, max_words=8, prefetch=0))
  data = get_dataset(config, WordTokenizer()).eval_data("test")
  batch = next(data.video_batches(2))
  assert batch["video"].shape == (2, 12, SIZE, SIZE, 3) and batch["mask"].tolist() == [True, False]
  first = dummy.frame_colour(5, 0).astype(int)   # vidF_6_10 is the 6th video written
  assert np.abs(batch["video"][0, 0].astype(int) - first).max() <= 10


@pytest.mark.slow
def test_beam_failures_end_in_one_line_and_leave_nothing(msvd_videos, tmp_path, capfd,
                                                          monkeypatch):
  # Any runner and its options pass through: here Beam's in-process DirectRunner, where a
  # patched loader reaches the workers. A worker crash is one error line, exit 2.
  def crash(*args):
    raise RuntimeError("decoder crashed")
  monkeypatch.setattr(builders.Msvd, "load_item", classmethod(crash))
  line = _fails(capfd, _argv(tmp_path / "crash", msvd_videos, "--max_bad_fraction", "0.5",
                             "--beam_runner", "DirectRunner",
                             "--beam_options=--direct_running_mode=in_memory"))
  assert "the Beam pipeline failed: RuntimeError: decoder crashed" in line
  with pytest.raises(UserError, match="no prepared msvd data"):
    config = default_data_config("msvd")
    config.update(dict(data_dir=str(tmp_path / "crash"), image_size=SIZE))
    get_dataset(config, WordTokenizer())
  assert not list((tmp_path / "crash").glob("msvd/frames_*/*"))


def test_bad_beam_arguments_are_one_error_line(msvd_videos, tmp_path, capfd, monkeypatch):
  out = tmp_path / "out"
  for extra, message in (
      (("--num_workers", "0"), "--num_workers must be at least 1 (got 0)"),
      (("--num_workers", "two"), "argument --num_workers: invalid int value: 'two'"),
      (("--beam_runner", "FooRunner"), "--beam_runner 'FooRunner' is not a Beam runner here"),
      (("--num_workers", "2", "--beam_runner", "FlinkRunner"),
       "--num_workers sizes the local DirectRunner"),
      (("--beam_options=--flag='unclosed",), "cannot be split like a shell line")):
    assert message in _fails(capfd, _argv(out, msvd_videos, *extra)), extra
  # Beam asked for but not installed.
  monkeypatch.setitem(sys.modules, "apache_beam", None)
  monkeypatch.delitem(sys.modules, "ncl_jax.data.beam_prepare", raising=False)
  monkeypatch.delattr(ncl_jax.data, "beam_prepare", raising=False)
  line = _fails(capfd, _argv(out, msvd_videos, "--num_workers", "2"))
  assert "pip install 'ncl_jax[beam]'" in line
  assert not out.exists()


def test_decoder_threads_share_the_host_cores_between_concurrent_videos(monkeypatch):
  monkeypatch.setattr(prepare, "_host_cores", lambda: 8)

  def threads(*argv):
    args = prepare._parser().parse_args(["msvd", "--manual_dir", "m", "--data_dir", "d", *argv])
    return prepare.decoder_threads(args, prepare._beam_settings(args))

  assert threads() == 4                                            # in process, --threads 2
  assert threads("--threads", "16") == 1                           # never below one
  assert threads("--num_workers", "2") == 4
  assert threads("--beam_runner", "DirectRunner",
                 "--beam_options=--direct_num_workers=8") == 1
  assert threads("--beam_runner", "DataflowRunner") == 0           # FFmpeg decides there
  assert threads("--num_workers", "2", "--decoder_threads", "3") == 3


def test_negative_decoder_threads_is_one_error_line(msvd_videos, tmp_path, capfd):
  out = tmp_path / "out"
  line = _fails(capfd, _argv(out, msvd_videos, "--decoder_threads", "-1"))
  assert "--decoder_threads must be 0 (automatic) or more (got -1)" in line
  assert not out.exists()
