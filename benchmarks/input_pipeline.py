"""Input-pipeline throughput in features mode and frames mode, and the demo's train step time.

Run from the repository root::

  python benchmarks/input_pipeline.py [--steps 50] [--videos 24]

Measures, on this machine:

1. features mode (the synthetic demo data, batch 64): host time per training batch with
   prefetch off (the work the background thread must hide) and the demo's jitted train step
   time (configs/synthetic.py, all local devices), so the ratio says whether the pipeline can
   be the bottleneck;
2. frames mode: ``prepare`` on MSR-VTT-format copies of small synthetic 320x240 25-fps videos
   (videos/s decoded and stored), then training batches of 224 px JPEG frames read back
   (examples/s, decoding threads = ``--workers``);
3. features mode on a prepared real-format set (400 videos of .npy [12, 512], batch 128).

Prints a readable table and one JSON line. Numbers from a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_config(name: str):
  spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "configs" / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _time_batches(iterator, steps: int) -> float:
  next(iterator)   # Warm-up (permutation, thread start).
  start = time.perf_counter()
  for _ in range(steps):
    next(iterator)
  return (time.perf_counter() - start) / steps


def features_mode(steps: int) -> dict:
  """Synthetic-set batches vs the demo's train step."""
  import jax  # pylint: disable=g-import-not-at-top
  from ncl_jax import sharding, train  # pylint: disable=g-import-not-at-top
  from ncl_jax.data import get_dataset  # pylint: disable=g-import-not-at-top

  config = _load_config("synthetic")
  batch_size = int(config.global_batch_size)
  data_config = config.data
  start = time.perf_counter()
  dataset = get_dataset(data_config)
  generate_s = time.perf_counter() - start
  data_config.prefetch = 0
  plain = get_dataset(data_config).train_iterator(batch_size, seed=0)
  batch_s = _time_batches(plain, steps)

  run = train._Run(config)  # pylint: disable=protected-access
  state = run.initial_state()
  iterator = dataset.train_iterator(batch_size, seed=0)
  batches = [sharding.host_batch_to_global(next(iterator), run.mesh) for _ in range(steps + 3)]
  for batch in batches[:3]:   # Compile and warm up.
    state, metrics = run.train_step(state, batch)
  jax.block_until_ready(metrics)
  start = time.perf_counter()
  for batch in batches[3:]:
    state, metrics = run.train_step(state, batch)
  jax.block_until_ready(metrics)
  step_s = (time.perf_counter() - start) / steps
  iterator.close()
  return {"batch_size": batch_size, "generate_s": generate_s, "batch_ms": 1e3 * batch_s,
          "examples_per_s": batch_size / batch_s, "train_step_ms": 1e3 * step_s,
          "pipeline_over_step": batch_s / step_s, "devices": len(jax.devices())}


def _write_textured_video(path: str, seed: int, seconds: int, fps: int = 25) -> None:
  """A 320x240 video of drifting random blocks (compresses like real footage, not like flat)."""
  import av  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  base = np.repeat(np.repeat(rng.integers(0, 256, (30, 40, 3), np.uint8), 8, 0), 8, 1)
  with av.open(path, "w") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = 320, 240, "yuv420p"
    for i in range(seconds * fps):
      frame = av.VideoFrame.from_ndarray(np.roll(base, 2 * i, axis=1), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def _write_msrvtt_annotations(root: str, ids: list[str]) -> None:
  sentences = [{"video_id": v, "caption": f"a clip called {v} number {j}", "sen_id": j}
               for v in ids for j in range(2)]
  with open(os.path.join(root, "MSRVTT_data.json"), "w") as f:
    json.dump({"sentences": sentences}, f)
  for name, chosen in (("MSRVTT_train.9k.csv", ids[:-2]), ("MSRVTT_train.7k.csv", ids[:-2])):
    with open(os.path.join(root, name), "w", newline="") as f:
      csv.writer(f).writerows([["video_id"]] + [[v] for v in chosen])
  with open(os.path.join(root, "MSRVTT_JSFUSION_test.csv"), "w", newline="") as f:
    rows = [["key", "vid_key", "video_id", "sentence"]]
    rows += [[f"ret{i}", v, v, f"a clip called {v}"] for i, v in enumerate(ids[-2:])]
    csv.writer(f).writerows(rows)


class _Words:
  """A whitespace tokenizer (the benchmark measures the pipeline, not BPE)."""

  def encode_batch(self, texts, context_length):
    out = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
      words = [3 + (hash(w) % 30000) for w in text.split()][:context_length - 2]
      out[i, :len(words) + 2] = [1] + words + [2]
    return out


def frames_mode(num_videos: int, seconds: int, steps: int, workers: int) -> dict:
  """prepare (decode + store) throughput, then 224 px frame batches read back."""
  from ncl_jax.data import (default_data_config, get_dataset,  # pylint: disable=g-import-not-at-top
                            prepare)

  with tempfile.TemporaryDirectory() as tmp:
    manual, videos, out = (os.path.join(tmp, d) for d in ("manual", "videos", "out"))
    os.makedirs(manual)
    os.makedirs(videos)
    ids = [f"video{i}" for i in range(num_videos)]
    for i, vid in enumerate(ids):
      _write_textured_video(os.path.join(videos, f"{vid}.mp4"), i, seconds)
    _write_msrvtt_annotations(manual, ids)
    args = argparse.Namespace(
        dataset="msrvtt", manual_dir=manual, data_dir=out, videos_dir=videos, features_dir=None,
        mode="frames", max_frames=12, image_size=224, fps=1.0, jpeg_quality=95,
        max_bad_fraction=0.0, num_workers=workers)
    start = time.perf_counter()
    summary = prepare.prepare(args)
    prepare_s = time.perf_counter() - start
    cfg = default_data_config("msrvtt")
    cfg.update(dict(data_dir=out, prefetch=0, num_workers=workers, train_split="train+val"))
    dataset = get_dataset(cfg, _Words())
    batch_size = 16
    iterator = dataset.train_iterator(batch_size, seed=0)
    batch_s = _time_batches(iterator, steps)
    stored = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(out) for f in fs)
  return {"videos": num_videos, "seconds_per_video": seconds,
          "prepare_videos_per_s": num_videos / prepare_s,
          "stored_kb_per_video": stored / 1024 / num_videos, "batch_size": batch_size,
          "batch_ms": 1e3 * batch_s, "examples_per_s": batch_size / batch_s,
          "skipped": summary["skipped_videos"]}


