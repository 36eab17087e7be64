"""Checkpoint faults: damaged checkpoints are set aside on resume, and a full disk is one error line.

A damaged newest checkpoint (a truncated array file, an empty ``state/_METADATA`` or data-iterator
file) makes :meth:`Checkpointer.restore_latest` warn, move it to ``damaged_checkpoints/`` and
restore the newest intact one, data-iterator position included. A full disk stops a save with one
:class:`UserError` that names the disk, the space needed and the last good checkpoint, which stays
intact, and leaves no half-written step. The disk is a real 4 MiB tmpfs where this process may
mount one (root), else its free space is simulated. End-to-end resume equality after damage and
after ``kill -9`` in a save is in test_resume.py.
"""

import asyncio
import collections
import contextlib
import gc
import logging
import os
import shutil
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest

from ncl_jax import checkpointing, runs
from ncl_jax.checkpointing import Checkpointer
from ncl_jax.data.pipeline import ArraySplit, TrainIterator
from ncl_jax.errors import UserError

CONFIG = {"seed": 5}
# orbax leaves the coroutine of a failed read (the truncated array file) to the garbage
# collector, which reports it as an unraisable exception; the tests collect it themselves.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _split():
  tokens = np.arange(40, dtype=np.int32)[:, None] * np.ones((1, 4), np.int32)
  return ArraySplit(text_tokens=tokens, video_array=np.zeros((20, 3, 2), np.float32),
                    frame_mask=np.ones((20, 3), bool),
                    caption_to_video=np.repeat(np.arange(20, dtype=np.int32), 2))


def _state(step):
  return {"w": jnp.arange(5000, dtype=jnp.float32) + step, "step": jnp.asarray(step, jnp.int32)}


def _first_ids(batch):
  return batch["text_tokens"][:, 0].tolist()


def _save_three(workdir):
  """Checkpoints of steps 1-3, each after one batch; returns the batches the run would see next."""
  it = TrainIterator(_split(), 8, seed=5)
  with Checkpointer(workdir, config=CONFIG, max_to_keep=3) as ckpt:
    for step in (1, 2, 3):
      next(it)
      ckpt.save(step, _state(step), {"step": step}, data_iterator=it.grain_iterator)
  reference = TrainIterator(_split(), 8, seed=5)
  return [_first_ids(next(reference)) for _ in range(4)]


def _truncate_largest_state_file(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file()]
  largest = max(files, key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)


DAMAGE = {
    "truncated state file": (_truncate_largest_state_file, "its train state cannot be read"),
    "empty state/_METADATA": (lambda d: (d / "state" / "_METADATA").write_bytes(b""),
                              "state/_METADATA is empty"),
    "empty data iterator file": (lambda d: (d / "data" / "process_0-of-1.json").write_bytes(b""),
                                 "data/process_0-of-1.json is empty"),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_resume_sets_a_damaged_checkpoint_aside_and_restores_the_newest_intact(
    tmp_path, caplog, damage):
  batches = _save_three(tmp_path)
  damage_fn, problem = DAMAGE[damage]
  damage_fn(tmp_path / "checkpoints" / "3")
  it = TrainIterator(_split(), 8, seed=5)
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, config=CONFIG) as ckpt:
    state, extra = ckpt.restore_latest(_state(0), data_iterator=it.grain_iterator)
    assert int(state["step"]) == 2 and extra == {"step": 2}
    np.testing.assert_array_equal(state["w"], _state(2)["w"])
    assert _first_ids(next(it)) == batches[2]  # the iterator is where step 2 left it
    assert ckpt.all_steps == [1, 2]
    ckpt.save(3, _state(3), {"step": 3})  # the step can be saved again
  warning = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
  assert f"checkpoint {tmp_path / 'checkpoints' / '3'} is damaged ({problem}" in warning
  assert "step 2" in warning
  assert (tmp_path / checkpointing.DAMAGED_DIR / "3" / "state").is_dir()  # kept for inspection
  assert runs.checkpoint_damage(tmp_path / checkpointing.DAMAGED_DIR / "3").startswith(
      problem.split(" (")[0])
  with Checkpointer(tmp_path, config=CONFIG) as ckpt:
    assert int(ckpt.restore_latest(_state(0))[0]["step"]) == 3
  gc.collect()  # the failed read's coroutine goes now, under this module's warning filter


def test_a_target_that_does_not_fit_is_not_mistaken_for_damage(tmp_path):
  _save_three(tmp_path)
  with Checkpointer(tmp_path, config=CONFIG) as ckpt:
    with pytest.raises(Exception) as info:
      ckpt.restore_latest({"w": jnp.zeros(7), "step": jnp.int32(0)})
    assert not isinstance(info.value, UserError)
    assert ckpt.all_steps == [1, 2, 3]
  assert not (tmp_path / checkpointing.DAMAGED_DIR).exists()
  assert runs.checkpoint_damage(tmp_path / "checkpoints" / "3") is None


def test_with_every_checkpoint_damaged_the_run_starts_over(tmp_path, caplog):
  _save_three(tmp_path)
  for step in (1, 2, 3):
    (tmp_path / "checkpoints" / str(step) / "state" / "_METADATA").write_bytes(b"")
  with caplog.at_level(logging.WARNING), Checkpointer(tmp_path, config=CONFIG) as ckpt:
    assert ckpt.restore_latest(_state(0)) is None
  assert "training starts from step 0" in caplog.text
  assert sorted(os.listdir(tmp_path / checkpointing.DAMAGED_DIR)) == ["1", "2", "3"]


# -- a full disk ----------------------------------------------------------------------------------

