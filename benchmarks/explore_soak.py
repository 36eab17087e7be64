"""The retrieval explorer under concurrent clients: errors, throughput, latency and memory.

    python benchmarks/explore_soak.py --workdir /tmp/ncl_demo [--clients 16] [--seconds 30]

Starts ``python -m ncl_jax.explore --port 0`` as a user would, warms every endpoint once, then
runs ``--clients`` threads for ``--seconds``, each sending requests back to back in a seeded
random mix: typed searches (a caption of the split plus a random word, so every one is embedded
anew), caption searches, the hubs view, a page of the query list and the info. Any answer other
than 200, or a failed connection, counts as an error. The server's resident memory (RSS, from
/proc) is sampled every 0.2 s: its growth from after the warm-up to the end tells whether
something accumulates per request. Prints one JSON line with the numbers, the machine and its
load; exits 1 if any request failed. tests/test_explore.py runs the same soak for a few seconds
on the test server.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np

_RSS_SAMPLE_S = 0.2


def rss_mib(pid: int) -> float:
  """Resident memory of a running process, from /proc/PID/status."""
  for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
    if line.startswith("VmRSS:"):
      return int(line.split()[1]) / 1024
  raise RuntimeError(f"no VmRSS for process {pid}")


def _requests(url: str, captions: list[str], num_texts: int, rng: np.random.Generator):
  """Endless seeded mix of (kind, URL) pairs over the explorer's API."""
  words = [w for caption in captions[:50] for w in caption.split()] or ["video"]
  while True:
    kind = rng.choice(["typed", "caption", "hubs", "queries", "info"], p=[.5, .2, .1, .1, .1])
    if kind == "typed":
      query = f"{captions[rng.integers(len(captions))]} {words[rng.integers(len(words))]}"
      params = {"q": query, "k": int(rng.integers(1, 51))}
      yield kind, url + "api/search?" + urllib.parse.urlencode(params)
    elif kind == "caption":
      yield kind, url + f"api/search?caption={rng.integers(num_texts)}&k=10"
    elif kind == "hubs":
      yield kind, url + f"api/hubs?k={rng.integers(1, 21)}&over={rng.choice(['bank', 'test'])}"
    elif kind == "queries":
      order = rng.choice(["index", "improved", "worsened"])
      yield kind, url + f"api/queries?limit=50&offset={rng.integers(num_texts)}&order={order}"
    else:
      yield kind, url + "api/info"


def _fetch(address: str) -> int:
  try:
    with urllib.request.urlopen(address, timeout=60) as response:
      response.read()
      return response.status
  except urllib.error.HTTPError as err:
    return err.code


def soak(url: str, pid: int, *, clients: int = 16, seconds: float = 30.0, seed: int = 0) -> dict:
  """Runs the concurrent request mix against a serving explorer; returns the measurements.

  Args:
    url: the explorer's address, ending in ``/``.
    pid: the server's process id (for its memory).
    clients: concurrent client threads.
    seconds: how long they send requests.
    seed: seeds each client's request mix.

  Returns:
    ``{"requests", "errors", "error_examples", "requests_per_s", "p50_ms", "p99_ms",
    "max_ms", "rss_mib": {"after_warmup", "peak", "end"}, "rss_growth_mib", "clients",
    "seconds"}``.
  """
  with urllib.request.urlopen(url + "api/queries?limit=1000", timeout=60) as response:
    page = json.loads(response.read())
  captions = [q["text"] for q in page["queries"]]
  num_texts = int(page["total"])
  warmup = _requests(url, captions, num_texts, np.random.default_rng(seed))
  for _ in range(20):  # every endpoint once or more: compilations and caches are in place
    _fetch(next(warmup)[1])
  rss_start = rss_mib(pid)
  latencies, failures, lock = [], [], threading.Lock()
  deadline = time.perf_counter() + seconds
  stop = threading.Event()

  def client(index: int) -> None:
    mix = _requests(url, captions, num_texts, np.random.default_rng([seed, index]))
    while time.perf_counter() < deadline:
      kind, address = next(mix)
      started = time.perf_counter()
      try:
        status = _fetch(address)
      except OSError as err:  # connection refused or reset, timeout
        status = f"{type(err).__name__}: {err}"
      elapsed = 1000 * (time.perf_counter() - started)
      with lock:
        latencies.append(elapsed)
        if status != 200:
          failures.append(f"{kind} {address[len(url):][:80]} -> {status}")

  peak = [rss_start]

  def monitor() -> None:
    while not stop.wait(_RSS_SAMPLE_S):
      peak[0] = max(peak[0], rss_mib(pid))

  watcher = threading.Thread(target=monitor, daemon=True)
  watcher.start()
  threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
  started = time.perf_counter()
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  wall = time.perf_counter() - started
  stop.set()
  watcher.join()
  rss_end = rss_mib(pid)
  ordered = np.sort(latencies)
  return {
      "clients": clients, "seconds": round(wall, 2), "requests": len(latencies),
      "errors": len(failures), "error_examples": failures[:5],
      "requests_per_s": round(len(latencies) / wall, 1),
      "p50_ms": round(float(np.percentile(ordered, 50)), 1),
      "p99_ms": round(float(np.percentile(ordered, 99)), 1),
      "max_ms": round(float(ordered[-1]), 1),
      "rss_mib": {"after_warmup": round(rss_start, 1), "peak": round(max(peak[0], rss_end), 1),
                  "end": round(rss_end, 1)},
      "rss_growth_mib": round(rss_end - rss_start, 1),
  }


def parse_args(argv):
  import explore  # pylint: disable=g-import-not-at-top  (benchmarks/explore.py, beside this file)
  parser = argparse.ArgumentParser(prog="python benchmarks/explore_soak.py",
                                   description=__doc__.split("\n\n")[0])
  explore.add_source_args(parser)
  parser.add_argument("--clients", type=int, default=16, help="concurrent clients (default 16)")
  parser.add_argument("--seconds", type=float, default=30.0, help="soak length (default 30)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  import shutil  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import explore  # pylint: disable=g-import-not-at-top  (benchmarks/explore.py, beside this file)
  args = parse_args(sys.argv[1:] if argv is None else argv)
  source = explore.server_source(args)
  cache = tempfile.mkdtemp(prefix="ncl_explore_soak_cache_")
  try:
    process, url, _, _ = explore.start_server(source, cache)
    try:
      result = soak(url, process.pid, clients=args.clients, seconds=args.seconds)
    finally:
      explore.stop(process)
  finally:
    shutil.rmtree(cache, ignore_errors=True)
  print(json.dumps({**result, "machine": explore.machine()}), flush=True)
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
