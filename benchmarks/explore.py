"""The retrieval explorer's start-up time and search latency on a finished run.

Run from the repository root on the Quickstart demo run (or any run / bundle)::

  python benchmarks/explore.py --workdir /tmp/ncl_demo [--starts 3] [--searches 200]

Each start launches ``python -m ncl_jax.explore --workdir RUN --port 0`` as a user would and
times it from launch to the ``serving ...`` line (the page can be used from then on), with the
server's own breakdown of its start-up phases (``/api/info``). The first start is cold (an empty
JAX compilation cache in a temporary folder), the later ones find their compilations cached, as
a user's second start does. Beside the wall time it reports the server process's CPU time
(user + system, all threads) until it serves: on a shared machine the wall time grows with the
other jobs' load, the CPU time much less, and an idle machine needs at most that long on one
core. Searches are typed queries (the
split's captions, in random order, so every one is embedded anew) sent over HTTP, one at a time:
the latency a page sees (client) and the server's time inside the search (``elapsed_ms``). The
goal is a start under 10 s and a search under 100 ms on the demo's 500-video gallery. The
machine and its load average are printed beside the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]


def add_source_args(parser: argparse.ArgumentParser) -> None:
  """--workdir RUN | --bundle BUNDLE: what the explorer serves (also benchmarks/explore_soak.py)."""
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--workdir", help="a finished training run")
  source.add_argument("--bundle", help="an exported bundle")


def server_source(args: argparse.Namespace) -> list[str]:
  """The explorer's command-line arguments for :func:`add_source_args`'s choice."""
  return ["--workdir", args.workdir] if args.workdir else ["--bundle", args.bundle]


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python benchmarks/explore.py",
                                   description=__doc__.split("\n\n")[0])
  add_source_args(parser)
  parser.add_argument("--starts", type=int, default=3, help="server starts to time")
  parser.add_argument("--searches", type=int, default=200, help="typed searches to time")
  parser.add_argument("--k", type=int, default=10, help="results per column")
  return parser.parse_args(argv)


def machine() -> str:
  cpu = platform.processor() or platform.machine()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}"


def get(url: str) -> dict:
  with urllib.request.urlopen(url, timeout=60) as response:
    return json.loads(response.read())


def cpu_seconds(pid: int) -> float:
  """User + system CPU time of a running process (all its threads), from /proc."""
  fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
  return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_server(source: list[str], cache: str):
  """(process, url, seconds from launch to the serving line, CPU seconds by then)."""
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  started = time.perf_counter()
  process = subprocess.Popen([sys.executable, "-m", "ncl_jax.explore", *source, "--port", "0",
                              "--compile_cache", cache],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             text=True)
  line = process.stdout.readline()
  seconds = time.perf_counter() - started
  if not line.startswith("serving "):
    process.kill()
    raise SystemExit(f"the explorer did not start: {line!r}")
  return process, line.split()[1], seconds, cpu_seconds(process.pid)


def stop(process) -> None:
  process.terminate()
  process.wait(timeout=30)


def time_searches(url: str, count: int, k: int) -> tuple[list[float], list[float]]:
  """Client and server milliseconds of ``count`` typed searches."""
  captions = [q["text"] for q in get(url + "api/queries?limit=1000")["queries"]]
  order = np.random.default_rng(0).permutation(len(captions))
  client, server = [], []
  for i in range(count):
    query = captions[order[i % len(captions)]]
    started = time.perf_counter()
    answer = get(url + "api/search?" + urllib.parse.urlencode({"q": query, "k": k}))
    client.append(1000 * (time.perf_counter() - started))
    server.append(answer["elapsed_ms"])
  return client, server


def summary(values: list[float]) -> str:
  ordered = sorted(values)
  p95 = ordered[min(len(ordered) - 1, int(round(0.95 * (len(ordered) - 1))))]
  return f"median {statistics.median(values):.1f}, p95 {p95:.1f}, max {max(values):.1f}"


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  source = server_source(args)
  print(f"machine: {machine()}", flush=True)
  starts, cpu, info = [], [], None
  cache = tempfile.mkdtemp(prefix="ncl_explore_bench_cache_")
  try:
    for attempt in range(args.starts):
      process, url, seconds, cpu_time = start_server(source, cache)
      starts.append(seconds)
      cpu.append(cpu_time)
      try:
        info = get(url + "api/info")
        print(f"start {attempt + 1}: {seconds:.2f} s to serving, {cpu_time:.2f} CPU s; "
              f"server phases (s): "
              f"{json.dumps(info['startup_seconds'])}", flush=True)
        if attempt == args.starts - 1:
          client, server = time_searches(url, args.searches, args.k)
      finally:
        stop(process)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  print(f"{info['dataset']} {info['split']}: {info['num_videos']} videos, {info['num_texts']} "
        f"captions, bank {info['bank_size']}")
  print(f"start-up (launch to serving): cold {starts[0]:.2f} s ({cpu[0]:.2f} CPU s)" + (
      f"; cached compilations ({len(starts) - 1} starts) median "
      f"{statistics.median(starts[1:]):.2f} s, min {min(starts[1:]):.2f} s "
      f"({statistics.median(cpu[1:]):.2f} CPU s)" if len(starts) > 1 else ""))
  print(f"typed search, top {args.k} plain + NCL, {len(client)} queries: client ms "
        f"{summary(client)}; server ms {summary(server)}")
  print(f"load average at the end: {os.getloadavg()[0]:.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
