"""Running groups of ``jax.distributed`` worker processes on localhost (imported by the test
modules that start several processes, not collected).

Coordinator ports: a free port is picked by binding port 0 and releasing it, and another program
may take it before the coordinator binds it. That race cannot be closed from outside the
coordinator, so the workers are started again on a new port when the coordinator reports that
it could not bind (``run_on_free_port``). The timeouts only catch hangs.
"""

import os
import pathlib
import signal
import socket
import subprocess
import time

NUM_PROCESSES = 2
# What jax.distributed's coordinator (process 0) prints when its port is taken: gRPC's line,
# followed by a JaxRuntimeError "Failed to start RPC server" or, sometimes, a segmentation fault.
PORT_TAKEN = "Failed to add port to server"
PORT_ATTEMPTS = 3
TIMEOUT_S = 600  # per group of processes; only a hang gets near it


def free_port():
  """A port that was free a moment ago (see the module docstring for the race)."""
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def run_on_free_port(start, log_dir, timeout=TIMEOUT_S):
  """Runs ``start(port, logs)``'s processes to the end, on a new port if the first one was taken.

  Args:
    start: ``start(port, logs) -> [Popen]``; process 0 is the coordinator; process i must write
      its output to the open file ``logs[i]``.
    log_dir: where the output files go.
    timeout: seconds for the whole group (per attempt).

  Returns:
    ``[(returncode, output)]`` of the last attempt.
  """
  log_dir = pathlib.Path(log_dir)
  log_dir.mkdir(parents=True, exist_ok=True)
  for attempt in range(PORT_ATTEMPTS):
    paths = [log_dir / f"attempt{attempt}_process{i}.log" for i in range(NUM_PROCESSES)]
    logs = [open(path, "w") for path in paths]
    procs = []
    try:
      procs = start(free_port(), logs)
      taken = _wait_unless_port_taken(procs, paths[0], timeout)
    finally:
      for proc in procs:
        if proc.poll() is None:
          proc.kill()
          proc.wait()
      for log in logs:
        log.close()
    if not taken:
      return [(proc.returncode, path.read_text()) for proc, path in zip(procs, paths)]
  raise AssertionError(f"the coordinator's port was taken {PORT_ATTEMPTS} times in a row")


def _wait_unless_port_taken(procs, coordinator_log, timeout):
  """Waits for every process; returns True early if the coordinator could not bind its port."""
  deadline = time.monotonic() + timeout
  while any(proc.poll() is None for proc in procs):
    if procs[0].poll() not in (None, 0) and PORT_TAKEN in coordinator_log.read_text():
      return True
    if time.monotonic() > deadline:
      _dump_stacks(procs)
      raise AssertionError(f"the processes did not finish in {timeout} s; their Python stacks "
                           "are at the end of their logs")
    time.sleep(0.1)
  return procs[0].returncode != 0 and PORT_TAKEN in coordinator_log.read_text()


def _dump_stacks(procs):
  """SIGABRT to hung workers: faulthandler (PYTHONFAULTHANDLER, see env) prints their stacks."""
  for proc in procs:
    if proc.poll() is None:
      proc.send_signal(signal.SIGABRT)
  for proc in procs:
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      pass


def env(num_devices, cache_dir=None):
  """Fake CPU devices; optionally a persistent compilation cache that later runs reuse."""
  result = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices),
                JAX_DISABLE_MOST_OPTIMIZATIONS="1", PYTHONFAULTHANDLER="1")
  result.pop("XLA_FLAGS", None)
  if cache_dir is not None:
    result.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return result
