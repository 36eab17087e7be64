"""Streamed-bank NCL and QB-Norm normalization: wall time and peak memory vs the targets.

Run from the repository root::

  python benchmarks/normalize.py [--bank-rows 200000] [--skip-dense]

Writes a query bank (``--bank-rows`` x 1000 float32, see :func:`make_data`) and a 1000 x 1000
test matrix to a temporary directory, then normalizes the test matrix in a fresh subprocess per
method, with the bank opened as a read-only memmap:

* ``ncl``: streamed, Anderson-accelerated Sinkhorn biases (tol 1e-4), the path
  ``normalize(..., 'ncl', bank)`` takes for banks over 16M entries; target: <= 10 s wall and
  <= 2 GB peak RSS for 200,000 x 1,000;
* ``qbnorm``: one streamed pass (activation set + column logsumexp);
* ``ncl_plain``: the same stream without acceleration, capped at ``--plain-iterations``;
* ``dense`` (the peer): ``ncl_jax.sinkhorn.sinkhorn`` on the whole bank loaded into memory,
  capped at ``--plain-iterations``.

Wall time includes compilation; CPU time (user + system, all threads) shows how much of the
two cores the run needed, a steadier number than wall time on a loaded machine. Peak memory is the worker's VmHWM, which counts the memmapped
bank pages it touched (the page cache holding the bank), so it is an upper bound on what the
process itself allocates. Numbers from a shared CPU are noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TARGET_SECONDS = 10.0
TARGET_GIB = 2.0


def make_data(directory: pathlib.Path, bank_rows: int, seed: int = 0) -> str:
  """Writes bank.npy [bank_rows, 1000] and test.npy [1000, 1000]; returns their source.

  The test matrix is the real MSR-VTT 1k-A ``msrvtt_video_matrix.npy`` (Cap4Video) when the
  shared data sits next to the repository, and the bank holds noisy copies (+ N(0, 0.02^2),
  about the rows' own spread) of its rows, so the bank has a real model's hubness and a
  realistic number of Sinkhorn passes. Otherwise both are synthetic (noisy captions of random
  video embeddings with per-video score offsets).
  """
  rng = np.random.default_rng(seed)
  real = ROOT.parent / "shared" / "data" / "msrvtt_cap4video" / "msrvtt_video_matrix.npy"
  if real.is_file():
    test = np.load(real).astype(np.float32)
    source = f"real MSR-VTT 1k-A matrix ({real.name}) + noisy copies of its rows as bank"

    def bank_rows_like(count):
      return test[rng.integers(0, len(test), count)] + 0.02 * rng.standard_normal(
          (count, test.shape[1])).astype(np.float32)
  else:
    dim, videos = 256, 1000
    vid = rng.standard_normal((videos, dim)).astype(np.float32)
    vid /= np.linalg.norm(vid, axis=1, keepdims=True)
    offsets = (0.01 * rng.standard_normal(videos)).astype(np.float32)

    def captions(of_videos):
      text = vid[of_videos] + 4.5 * rng.standard_normal((len(of_videos), dim)).astype(
          np.float32) / np.sqrt(dim)
      text /= np.linalg.norm(text, axis=1, keepdims=True)
      return 0.3 * (text @ vid.T) + offsets[None, :]

    test = captions(np.arange(videos)).astype(np.float32)
    source = "synthetic (shared data not found)"

    def bank_rows_like(count):
      return captions(rng.integers(0, videos, count))

  bank = np.lib.format.open_memmap(directory / "bank.npy", "w+", np.float32,
                                   (bank_rows, test.shape[1]))
  for start in range(0, bank_rows, 20000):
    stop = min(start + 20000, bank_rows)
    bank[start:stop] = bank_rows_like(stop - start)
  bank.flush()
  del bank
  np.save(directory / "test.npy", test)
  return source


def _peak_rss_gib() -> float:
  """This process's resident-set high-water mark (VmHWM).

  Unlike ``getrusage().ru_maxrss``, which Linux keeps across ``execve`` (so a worker would
  inherit its parent's peak), VmHWM belongs to the new address space.
  """
  with open("/proc/self/status", encoding="ascii") as status:
    for line in status:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 2**20
  raise RuntimeError("VmHWM not found in /proc/self/status")


def worker(method: str, directory: str, plain_iterations: int) -> None:
  """Runs one normalization in this (fresh) process and prints a JSON line."""
  from ncl_jax import metrics, sinkhorn  # pylint: disable=g-import-not-at-top
  from ncl_jax import normalize as nz  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  directory = pathlib.Path(directory)
  test = np.load(directory / "test.npy")
  baseline = _peak_rss_gib()
  start, cpu_start = time.perf_counter(), time.process_time()
  info = {}
  if method == "dense":
    # The peer: the whole bank in memory through ncl_jax.sinkhorn.sinkhorn (plain Sinkhorn),
    # capped at plain_iterations so the run stays short; it reports the error it reached.
    bank = np.load(directory / "bank.npy")
    out = sinkhorn.sinkhorn(jnp.asarray(bank) / 0.01, tol=1e-4, max_iterations=plain_iterations)
    bias = np.asarray(out.col_potential)
    scores = test / 0.01 + bias[None, :]
    info = {"iterations": int(out.iterations), "error": float(out.error)}
  elif method in ("ncl", "ncl_plain"):
    bank = np.load(directory / "bank.npy", mmap_mode="r")
    options = {"anderson": 0, "max_iterations": plain_iterations} if method == "ncl_plain" else {}
    scores, biases = nz.ncl(test, bank, temperature=0.01, **options)
    info = {"iterations": biases.iterations, "error": biases.error}
  else:
    bank = np.load(directory / "bank.npy", mmap_mode="r")
    scores = nz.qbnorm(test, bank, temperature=0.01)
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  print(json.dumps({
      "method": method, "wall_s": wall, "cpu_s": cpu, "peak_rss_gib": _peak_rss_gib(),
      "rss_before_gib": baseline, "t2v_r1": metrics.t2v_metrics(scores)["R@1"],
      "t2v_r1_raw": metrics.t2v_metrics(test)["R@1"], **info}))


def _run_worker(method: str, directory: pathlib.Path, plain_iterations: int) -> dict:
  proc = subprocess.run(
      [sys.executable, __file__, "--worker", method, str(directory), str(plain_iterations)],
      capture_output=True, text=True, check=False, cwd=ROOT)
  if proc.returncode != 0:
    raise RuntimeError(f"{method} worker failed:\n{proc.stderr}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--bank-rows", type=int, default=200_000)
  parser.add_argument("--plain-iterations", type=int, default=100,
                      help="iteration cap of the unaccelerated runs (ncl_plain, dense)")
  parser.add_argument("--skip-dense", action="store_true", help="skip the in-memory peer")
  parser.add_argument("--worker", nargs=3, metavar=("METHOD", "DIR", "ITERS"),
                      help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    worker(args.worker[0], args.worker[1], int(args.worker[2]))
    return

  with tempfile.TemporaryDirectory(prefix="ncl_bench_") as tmp:
    directory = pathlib.Path(tmp)
    start = time.perf_counter()
    source = make_data(directory, args.bank_rows)
    print(f"data: {source}")
    print(f"bank {args.bank_rows} x 1000 float32 "
          f"({os.path.getsize(directory / 'bank.npy') / 2**30:.2f} GiB) written in "
          f"{time.perf_counter() - start:.1f} s")
    methods = ["ncl", "qbnorm", "ncl_plain"] + ([] if args.skip_dense else ["dense"])
    results = {m: _run_worker(m, directory, args.plain_iterations) for m in methods}

  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}")
  print(f"{'method':10s} {'wall s':>8s} {'CPU s':>7s} {'s/pass':>7s} {'peak RSS GiB':>13s} "
        f"{'iters':>6s} {'error':>9s} {'R@1 raw->norm':>14s}")
  for name, r in results.items():
    passes = r.get("iterations", 0) + 1
    print(f"{name:10s} {r['wall_s']:8.2f} {r['cpu_s']:7.2f} {r['wall_s'] / passes:7.3f} "
          f"{r['peak_rss_gib']:13.2f} "
          f"{str(r.get('iterations', '-')):>6s} {r.get('error', float('nan')):9.1e} "
          f"{r['t2v_r1_raw']:6.1f}->{r['t2v_r1']:5.1f}")
  ncl = results["ncl"]
  print(f"\nncl streamed: {ncl['wall_s']:.2f} s (target <= {TARGET_SECONDS:.0f} s: "
        f"{'met' if ncl['wall_s'] <= TARGET_SECONDS else 'MISSED'}), peak RSS "
        f"{ncl['peak_rss_gib']:.2f} GiB (target <= {TARGET_GIB:.0f} GB: "
        f"{'met' if ncl['peak_rss_gib'] * 2**30 <= TARGET_GIB * 1e9 else 'MISSED'})")
  if "dense" in results:
    dense = results["dense"]
    per_pass = lambda r: r["wall_s"] / (r["iterations"] + 1)
    memory_ratio = dense["peak_rss_gib"] / ncl["peak_rss_gib"]
    print(f"dense sinkhorn() peer: {per_pass(dense) / per_pass(results['ncl_plain']):.2f}x the "
          f"time per pass of the unaccelerated stream, {memory_ratio:.2f}x the peak RSS; error "
          f"after {dense['iterations']} iterations {dense['error']:.1e} (accelerated stream: "
          f"{ncl['error']:.1e} after {ncl['iterations']})")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