def prepared_features_mode(num_videos: int, steps: int, dim: int = 512) -> dict:
  """Features mode on a prepared real-format set (MSR-VTT layout, .npy [12, dim] per video)."""
  from ncl_jax.data import (default_data_config, get_dataset,  # pylint: disable=g-import-not-at-top
                            prepare)

  with tempfile.TemporaryDirectory() as tmp:
    manual, features, out = (os.path.join(tmp, d) for d in ("manual", "features", "out"))
    os.makedirs(manual)
    os.makedirs(features)
    ids = [f"video{i}" for i in range(num_videos)]
    rng = np.random.default_rng(0)
    for vid in ids:
      np.save(os.path.join(features, f"{vid}.npy"), rng.standard_normal((12, dim), np.float32))
    _write_msrvtt_annotations(manual, ids)
    args = argparse.Namespace(
        dataset="msrvtt", manual_dir=manual, data_dir=out, videos_dir=None, features_dir=features,
        mode="features", max_frames=12, image_size=224, fps=1.0, jpeg_quality=95,
        max_bad_fraction=0.0, num_workers=2)
    prepare.prepare(args)
    cfg = default_data_config("msrvtt")
    cfg.update(dict(data_dir=out, input_mode="features", prefetch=0, train_split="train+val"))
    dataset = get_dataset(cfg, _Words())
    batch_size = 128
    batch_s = _time_batches(dataset.train_iterator(batch_size, seed=0), steps)
  return {"videos": num_videos, "feature_dim": dim, "batch_size": batch_size,
          "batch_ms": 1e3 * batch_s, "examples_per_s": batch_size / batch_s}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=50, help="batches timed per measurement")
  parser.add_argument("--videos", type=int, default=24, help="videos for the frames benchmark")
  parser.add_argument("--seconds", type=int, default=15, help="length of each video")
  parser.add_argument("--workers", type=int, default=2, help="decoding threads")
  args = parser.parse_args()
  features = features_mode(args.steps)
  frames = frames_mode(args.videos, args.seconds, max(args.steps // 5, 5), args.workers)
  prepared = prepared_features_mode(400, args.steps)
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        "(shared; numbers are noisy)")
  print(f"features mode (synthetic, batch {features['batch_size']}): "
        f"{features['batch_ms']:.2f} ms/batch = {features['examples_per_s']:.0f} examples/s; "
        f"demo train step {features['train_step_ms']:.1f} ms on {features['devices']} device(s); "
        f"pipeline/step = {features['pipeline_over_step']:.3f}; "
        f"synthetic set generated in {features['generate_s']:.2f} s")
  print(f"frames mode (224 px, 12 frames, batch {frames['batch_size']}): "
        f"{frames['batch_ms']:.0f} ms/batch = {frames['examples_per_s']:.1f} examples/s; "
        f"prepare {frames['prepare_videos_per_s']:.2f} videos/s "
        f"({frames['seconds_per_video']} s 320x240 25 fps clips), "
        f"{frames['stored_kb_per_video']:.0f} KB stored per video")
  print(f"features mode on a prepared set (MSR-VTT layout, [12, {prepared['feature_dim']}] "
        f"per video, batch {prepared['batch_size']}): {prepared['batch_ms']:.1f} ms/batch = "
        f"{prepared['examples_per_s']:.0f} examples/s")
  print(json.dumps({"features": features, "frames": frames, "prepared_features": prepared}))


if __name__ == "__main__":
  main()
