"""Input-pipeline throughput in features mode and frames mode, and the demo's train step time.

Run from the repository root::

  python benchmarks/input_pipeline.py [--steps 50] [--videos 24]
  python benchmarks/input_pipeline.py --part loaders   # only 4. and 5.

Measures, on this machine:

1. features mode (the synthetic demo data, batch 64): host time per training batch with
   prefetch off (the work the background thread must hide) and the demo's jitted train step
   time (configs/synthetic.py, all local devices), so the ratio says whether the pipeline can
   be the bottleneck;
2. frames mode: ``prepare`` on MSR-VTT-format copies of small synthetic 320x240 25-fps videos
   (videos/s decoded and stored), then training batches of 224 px JPEG frames read back
   (examples/s, Grain worker processes = ``--workers``);
3. features mode on a prepared real-format set (400 videos of .npy [12, 512], batch 128);
4. frames mode, the Grain pipeline against a PyTorch ``DataLoader`` with the same worker count
   (1 and 2 processes), both reading the same prepared records and decoding the same JPEGs
   (batch 16), timed in interleaved windows so that the shared machine's load changes hit all
   loaders alike; wall-clock examples/s and examples per CPU-second of the loader's processes;
5. a sizing table: examples/s a ViT-B/32 meanP train step (12 frames) consumes on TPU v5e-8,
   TPU v4-8 and 8x H100 at an assumed utilisation, and the host cores that feeds (FLOPs per
   example from the TPU compiler's cost analysis of the train step, docs/tpu_reports/).

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

  run = train.Run(config)
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


def _msrvtt_source_files(tmp: str, num_videos: int, seconds: int) -> tuple[str, str, str]:
  """Writes MSR-VTT-layout annotations and textured videos under ``tmp``; returns the folders
  (annotations, videos, prepared output)."""
  manual, videos, out = (os.path.join(tmp, d) for d in ("manual", "videos", "out"))
  os.makedirs(manual)
  os.makedirs(videos)
  ids = [f"video{i}" for i in range(num_videos)]
  for i, vid in enumerate(ids):
    _write_textured_video(os.path.join(videos, f"{vid}.mp4"), i, seconds)
  _write_msrvtt_annotations(manual, ids)
  return manual, videos, out


def frames_mode(num_videos: int, seconds: int, steps: int, workers: int) -> dict:
  """prepare (decode + store) throughput, then 224 px frame batches read back."""
  from ncl_jax.data import (default_data_config, get_dataset,  # pylint: disable=g-import-not-at-top
                            prepare)

  with tempfile.TemporaryDirectory() as tmp:
    manual, videos, out = _msrvtt_source_files(tmp, num_videos, seconds)
    args = prepare._parser().parse_args([  # pylint: disable=protected-access
        "msrvtt", "--manual_dir", manual, "--data_dir", out, "--videos_dir", videos,
        "--mode", "frames", "--max_frames", "12", "--max_bad_fraction", "0"])
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
    args = prepare._parser().parse_args([  # pylint: disable=protected-access
        "msrvtt", "--manual_dir", manual, "--data_dir", out, "--features_dir", features,
        "--mode", "features", "--max_frames", "12", "--max_bad_fraction", "0"])
    prepare.prepare(args)
    cfg = default_data_config("msrvtt")
    cfg.update(dict(data_dir=out, input_mode="features", prefetch=0, train_split="train+val"))
    dataset = get_dataset(cfg, _Words())
    batch_size = 128
    batch_s = _time_batches(dataset.train_iterator(batch_size, seed=0), steps)
  return {"videos": num_videos, "feature_dim": dim, "batch_size": batch_size,
          "batch_ms": 1e3 * batch_s, "examples_per_s": batch_size / batch_s}


# -- frames mode: Grain worker processes against a PyTorch DataLoader ----------------------------


class _TorchCaptions:
  """A map-style PyTorch dataset over the same prepared split: caption i -> one example.

  Reads the same array_record records and decodes the same JPEGs as the Grain pipeline (through
  the split's own ``tokens``/``videos``), so only the loader machinery differs.
  """

  def __init__(self, split):
    self.split = split

  def __len__(self):
    return self.split.num_texts

  def __getitem__(self, caption):
    video, frame_mask = self.split.videos(self.split.caption_to_video[[caption]])
    return {"text_tokens": self.split.tokens(np.asarray([caption]))[0], "video": video[0],
            "frame_mask": frame_mask[0]}


def _torch_loader(split, batch_size: int, workers: int):
  import torch  # pylint: disable=g-import-not-at-top
  generator = torch.Generator().manual_seed(0)
  loader = torch.utils.data.DataLoader(
      _TorchCaptions(split), batch_size=batch_size, shuffle=True, drop_last=True,
      num_workers=workers, prefetch_factor=2, persistent_workers=True, generator=generator,
      # Fresh interpreters, as Grain's workers: forking a process that already runs Grain's and
      # array_record's threads can crash the child.
      multiprocessing_context="spawn")

  def endless():
    while True:
      yield from loader
  return endless()


def _child_pids() -> set[int]:
  import psutil  # pylint: disable=g-import-not-at-top
  return {p.pid for p in psutil.Process().children(recursive=True)}


def _cpu_seconds(pids) -> float:
  """User + system CPU time of the given processes (those still alive)."""
  import psutil  # pylint: disable=g-import-not-at-top
  total = 0.0
  for pid in pids:
    try:
      times = psutil.Process(pid).cpu_times()
      total += times.user + times.system
    except psutil.NoSuchProcess:
      pass
  return total


def _window(make, workers: int, batches: int, batch_size: int) -> tuple[float, float]:
  """Starts a loader, skips its start-up and what it buffered meanwhile, then times ``batches``
  batches; returns (examples/s, examples per CPU-second of its processes), and stops it."""
  before = _child_pids()
  loader = make()
  for _ in range(2 * max(workers, 1) + 1):   # start-up and buffered batches: not timed
    next(loader)
  pids = _child_pids() - before
  cpu0, main0, start = _cpu_seconds(pids), time.process_time(), time.perf_counter()
  for _ in range(batches):
    batch = next(loader)
  seconds = time.perf_counter() - start
  cpu = _cpu_seconds(pids) - cpu0 + time.process_time() - main0
  del batch
  close = getattr(loader, "close", None)
  if close is not None:
    close()
  return batches * batch_size / seconds, batches * batch_size / cpu


def frames_loaders(num_videos: int, seconds: int, batch_size: int, batches: int, rounds: int,
                   workers: tuple[int, ...] = (1, 2)) -> dict:
  """Frames-mode examples/s of Grain and of a PyTorch DataLoader at equal worker counts.

  The loaders are measured in interleaved windows (round r starts, times and stops every loader
  once, in rotated order), so a change in the shared machine's load hits all of them alike;
  reported are each loader's median over rounds and the ratios within each round.
  """
  from ncl_jax.data import default_data_config, get_dataset, prepare  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    manual, videos, out = _msrvtt_source_files(tmp, num_videos, seconds)
    prepare.main(["msrvtt", "--manual_dir", manual, "--data_dir", out, "--videos_dir", videos,
                  "--max_frames", "12", "--image_size", "224"])
    cfg = default_data_config("msrvtt")
    cfg.update(dict(data_dir=out, prefetch=2, train_split="train+val"))
    dataset = get_dataset(cfg, _Words())
    split = dataset._splits[dataset.train_split]  # pylint: disable=protected-access
    makers = {}
    for w in workers:
      makers[f"grain_{w}"] = (w, lambda w=w: dataset.train_iterator(batch_size, seed=0,
                                                                    num_workers=w))
      makers[f"torch_{w}"] = (w, lambda w=w: _torch_loader(split, batch_size, w))
    load, per_round, cpu_rates = [os.getloadavg()[0]], [], {name: [] for name in makers}
    for r in range(rounds):
      names = list(makers)
      names = names[r % len(names):] + names[:r % len(names)]   # rotate who goes first
      speeds = {}
      for name in names:
        speeds[name], per_cpu = _window(makers[name][1], makers[name][0], batches, batch_size)
        cpu_rates[name].append(per_cpu)
      per_round.append(speeds)
      load.append(os.getloadavg()[0])
      print(f"  round {r + 1}/{rounds}: " + ", ".join(
          f"{name} {speed:.1f}" for name, speed in sorted(speeds.items()))
          + f" examples/s; load {load[-1]:.1f}", flush=True)
    results = {name: {"workers": w, "examples_per_s": float(np.median([r[name] for r in per_round])),
                      "examples_per_cpu_s": float(np.median(cpu_rates[name])),
                      "windows": [r[name] for r in per_round]}
               for name, (w, _) in makers.items()}
  ratios = {}
  for w in workers:
    ratios[f"grain_over_torch_{w}"] = [r[f"grain_{w}"] / r[f"torch_{w}"] for r in per_round]
  lo, hi = workers[0], workers[-1]
  ratios[f"grain_{hi}_over_{lo}"] = [r[f"grain_{hi}"] / r[f"grain_{lo}"] for r in per_round]
  ratios[f"torch_{hi}_over_{lo}"] = [r[f"torch_{hi}"] / r[f"torch_{lo}"] for r in per_round]
  return {"videos": num_videos, "batch_size": batch_size, "batches_per_window": batches,
          "rounds": rounds, "loaders": results, "ratios_per_round": ratios,
          "ratios_median": {k: float(np.median(v)) for k, v in ratios.items()},
          "load_average_1min": load}


# -- sizing: what an accelerator consumes ---------------------------------------------------------

# FLOPs per training example come from the TPU compiler's cost analysis of the real train step
# (``python -m ncl_jax.main --config=configs/msrvtt.py --compile_only --topology=...``), whose
# JSON reports are kept in docs/tpu_reports/ (docs/tpu.md); peaks from ncl_jax.chips. No GPU
# compile is available here, so the H100 row uses the v5e-8 compile's FLOPs per example (the
# same model and batch; only the per-device share of the replicated loss differs).
COMPILE_REPORTS = ROOT / "docs" / "tpu_reports"
ACCELERATORS = (("TPU v5e-8", "v5e", "b32_meanP_v5e-8.json", None),
                ("TPU v4-8", "v4", "b32_meanP_v4-8.json", None),
                ("8x H100 SXM", "h100", "b32_meanP_v5e-8.json", 8))


def compiled_train_flops(report_dir: pathlib.Path = COMPILE_REPORTS) -> dict:
  """FLOPs per training example of ViT-B/32 meanP (12 frames, 32 words, batch 128) per
  compile report, from the compiled train step: ``{file: (flops_per_example, devices)}``."""
  flops = {}
  for _, _, name, _ in ACCELERATORS:
    path = report_dir / name
    if path.is_file() and name not in flops:
      report = json.loads(path.read_text())
      flops[name] = (float(report["flops_per_example"]), int(report["devices"]))
  return flops


def sizing(examples_per_cpu_s: float, utilization: float = 0.4,
           report_dir: pathlib.Path = COMPILE_REPORTS) -> list[dict]:
  """Examples/s each accelerator's train step consumes at ``utilization`` of peak, and the host
  cores a frames-mode pipeline needs to keep up at ``examples_per_cpu_s`` per core."""
  from ncl_jax import chips  # pylint: disable=g-import-not-at-top
  compiled = compiled_train_flops(report_dir)
  rows = []
  for name, chip, report, devices in ACCELERATORS:
    if report not in compiled:
      continue
    per_example, report_devices = compiled[report]
    devices = devices or report_devices
    peak = chips.CHIPS[chip].peak_flops
    rate = devices * peak * utilization / per_example
    rows.append({"accelerator": name, "peak_tflops": devices * peak / 1e12,
                 "flops_per_example": per_example, "flops_from": report,
                 "examples_per_s": rate, "steps_per_s_at_128": rate / 128,
                 "host_cores_needed": rate / examples_per_cpu_s})
  return rows


def _print_loaders(loaders: dict) -> None:
  print(f"frames mode, Grain vs PyTorch DataLoader (224 px, 12 frames, batch "
        f"{loaders['batch_size']}, {loaders['rounds']} interleaved rounds of "
        f"{loaders['batches_per_window']} batches; 1-min load average "
        f"{min(loaders['load_average_1min']):.1f}-{max(loaders['load_average_1min']):.1f}):")
  for name, r in loaders["loaders"].items():
    print(f"  {name:8s} {r['examples_per_s']:7.1f} examples/s (wall, median), "
          f"{r['examples_per_cpu_s']:6.1f} examples per CPU-second")
  for name, value in loaders["ratios_median"].items():
    print(f"  {name}: {value:.2f} (median over rounds; per round "
          + ", ".join(f"{v:.2f}" for v in loaders["ratios_per_round"][name]) + ")")


def _print_sizing(rows: list[dict], per_core: float, utilization: float) -> None:
  print(f"sizing: ViT-B/32 meanP, 12 frames + 32 words, FLOPs per training example from the "
        f"compiled train step (docs/tpu_reports/); {utilization:.0%} of dense bf16 peak; host "
        f"pipeline {per_core:.1f} examples per core-second (Grain, 2 workers, measured above)")
  print(f"  {'accelerator':14s} {'GFLOPs/example':>14s} {'peak TFLOP/s':>12s} {'examples/s':>10s} "
        f"{'steps/s @128':>12s} {'host cores':>10s}")
  for r in rows:
    print(f"  {r['accelerator']:14s} {r['flops_per_example'] / 1e9:14.0f} "
          f"{r['peak_tflops']:12.0f} {r['examples_per_s']:10.0f} "
          f"{r['steps_per_s_at_128']:12.1f} {r['host_cores_needed']:10.0f}")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=50, help="batches timed per measurement")
  parser.add_argument("--videos", type=int, default=24, help="videos for the frames benchmark")
  parser.add_argument("--seconds", type=int, default=15, help="length of each video")
  parser.add_argument("--workers", type=int, default=2, help="Grain worker processes")
  parser.add_argument("--part", choices=("all", "loaders"), default="all",
                      help="loaders: only the Grain vs PyTorch comparison and the sizing table")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (loaders)")
  parser.add_argument("--window", type=int, default=8, help="batches per timed window (loaders)")
  parser.add_argument("--utilization", type=float, default=0.4,
                      help="assumed fraction of accelerator peak (sizing)")
  args = parser.parse_args()
  print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs "
        f"(shared; 1-min load average {os.getloadavg()[0]:.1f} at the start)")
  report = {}
  if args.part == "all":
    features = features_mode(args.steps)
    frames = frames_mode(args.videos, args.seconds, max(args.steps // 5, 5), args.workers)
    prepared = prepared_features_mode(400, args.steps)
    print(f"features mode (synthetic, batch {features['batch_size']}): "
          f"{features['batch_ms']:.2f} ms/batch = {features['examples_per_s']:.0f} examples/s; "
          f"demo train step {features['train_step_ms']:.1f} ms on {features['devices']} "
          f"device(s); pipeline/step = {features['pipeline_over_step']:.3f}; "
          f"synthetic set generated in {features['generate_s']:.2f} s")
    print(f"frames mode (224 px, 12 frames, batch {frames['batch_size']}): "
          f"{frames['batch_ms']:.0f} ms/batch = {frames['examples_per_s']:.1f} examples/s; "
          f"prepare {frames['prepare_videos_per_s']:.2f} videos/s "
          f"({frames['seconds_per_video']} s 320x240 25 fps clips), "
          f"{frames['stored_kb_per_video']:.0f} KB stored per video")
    print(f"features mode on a prepared set (MSR-VTT layout, [12, {prepared['feature_dim']}] "
          f"per video, batch {prepared['batch_size']}): {prepared['batch_ms']:.1f} ms/batch = "
          f"{prepared['examples_per_s']:.0f} examples/s")
    report.update(features=features, frames=frames, prepared_features=prepared)
  loaders = frames_loaders(args.videos, min(args.seconds, 12), 16, args.window, args.rounds)
  _print_loaders(loaders)
  per_core = loaders["loaders"]["grain_2"]["examples_per_cpu_s"]
  rows = sizing(per_core, args.utilization)
  _print_sizing(rows, per_core, args.utilization)
  report.update(loaders=loaders, sizing=rows)
  print(json.dumps(report))


if __name__ == "__main__":
  main()
