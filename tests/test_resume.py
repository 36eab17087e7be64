"""A run stopped by SIGTERM, killed with SIGKILL during a checkpoint save, or resumed from a
damaged latest checkpoint ends exactly like an uninterrupted run.

Both runs are the real command line (``python -m ncl_jax.main``) in subprocesses on 2 fake CPU
devices, so the test covers the signal handler, the forced save, exit code 0, automatic resume
(train state, queues, RNG, data-iterator position, best-checkpoint bookkeeping) and the rewind
of ``metrics.jsonl``.

The SIGTERM is real (the operating system delivers it to the trainer's handler), but the trainer
raises it itself right after step ``STOP_AFTER`` through the test-only hook
``checkpointing.TEST_SIGTERM_ENV``, so the stop step does not depend on how fast the machine is.
The timeouts only catch hangs. The SIGKILL comes the same way, from
``checkpointing.TEST_KILL_IN_SAVE_ENV``: right after the trainer started the asynchronous save
of a step, while orbax writes it.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys

import pytest

from ncl_jax import checkpointing
from ncl_jax import errors
from ncl_jax import logging_utils

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL_STEPS = 20
STOP_AFTER = 10  # SIGTERM right after this step (after the first validation, before the second)
TIMEOUT_S = 600  # per command; only a hang gets near it (a run takes ~15-40 s)
OVERRIDES = (
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.eval_every_steps=8",         # validation at 8, 16, 20: best selection resumes too
    "--config.checkpoint_every_steps=7",
    "--config.max_to_keep=1",              # retention (last + best) runs across the resume
    "--config.ncl.queue_size=256",
    "--config.global_batch_size=32",
    "--config.data.num_val_videos=100",
    "--config.data.num_test_videos=100",
)


def _command(workdir):
  return [sys.executable, "-m", "ncl_jax.main", "--config=configs/synthetic.py",
          f"--workdir={workdir}", *OVERRIDES]


def _env(cache_dir):
  """2 fake devices; a persistent compilation cache shared by the runs saves the later compiles."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
             JAX_COMPILATION_CACHE_DIR=str(cache_dir),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  env.pop("XLA_FLAGS", None)
  return env


