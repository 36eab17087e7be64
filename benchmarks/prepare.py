"""`prepare` throughput (in-process vs Apache Beam workers) and the cost of JPEG frame storage.

Writes the same synthetic MSR-VTT-format videos once, then times
`python -m ncl_jax.data.prepare msrvtt` (frames mode, 224 px, 12 frames) built
  * in this process (--num_workers 1, one video at a time),
  * with Beam's DirectRunner and 1 worker process (FFmpeg decodes a video on all cores),
  * the same with --decoder_threads 1 (a video decoded on one core),
  * with Beam's DirectRunner and 2 worker processes (--num_workers 2; one core each),
and reports videos/s: wall clock (Beam's start-up included) and while loading (first video
started to last one done, over all worker processes), with the 2-vs-1-worker ratios of the
latter against both 1-worker builds, and the machine's own ceiling: the same ratio for 2 processes
that only decode the same videos (and for a pure Python loop), which is below 2 where the two
vCPUs share a physical core or a CPU quota.

Then, per 224 x 224 frame: JPEG encode (prepare side) and decode (training side) time against
reading raw uint8 frames, with the bytes each takes, on a hard-to-compress random texture and on a
smooth frame (gradients + edges + mild noise, closer to natural video).

  python benchmarks/prepare.py [--videos 24] [--seconds 15] [--width 320 --height 240 --fps 25]

Report the machine's load (printed) beside the numbers: other jobs share the CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import tempfile
import time

import numpy as np


def _write_video(path: str, seed: int, seconds: int, fps: int = 25, width: int = 320,
                 height: int = 240) -> None:
  """A textured MPEG-4 clip (blocky noise that changes every second and drifts every frame)."""
  import av  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  with av.open(path, "w") as container:
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for second in range(seconds):
      base = np.repeat(np.repeat(rng.integers(0, 255, (height // 8, width // 8, 3), np.uint8),
                                 8, 0), 8, 1)
      for i in range(fps):
        frame = av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")
        for packet in stream.encode(frame):
          container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _write_annotations(folder: str, ids: list[str]) -> None:
  """MSR-VTT's four files for ``ids``: all in the 9k training list, the last two also test."""
  with open(os.path.join(folder, "MSRVTT_data.json"), "w") as f:
    json.dump({"sentences": [{"video_id": v, "caption": f"{v} caption"} for v in ids]}, f)
  for name in ("MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv"):
    with open(os.path.join(folder, name), "w") as f:
      f.write("video_id\n" + "".join(f"{v}\n" for v in ids))
  with open(os.path.join(folder, "MSRVTT_JSFUSION_test.csv"), "w") as f:
    f.write("key,vid_key,video_id,sentence\n"
            + "".join(f"r{v},m{v},{v},{v} caption\n" for v in ids[-2:]))


def time_prepare(manual: str, videos: str, out: str, extra: list[str]) -> tuple[float, dict]:
  """Seconds of one `prepare msrvtt` run into the fresh folder ``out``, and its summary."""
  from ncl_jax.data import prepare  # pylint: disable=g-import-not-at-top
  args = prepare._parser().parse_args(  # pylint: disable=protected-access
      ["msrvtt", "--manual_dir", manual, "--videos_dir", videos, "--data_dir", out,
       "--max_bad_fraction", "0", *extra])
  start = time.perf_counter()
  summary = prepare.prepare(args)
  return time.perf_counter() - start, summary


RUNS = {   # name: the prepare flags of the build
    "in_process_1_thread": ["--threads", "1"],
    "beam_1_worker": ["--beam_runner", "DirectRunner", "--beam_options=--direct_num_workers=1 "
                      "--direct_running_mode=multi_processing"],
    # The same worker decoding each video on one core, as each of the 2 workers below does by
    # default (--decoder_threads 0 = cores / workers): the scaling of the workers alone.
    "beam_1_worker_1_decoder_thread": [
        "--beam_runner", "DirectRunner", "--decoder_threads", "1",
        "--beam_options=--direct_num_workers=1 --direct_running_mode=multi_processing"],
    "beam_2_workers": ["--num_workers", "2"],
}


