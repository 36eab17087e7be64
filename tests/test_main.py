"""``python -m ncl_jax.main``: every mistake on its command line is one ``error:`` line, exit 2.

Training itself is tested in test_train.py; this module holds the command's bad-input table.
"""

import os
import re
import subprocess
import sys

import pytest

from ncl_jax import main
from ncl_jax.errors import UserError

import train_testutils as tu


def _cli(args, timeout=120):
  env = dict(os.environ)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  return subprocess.run([sys.executable, "-m", "ncl_jax.main", *args], cwd=tu.REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout, check=False)


def _one_error_line(proc):
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  return lines[0]


def test_misspelled_override_is_one_line_naming_the_nearest_keys(tmp_path):
  line = _one_error_line(_cli(["--config=configs/synthetic.py", f"--workdir={tmp_path}",
                               "--config.ncl.queue_sise=8"]))
  assert "queue_sise" in line and "ncl.queue_size" in line
  assert not (tmp_path / "config.json").exists()


def test_missing_config_file_is_one_line(tmp_path):
  line = _one_error_line(_cli(["--config=configs/no_such_config.py", f"--workdir={tmp_path}"]))
  assert "no_such_config.py" in line


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("not a run directory")
  line = _one_error_line(_cli(["--config=configs/synthetic.py", f"--workdir={a_file}"]))
  assert f"--workdir is a file, not a directory" in line
  assert a_file.read_text() == "not a run directory"


def test_workdir_below_a_file_names_that_file(tmp_path):
  a_file = tmp_path / "notes.txt"
  a_file.write_text("")
  with pytest.raises(UserError, match=f"--workdir's parent '{a_file}' is a file"):
    main.check_workdir(str(a_file / "run"))
  main.check_workdir(str(tmp_path / "new" / "run"))  # missing folders are created later


@pytest.mark.slow
def test_full_disk_is_one_line_and_a_rerun_stops_before_training(tmp_path):
  """The synthetic config on a 16 MiB tmpfs (checkpoints of ~6 MiB): the third save cannot fit."""
  disk = tmp_path / "disk"
  disk.mkdir()
  mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)],
                         capture_output=True, check=False)
  if mount.returncode != 0:
    pytest.skip("mounting a tmpfs needs root; test_checkpoint_faults.py simulates a full disk")
  try:
    workdir = disk / "run"
    args = ["--config=configs/synthetic.py", f"--workdir={workdir}", "--config.total_steps=12",
            "--config.checkpoint_every_steps=4", "--config.eval_every_steps=0"]
    first = _cli(args, timeout=600)
    line = _one_error_line_after_progress(first)
    assert re.search(r"^step 12/12 ", first.stdout, re.M), first.stdout  # trained up to the save
    assert f"the disk holding the workdir ({disk}) is full" in line
    assert "the checkpoint of step 12 needs about" in line
    assert f"the last good checkpoint, step 8 in {workdir / 'checkpoints' / '8'}" in line
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]  # nothing half-written
    rerun = _cli(args, timeout=600)
    line = _one_error_line_after_progress(rerun)
    assert "is full" in line and "a checkpoint needs about" in line
    assert not re.search(r"^step \d+/", rerun.stdout, re.M), rerun.stdout  # no training step
  finally:
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _one_error_line_after_progress(proc):
  """The last stderr line of a run that stopped on a user error: no traceback above it."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0], proc.stderr[-3000:]
  return errors[0]