def _start(workdir, sigterm_after=None, sigkill_in_save=None):
  cache_dir = pathlib.Path(workdir).parent / "jax_cache"
  env = _env(cache_dir)
  env.pop(checkpointing.TEST_SIGTERM_ENV, None)
  env.pop(checkpointing.TEST_KILL_IN_SAVE_ENV, None)
  if sigterm_after is not None:
    env[checkpointing.TEST_SIGTERM_ENV] = str(sigterm_after)
  if sigkill_in_save is not None:
    env[checkpointing.TEST_KILL_IN_SAVE_ENV] = str(sigkill_in_save)
  return subprocess.Popen(_command(workdir), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


# Wall-clock rates (steps/s, TFLOP/s, MFU) differ between any two runs: everything else must not.
TIMING_KEYS = frozenset(logging_utils.Throughput(1.0, 1.0).summary())


def _records(workdir):
  """metrics.jsonl without the timing values (read after the run)."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
          for line in path.read_text().splitlines()]


def _results(workdir):
  """results.json without the run's throughput summary."""
  results = json.loads((pathlib.Path(workdir) / "results.json").read_text())
  results.pop("throughput", None)
  return results


def _train_steps(records):
  return [r["step"] for r in records if "loss" in r]


def _checkpoint_steps(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _finish(proc, timeout=TIMEOUT_S):
  output, _ = proc.communicate(timeout=timeout)
  return proc.returncode, output


class _Reference:
  """The uninterrupted run, started once for the module; its outputs are read when first needed."""

  def __init__(self, workdir):
    self.workdir = workdir
    self._proc = _start(workdir)  # runs alongside the first interrupted run
    self._checked = False

  def outputs(self):
    """(metrics.jsonl records, results.json) of the finished run."""
    if not self._checked:
      code, output = _finish(self._proc)
      assert code == 0, output
      assert _train_steps(_records(self.workdir)) == list(range(1, TOTAL_STEPS + 1))
      self._checked = True
    return _records(self.workdir), _results(self.workdir)

  def stop(self):
    if self._proc.poll() is None:
      self._proc.kill()
      self._proc.communicate()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  run = _Reference(tmp_path_factory.mktemp("resume") / "uninterrupted")
  yield run
  run.stop()


def _assert_same_as(reference, workdir):
  expected_records, expected_results = reference.outputs()
  assert _records(workdir) == expected_records  # bit for bit, validation too
  assert _results(workdir) == expected_results
  assert expected_results["step"] == TOTAL_STEPS


@pytest.mark.slow
def test_sigterm_then_rerun_matches_uninterrupted_run(reference):
  # Beside the uninterrupted run, so that both share its compilation cache.
  resumed_dir = reference.workdir.parent / "resumed"
  damaged_dir = reference.workdir.parent / "damaged"
  _interrupted_then_resumed(resumed_dir, damaged_copy=damaged_dir)
  _assert_same_as(reference, resumed_dir)
  _assert_same_as(reference, damaged_dir)


@pytest.mark.slow
def test_sigkill_during_a_save_then_rerun_matches_uninterrupted_run(reference):
  killed_dir = reference.workdir.parent / "killed"
  kill_step = 14  # a periodic save (checkpoint_every_steps=7), between two validations
  first = _start(killed_dir, sigkill_in_save=kill_step)
  code, output = _finish(first)
  assert code == -signal.SIGKILL, output
  assert max(_train_steps(_records(killed_dir))) == kill_step
  # The save never committed: orbax's temporary folder is there, the step is not.
  names = [p.name for p in (killed_dir / "checkpoints").iterdir()]
  assert str(kill_step) not in names, names
  second = _start(killed_dir)
  code, output = _finish(second)
  assert code == 0, output
  assert re.search(r"resumed from step (7|8)\b", output), output
  assert not [n for n in os.listdir(killed_dir / "checkpoints") if "tmp" in n]
  _assert_same_as(reference, killed_dir)


def _damage_latest_checkpoint(workdir):
  """Truncates the largest array file of the newest checkpoint to half; returns its step."""
  step = _checkpoint_steps(workdir)[-1]
  files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)
  return step


def _interrupted_then_resumed(resumed_dir, damaged_copy):
  """Runs until SIGTERM after step STOP_AFTER, checks the stop, then runs the same command again,
  also in ``damaged_copy``: a copy of the stopped run whose newest checkpoint is truncated."""
  first = _start(resumed_dir, sigterm_after=STOP_AFTER)
  try:
    code, output = _finish(first)
  finally:
    if first.poll() is None:
      first.kill()
  assert code == 0, output
  assert f"received signal {int(signal.SIGTERM)}" in output, output
  assert f"stopped by SIGTERM after step {STOP_AFTER}" in output, output
  assert max(_train_steps(_records(resumed_dir))) == STOP_AFTER
  assert not (resumed_dir / "results.json").exists()
  # The forced save holds the step the run stopped at; the log has nothing beyond it.
  assert _checkpoint_steps(resumed_dir)[-1] == STOP_AFTER
  shutil.copytree(resumed_dir, damaged_copy)
  damaged_step = _damage_latest_checkpoint(damaged_copy)
  intact = _checkpoint_steps(damaged_copy)[-2]

  second, repaired = _start(resumed_dir), _start(damaged_copy)
  try:
    code, output = _finish(second)
    repaired_code, repaired_output = _finish(repaired)
  finally:
    for proc in (second, repaired):
      if proc.poll() is None:
        proc.kill()
  assert code == 0, output
  assert re.search(rf"resumed from step {STOP_AFTER}\b", output), output
  assert "received signal" not in output
  assert repaired_code == 0, repaired_output
  damaged = damaged_copy / "checkpoints" / str(damaged_step)
  assert f"checkpoint {damaged} is damaged" in repaired_output, repaired_output
  assert "Traceback" not in repaired_output
  assert re.search(rf"resumed from step {intact}\b", repaired_output), repaired_output
  assert (damaged_copy / checkpointing.DAMAGED_DIR / str(damaged_step)).is_dir()


def test_sigterm_hook_is_off_unless_set_and_fires_after_its_step(monkeypatch):
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  try:
    monkeypatch.delenv(checkpointing.TEST_SIGTERM_ENV, raising=False)
    with checkpointing.PreemptionWatcher() as watcher:
      for step in range(1, 6):
        watcher.after_step(step)
      assert not watcher.should_stop()
    monkeypatch.setenv(checkpointing.TEST_SIGTERM_ENV, "3")
    with checkpointing.PreemptionWatcher() as watcher:
      stops = []
      for step in range(1, 6):
        watcher.after_step(step)
        stops.append(watcher.should_stop())
    assert stops == [False, False, True, True, True]
    assert seen == []  # the watcher's handler took the signal, not the earlier one
    monkeypatch.setenv(checkpointing.TEST_SIGTERM_ENV, "ten")
    with pytest.raises(errors.UserError, match="not a step number"):
      checkpointing.PreemptionWatcher()
  finally:
    signal.signal(signal.SIGTERM, previous)
