"""PyAV decoding, 1 fps sampling, resize + centre crop and JPEG storage of frames."""

import importlib.util
import pathlib

import numpy as np
import pytest

from ncl_jax.data import video

DUMMY = pathlib.Path(__file__).resolve().parents[1] / "ncl_jax" / "data" / "dummy_data"
_spec = importlib.util.spec_from_file_location("make_dummy_data", DUMMY / "make_dummy_data.py")
dummy = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dummy)


def _seconds_of(frames, video_index):
  """The second each decoded frame shows, read back from its colour (red = 10 + 40 s)."""
  red = frames[:, frames.shape[1] // 2, frames.shape[2] // 2, 0].astype(int)
  seconds = np.round((red - 10) / 40).astype(int)
  for frame, second in zip(frames, seconds):
    expected = dummy.frame_colour(video_index, second).astype(int)
    assert np.abs(frame.astype(int) - expected).max() <= 8
  return seconds.tolist()


@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi", ".mkv"])
def test_one_frame_per_second_in_every_container(tmp_path, suffix):
  path = str(tmp_path / f"clip{suffix}")
  dummy.write_video(path, 3, seconds=4.5, fps=5, width=40, height=30)
  frames = video.decode_video(path, max_frames=12, size=20)
  assert frames.shape == (5, 20, 20, 3) and frames.dtype == np.uint8
  assert _seconds_of(frames, 3) == [0, 1, 2, 3, 4]


def test_long_clips_are_subsampled_uniformly_and_windows_respected(tmp_path):
  path = str(tmp_path / "clip.mp4")
  dummy.write_video(path, 1, seconds=4.0, fps=4)
  frames = video.decode_video(path, max_frames=3, size=8)
  assert _seconds_of(frames, 1) == [0, 1, 3]   # linspace(0, 3, 3) -> 0, 1.5, 3 -> 0, 1, 3.
  window = video.decode_video(path, max_frames=12, size=8, start=1.0, end=2.0)
  assert _seconds_of(window, 1) == [1, 2]   # Both ends included, as in CLIP4Clip.
  twice = video.decode_video(path, max_frames=12, size=8, fps=2.0)
  assert _seconds_of(twice, 1) == [0, 0, 1, 1, 2, 2, 3, 3]


def test_undecodable_or_empty_files_raise_decode_error(tmp_path):
  bad = tmp_path / "bad.mp4"
  bad.write_bytes(b"\x00\x01garbage" * 100)
  with pytest.raises(video.VideoDecodeError):
    video.decode_video(str(bad))
  empty_window = str(tmp_path / "clip.mp4")
  dummy.write_video(empty_window, 0, seconds=1.0)
  with pytest.raises(video.VideoDecodeError, match="no frames"):
    video.decode_video(empty_window, start=5.0)


def test_resize_shorter_side_then_centre_crop():
  # 20 x 40 image: outer quarters red / blue, centre half green. After resizing the shorter
  # side to 10 (-> 10 x 20) the centre 10 x 10 crop is the green half.
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, :10] = (255, 0, 0)
  image[:, 10:30] = (0, 255, 0)
  image[:, 30:] = (0, 0, 255)
  out = video.resize_and_center_crop(image, 10)
  assert out.shape == (10, 10, 3)
  inner = out[:, 1:-1].astype(int)   # Bicubic blends one column at each boundary.
  assert (np.abs(inner - (0, 255, 0)) <= 12).all()
  tall = video.resize_and_center_crop(np.zeros((50, 30, 3), np.uint8), 15)
  assert tall.shape == (15, 15, 3)


def test_jpeg_round_trip_is_close():
  rng = np.random.default_rng(0)
  frame = np.repeat(np.repeat(rng.integers(0, 255, (4, 4, 3)), 8, 0), 8, 1).astype(np.uint8)
  back = video.decode_jpeg(video.encode_jpeg(frame, quality=95))
  assert back.shape == frame.shape and back.dtype == np.uint8
  assert np.abs(back.astype(int) - frame).mean() < 4


def test_index_video_files_finds_nested_files_by_stem(tmp_path):
  (tmp_path / "a").mkdir()
  (tmp_path / "a" / "x.mp4").write_bytes(b"")
  (tmp_path / "y.WEBM").write_bytes(b"")
  (tmp_path / "notes.txt").write_bytes(b"")
  found = video.index_video_files(str(tmp_path))
  assert sorted(found) == ["x", "y"]