@contextlib.contextmanager
def _small_disk(path, mib):
  """A real tmpfs of ``mib`` MiB at ``path``, or None where mounting is not allowed."""
  path.mkdir()
  try:
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={mib}m", "tmpfs", str(path)],
                             capture_output=True, check=False).returncode == 0
  except OSError:
    mounted = False
  try:
    yield path if mounted else None
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(path)], check=False)


def _random_state(step, size=250_000):
  """Incompressible: about 1 MiB on disk whatever orbax's compression."""
  values = np.random.default_rng(step).standard_normal(size).astype(np.float32)
  return {"w": jnp.asarray(values), "step": jnp.asarray(step, jnp.int32)}


def _fill(disk, leave_bytes):
  stats = os.statvfs(disk)  # not shutil.disk_usage, which a test blinds
  free = stats.f_bavail * stats.f_frsize
  (disk / "filler").write_bytes(b"\0" * max(free - leave_bytes, 0))


def _assert_full_disk_error(err, disk, step, kept_step, run):
  message = str(err)
  assert f"the disk holding the workdir ({disk}) is full" in message
  assert f"the checkpoint of step {step} needs about" in message and "MiB" in message
  assert (f"the last good checkpoint, step {kept_step} in {run / 'checkpoints' / str(kept_step)}, "
          "is kept intact") in message
  assert "\n" not in message
  names = os.listdir(run / "checkpoints")
  assert names == [str(kept_step)], names  # no half-written step


def _full_disk_round(run, disk, step, expect_free_check):
  """Saves step 1, fills the disk, checks the refusal of ``step``, frees it and saves again."""
  with Checkpointer(run, config=CONFIG, max_to_keep=1) as ckpt:
    ckpt.save(1, _random_state(1), {})
    ckpt.wait()
    _fill(disk, leave_bytes=400_000)
    with pytest.raises(UserError) as info:
      ckpt.save(step, _random_state(step), {})
      ckpt.wait()
    _assert_full_disk_error(info.value, disk, step, 1, run)
    assert ("Free at least" in str(info.value)) == expect_free_check
  os.remove(disk / "filler")
  with Checkpointer(run, config=CONFIG, max_to_keep=1) as ckpt:
    state, _ = ckpt.restore_latest(_random_state(0))
    np.testing.assert_array_equal(state["w"], _random_state(1)["w"])  # intact
    ckpt.save(step, _random_state(step), {})
  assert os.listdir(run / "checkpoints") == [str(step)]


def test_full_tmpfs_is_refused_before_writing_and_keeps_the_last_checkpoint(tmp_path):
  with _small_disk(tmp_path / "disk", 4) as disk:
    if disk is None:
      pytest.skip("mounting a tmpfs needs root; test_simulated_full_disk covers the check")
    _full_disk_round(disk / "run", disk, 2, expect_free_check=True)


def test_disk_filling_up_during_a_save_is_one_error_and_leaves_no_partial_step(
    tmp_path, monkeypatch):
  with _small_disk(tmp_path / "disk", 4) as disk:
    if disk is None:
      pytest.skip("mounting a tmpfs needs root")
    # The free-space check is blinded, so orbax really runs out of space while writing.
    real = shutil.disk_usage
    plenty = collections.namedtuple("usage", "total used free")(1 << 40, 0, 1 << 40)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage",
                        lambda p: plenty if str(p).startswith(str(disk)) else real(p))
    _full_disk_round(disk / "run", disk, 2, expect_free_check=False)


def test_simulated_full_disk_is_refused_before_writing(tmp_path, monkeypatch):
  run = tmp_path / "run"
  with Checkpointer(run, config=CONFIG, max_to_keep=1) as ckpt:
    ckpt.save(1, _random_state(1), {})
    ckpt.wait()
    size = sum(p.stat().st_size for p in (run / "checkpoints" / "1").rglob("*") if p.is_file())
    tight = collections.namedtuple("usage", "total used free")(1 << 30, 0, size // 2)
    monkeypatch.setattr(checkpointing.shutil, "disk_usage", lambda p: tight)
    with pytest.raises(UserError) as info:
      ckpt.save(2, _random_state(2), {})
    mount = checkpointing._mount_point(run)  # pylint: disable=protected-access
    _assert_full_disk_error(info.value, mount, 2, 1, run)
  # Resuming on the same full disk fails at once, before any training step.
  with pytest.raises(UserError, match="is full: .* a checkpoint needs about"):
    Checkpointer(run, config=CONFIG, max_to_keep=1)


def test_abandoned_orbax_reads_are_quiet_and_other_unraisables_are_not(monkeypatch):
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: seen.append(unraisable.object))
  runs.quiet_abandoned_checkpoint_reads()
  runs.quiet_abandoned_checkpoint_reads()  # installs once
  namespace = {}
  exec(compile("async def read():\n  pass\n", f"{os.sep}site{os.sep}orbax{os.sep}io.py", "exec"),
       namespace)
  orbax_read, other = namespace["read"](), _other_coroutine()
  for coroutine in (orbax_read, other):
    sys.unraisablehook(types.SimpleNamespace(object=coroutine, exc_value=OSError("damaged")))
    coroutine.close()
  # TensorStore's report of a read that completed after orbax closed its event loop.
  closed_loop = asyncio.new_event_loop()
  closed_loop.close()
  for error_source in (lambda: closed_loop.call_soon_threadsafe(print),
                       lambda: _raise(RuntimeError("Event loop is closed"))):
    try:
      error_source()
    except RuntimeError as err:
      sys.unraisablehook(types.SimpleNamespace(object=None, exc_value=err))
  assert seen == [other, None]  # the loop's own error is dropped, a look-alike is not


async def _other_coroutine():
  pass


def _raise(error):
  raise error
