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


# .mts (MPEG-TS) streams start at a non-zero timestamp: seconds count from the first frame.
@pytest.mark.parametrize("suffix", [".mp4", ".webm", ".avi", ".mkv", ".mts", ".wmv"])
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


def _touch(root, *names):
  for name in names:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")


def test_file_index_finds_every_naming_route_of_didemo_and_activitynet(tmp_path):
  _touch(tmp_path, "a/X1.mov", "X2.", "X3.wmv.mp4", "X4.MOV", "X5.mp4", "b/abc.webm",
         "X6.null", "notes.txt", "X7.npy")
  index = video.FileIndex(str(tmp_path))
  def found(names=(), stems=()):
    path, _ = index.find(names, stems)
    return path and str(pathlib.Path(path).relative_to(tmp_path))
  assert found(("X1.mov",), ("X1",)) == "a/X1.mov"          # original name, nested folder
  assert found(("X2.",), ("X2",)) == "X2."                  # bare trailing dot
  assert found(("X3.wmv",), ("X3",)) == "X3.wmv.mp4"        # AWS copy "<name>.mp4"
  assert found(("x4.mov",), ("x4",)) == "X4.MOV"            # other letter case
  assert found(("X5.avi",), ("X5",)) == "X5.mp4"            # transcoded "<stem>.mp4"
  assert found((), ("abc", "v_abc")) == "b/abc.webm"        # ActivityNet id without "v_"
  assert found(("X6.null",), ("X6",)) == "X6.null"          # listed name, unknown extension
  assert found((), ("notes", "X6", "X7")) is None           # stems need a video extension
  assert found(("X8.mp4",), ("X8",)) is None
  npy = video.FileIndex(str(tmp_path), (".npy",))
  assert npy.find((), ("X7",))[0] == str(tmp_path / "X7.npy")


def test_file_index_rule_when_several_files_match(tmp_path):
  # One video stored five ways: the exact listed name wins, then other case, then
  # "<name>.<ext>", then "<stem>.<ext>" with .mp4 before .webm; sorted path order breaks ties.
  _touch(tmp_path, "V.mov", "z/V.MOV", "V.mov.mp4", "V.webm", "V.mp4", "a/V.mp4")
  index = video.FileIndex(str(tmp_path))
  order = ["V.mov", "z/V.MOV", "V.mov.mp4", "V.mp4", "a/V.mp4", "V.webm"]
  for first in range(len(order)):
    path, count = index.find(("V.mov",), ("V",))
    assert (pathlib.Path(path).relative_to(tmp_path).as_posix(), count) == (
        order[first], len(order) - first)
    (tmp_path / order[first]).unlink()
    index = video.FileIndex(str(tmp_path))
  assert index.find(("V.mov",), ("V",)) == (None, 0)


def test_raw_frames_round_trip_exactly_and_jpeg_still_decodes():
  rng = np.random.default_rng(1)
  frame = rng.integers(0, 255, (6, 10, 3)).astype(np.uint8)
  raw = video.encode_frame(frame, "raw")
  assert len(raw) == 6 * 10 * 3 + 11
  np.testing.assert_array_equal(video.decode_frame(raw), frame)
  jpeg = video.encode_frame(frame, "jpeg", 95)
  assert jpeg[:2] == b"\xff\xd8"
  np.testing.assert_array_equal(video.decode_frame(jpeg), video.decode_jpeg(jpeg))
  with pytest.raises(ValueError, match="png"):
    video.encode_frame(frame, "png")


def test_decoder_thread_count_does_not_change_the_frames(tmp_path):
  path = str(tmp_path / "clip.mp4")
  dummy.write_video(path, 2, seconds=3.0, fps=10, width=64, height=48)
  try:
    by_threads = []
    for threads in (0, 1, 3):
      video.set_decoder_threads(threads)
      by_threads.append(video.decode_video(path, size=32))
  finally:
    video.set_decoder_threads(0)
  for frames in by_threads[1:]:
    np.testing.assert_array_equal(frames, by_threads[0])
  with pytest.raises(ValueError, match="decoder threads must be >= 0"):
    video.set_decoder_threads(-1)
