"""A run stopped by SIGTERM and started again ends exactly like an uninterrupted run.

Both runs are the real command line (``python -m ncl_jax.main``) in subprocesses on 2 fake CPU
devices, so the test covers the signal handler, the forced save, exit code 0, automatic resume
(train state, queues, RNG, data-iterator position, best-checkpoint bookkeeping) and the rewind
of ``metrics.jsonl``.

The SIGTERM is real (the operating system delivers it to the trainer's handler), but the trainer
raises it itself right after step ``STOP_AFTER`` through the test-only hook
``checkpointing.TEST_SIGTERM_ENV``, so the stop step does not depend on how fast the machine is.
The timeouts only catch hangs.
"""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

import pytest

from ncl_jax import checkpointing
from ncl_jax import errors

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


def _start(workdir, sigterm_after=None):
  cache_dir = pathlib.Path(workdir).parent / "jax_cache"
  env = _env(cache_dir)
  env.pop(checkpointing.TEST_SIGTERM_ENV, None)
  if sigterm_after is not None:
    env[checkpointing.TEST_SIGTERM_ENV] = str(sigterm_after)
  return subprocess.Popen(_command(workdir), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _records(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  return [json.loads(line) for line in path.read_text().splitlines()]  # read after the run


def _train_steps(records):
  return [r["step"] for r in records if "loss" in r]


def _checkpoint_steps(workdir):
  directory = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _finish(proc, timeout=TIMEOUT_S):
  output, _ = proc.communicate(timeout=timeout)
  return proc.returncode, output


@pytest.mark.slow
def test_sigterm_then_rerun_matches_uninterrupted_run(tmp_path):
  reference_dir, resumed_dir = tmp_path / "uninterrupted", tmp_path / "resumed"
  reference = _start(reference_dir)  # runs alongside the first half of the interrupted run
  try:
    _interrupted_then_resumed(resumed_dir)
    code, output = _finish(reference)
  finally:
    if reference.poll() is None:
      reference.kill()
  assert code == 0, output
  expected, got = _records(reference_dir), _records(resumed_dir)
  assert _train_steps(expected) == list(range(1, TOTAL_STEPS + 1))
  assert got == expected  # every logged value, bit for bit, including the validation metrics
  expected_results = json.loads((reference_dir / "results.json").read_text())
  assert json.loads((resumed_dir / "results.json").read_text()) == expected_results
  assert expected_results["step"] == TOTAL_STEPS


def _interrupted_then_resumed(resumed_dir):
  """Runs until SIGTERM after step STOP_AFTER, checks the stop, then runs the same command again."""
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

  second = _start(resumed_dir)
  try:
    code, output = _finish(second)
  finally:
    if second.poll() is None:
      second.kill()
  assert code == 0, output
  assert re.search(rf"resumed from step {STOP_AFTER}\b", output), output
  assert "received signal" not in output


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