def prepare_throughput(num_videos: int, seconds: int, width: int = 320, height: int = 240,
                       fps: int = 25) -> dict:
  """Each build on the same videos: wall-clock videos/s, and videos/s while loading (from the
  first video's start to the last one's end, over all processes: Beam's start-up, tens of
  seconds whatever the size, and the writing of records excluded), which is what a large data
  set sees."""
  with tempfile.TemporaryDirectory() as tmp:
    manual, videos = os.path.join(tmp, "manual"), os.path.join(tmp, "videos")
    os.makedirs(manual)
    os.makedirs(videos)
    ids = [f"video{i}" for i in range(num_videos)]
    for i, vid in enumerate(ids):
      _write_video(os.path.join(videos, f"{vid}.mp4"), i, seconds, fps, width, height)
    _write_annotations(manual, ids)
    results = {}
    for name, extra in RUNS.items():
      wall, summary = time_prepare(manual, videos, os.path.join(tmp, name), extra)
      assert summary["skipped_videos"] == 0, summary
      results[name] = {"wall_s": round(wall, 2),
                       "videos_per_s_wall": round(num_videos / wall, 3),
                       "loading_s": summary["loading"]["seconds"],
                       "videos_per_s_loading": summary["loading"]["items_per_s"],
                       # How many videos were being loaded at once, on average.
                       "concurrency": round(summary["loading"]["busy_seconds"]
                                            / summary["loading"]["seconds"], 2),
                       "s_per_video": round(summary["loading"]["busy_seconds"]
                                            / summary["loading"]["items"], 3),
                       "processes": summary["loading"]["processes"]}
    results["machine_2_vs_1_process"] = machine_scaling(
        [os.path.join(videos, f"{vid}.mp4") for vid in ids[:max(4, num_videos // 4)]])
    store = os.path.join(tmp, "in_process_1_thread")
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(store) for f in fs)
  two = results["beam_2_workers"]["videos_per_s_loading"]
  # Against the fastest one-worker build (FFmpeg threads on all cores) and against one worker
  # that decodes on one core like each of the two does.
  results["beam_2_vs_1_worker_loading"] = round(
      two / results["beam_1_worker"]["videos_per_s_loading"], 2)
  results["beam_2_vs_1_worker_loading_1_decoder_thread_each"] = round(
      two / results["beam_1_worker_1_decoder_thread"]["videos_per_s_loading"], 2)
  # The Beam build's scaling as a fraction of what the machine gives any two processes.
  results["beam_2_vs_1_of_machine_ceiling"] = round(
      results["beam_2_vs_1_worker_loading_1_decoder_thread_each"]
      / results["machine_2_vs_1_process"]["decode_videos"], 2)
  results["videos"], results["seconds_per_video"] = num_videos, seconds
  results["video_size"] = f"{width}x{height} at {fps} fps"
  results["stored_kb_per_video_jpeg"] = round(size / 1024 / num_videos, 1)
  return results


def _decode_all(paths: list[str]) -> None:
  from ncl_jax.data import video  # pylint: disable=g-import-not-at-top
  video.set_decoder_threads(1)
  for path in paths:
    video.decode_video(path)


def _python_loop(steps: int) -> None:
  total = 0
  for i in range(steps):
    total += i * i


def _two_vs_one_process(target, arg) -> float:
  """Throughput of 2 processes running ``target(arg)`` side by side over 1 process running it
  alone: what this machine's cores give any 2 independent CPU-bound workers (2.0 on two
  independent idle cores; less where the two vCPUs share a physical core or a CPU quota)."""
  def timed(count):
    start = time.perf_counter()
    procs = [multiprocessing.Process(target=target, args=(arg,)) for _ in range(count)]
    for proc in procs:
      proc.start()
    for proc in procs:
      proc.join()
    return time.perf_counter() - start
  return round(2 * timed(1) / timed(2), 2)


def machine_scaling(video_paths: list[str]) -> dict:
  """The 2-vs-1-process ceiling of this machine: PyAV decoding (one thread, the same videos) and
  a pure Python loop, each in fresh processes."""
  return {"decode_videos": _two_vs_one_process(_decode_all, video_paths),
          "python_loop": _two_vs_one_process(_python_loop, 30_000_000)}


def _smooth_frame(size: int, rng) -> np.ndarray:
  y, x = np.mgrid[0:size, 0:size] / size
  frame = np.stack([200 * x, 150 * y + 50, 100 + 80 * np.sin(6 * x + 3 * y)], -1)
  frame[size // 3:size // 2, size // 4:3 * size // 4] = (30, 200, 90)   # an object with edges
  return np.clip(frame + rng.normal(0, 4, frame.shape), 0, 255).astype(np.uint8)


def frame_storage(size: int = 224, repeats: int = 200) -> dict:
  """Per-frame JPEG encode/decode against raw uint8, in ms and bytes."""
  from ncl_jax.data import video  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  frames = {
      "texture": np.repeat(np.repeat(rng.integers(0, 255, (size // 4, size // 4, 3), np.uint8),
                                     4, 0), 4, 1),
      "smooth": _smooth_frame(size, rng)}
  out = {}
  for name, frame in frames.items():
    start = time.perf_counter()
    for _ in range(repeats):
      data = video.encode_jpeg(frame, 95)
    encode_ms = 1e3 * (time.perf_counter() - start) / repeats
    start = time.perf_counter()
    for _ in range(repeats):
      video.decode_jpeg(data)
    decode_ms = 1e3 * (time.perf_counter() - start) / repeats
    raw = video.encode_frame(frame, "raw")
    start = time.perf_counter()
    for _ in range(repeats):
      video.decode_frame(raw)
    raw_ms = 1e3 * (time.perf_counter() - start) / repeats
    out[name] = {"jpeg_encode_ms": round(encode_ms, 3), "jpeg_decode_ms": round(decode_ms, 3),
                 "raw_read_ms": round(raw_ms, 4), "jpeg_kb": round(len(data) / 1024, 1),
                 "raw_kb": round(len(raw) / 1024, 1)}
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--videos", type=int, default=24)
  parser.add_argument("--seconds", type=int, default=15, help="length of each video")
  parser.add_argument("--width", type=int, default=320)
  parser.add_argument("--height", type=int, default=240)
  parser.add_argument("--fps", type=int, default=25)
  args = parser.parse_args()
  load_before = os.getloadavg()
  storage = frame_storage()
  throughput = prepare_throughput(args.videos, args.seconds, args.width, args.height, args.fps)
  print(json.dumps({
      "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
      "load_avg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
      "prepare": throughput, "frame_storage_224px": storage}, indent=1))


if __name__ == "__main__":
  main()
