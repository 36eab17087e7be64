"""Multi-process runs: 2 processes x 2 CPU devices on localhost with ``jax.distributed``.

The workers are subprocesses (``jax.distributed.initialize`` can run once per process and needs
its peers). CPU collectives across processes use gloo, jax 0.10's default CPU implementation.

* Checkpoints: a queue sharded over the 4 devices of both processes and replicated params are
  saved by both processes into one checkpoint and restored onto sharded and replicated targets;
  the config guard fails on every process; SIGTERM to one process stops both.
* Training: ``python -m ncl_jax.main`` in 2 processes x 2 devices logs the same losses as one
  process with 4 devices; a SIGTERM to one of the processes stops both at the same step with
  exit code 0, and running the same commands again resumes and finishes like the reference.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2


def _free_port():
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _env(num_devices, cache_dir=None):
  """Fake CPU devices; optionally a persistent compilation cache that later runs reuse."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES=str(num_devices), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  env.pop("XLA_FLAGS", None)
  if cache_dir is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(cache_dir),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return env


def _finish_all(procs, timeout=240):
  """Waits for every process; returns [(returncode, output)]. Kills the rest on failure."""
  results = []
  try:
    for proc in procs:
      output, _ = proc.communicate(timeout=timeout)
      results.append((proc.returncode, output))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  return results


# -- checkpoints across processes (no trainer involved) -------------------------------------------


def _checkpoint_worker(process_id, port, workdir, out_path):
  """Body of one worker process of test_checkpoints_across_processes."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=NUM_PROCESSES, process_id=process_id)
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import Mesh, NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from ncl_jax import checkpointing, errors  # pylint: disable=g-import-not-at-top

  mesh = Mesh(np.array(jax.devices()), ("data",))
  rows = 4  # queue rows per process; each of this process's 2 devices holds 2
  local = np.arange(rows * 3, dtype=np.float32).reshape(rows, 3) + 100 * process_id
  state = {
      "queue": jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local),
      "w": jax.device_put(jnp.arange(3.0), NamedSharding(mesh, P())),
      "step": jax.device_put(jnp.asarray(5, jnp.int32), NamedSharding(mesh, P())),
  }
  report = {}
  ckpt = checkpointing.Checkpointer(workdir, config={"a": 1}, best_metric="r1")
  ckpt.save(5, state, {"data": {"position": 11}}, metrics={"r1": 0.5})
  ckpt.save(6, state, {"data": {"position": 12}})
  ckpt.wait()
  report["steps"] = ckpt.all_steps
  report["best"] = ckpt.best_step

  def target(spec):
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(
        mesh, spec if k == "queue" else P())) for k, v in state.items()}

  restored, extra = ckpt.restore_best(target(P("data")))
  report["extra"] = extra
  report["local_queue"] = np.concatenate(
      [np.asarray(s.data) for s in sorted(restored["queue"].addressable_shards,
                                          key=lambda s: s.index[0].start)]).tolist()
  restored, _ = ckpt.restore_latest(target(P()))  # every device gets the whole queue
  report["replicated_queue"] = np.asarray(restored["queue"].addressable_data(0)).tolist()
  report["w"] = np.asarray(restored["w"].addressable_data(0)).tolist()
  ckpt.close()

  with checkpointing.PreemptionWatcher(sync_every_steps=2) as watcher:
    report["stop_before"] = [watcher.should_stop(), watcher.should_stop()]  # calls 1 and 2
    if process_id == 1:
      os.kill(os.getpid(), signal.SIGTERM)
    report["requested"] = watcher.requested
    report["stop_after"] = [watcher.should_stop(), watcher.should_stop()]  # 3: no collective
    report["stop_at_steps"] = [watcher.should_stop(step=5), watcher.should_stop(step=6)]

  try:
    checkpointing.Checkpointer(workdir, config={"a": 2})
    report["guard"] = None
  except errors.UserError as err:
    report["guard"] = str(err)
  pathlib.Path(out_path).write_text(json.dumps(report))


def test_checkpoints_across_processes(tmp_path):
  port = _free_port()
  procs = [
      subprocess.Popen(
          [sys.executable, __file__, "checkpoint", str(i), str(port), str(tmp_path / "run"),
           str(tmp_path / f"report{i}.json")],
          cwd=REPO, env=_env(DEVICES_PER_PROCESS), stdout=subprocess.PIPE,
          stderr=subprocess.STDOUT, text=True)
      for i in range(NUM_PROCESSES)]
  for code, output in _finish_all(procs, timeout=120):
    assert code == 0, output
  reports = [json.loads((tmp_path / f"report{i}.json").read_text()) for i in range(NUM_PROCESSES)]
  full_queue = np.concatenate([np.arange(12.0).reshape(4, 3) + 100 * i for i in range(2)])
  for i, report in enumerate(reports):
    assert report["steps"] == [5, 6] and report["best"] == 5
    assert report["extra"] == {"data": {"position": 11}}
    np.testing.assert_array_equal(report["local_queue"], full_queue[4 * i: 4 * i + 4])
    np.testing.assert_array_equal(report["replicated_queue"], full_queue)
    assert report["w"] == [0.0, 1.0, 2.0]
    assert report["stop_before"] == [False, False]
    assert report["requested"] is (i == 1)
    assert report["stop_after"] == [False, True]  # process 0 got no signal but stops too
    assert report["stop_at_steps"] == [False, True]
    assert "a: 1 -> 2" in report["guard"]


# -- the real trainer ----------------------------------------------------------------------------

TOTAL_STEPS = 10
STOP_AFTER = 3
OVERRIDES = (
    f"--config.total_steps={TOTAL_STEPS}",
    "--config.eval_every_steps=0",         # one validation, at the end (62 steps per epoch)
    "--config.checkpoint_every_steps=2",
    "--config.ncl.queue_size=256",
    "--config.global_batch_size=32",
    "--config.data.num_val_videos=100",
    "--config.data.num_test_videos=100",
)


def _main(workdir, num_devices, process_id=None, port=None):
  command = [sys.executable, "-m", "ncl_jax.main", "--config=configs/synthetic.py",
             f"--workdir={workdir}", *OVERRIDES]
  if process_id is not None:
    command += [f"--coordinator_address=localhost:{port}", f"--num_processes={NUM_PROCESSES}",
                f"--process_id={process_id}"]
  cache_dir = pathlib.Path(workdir).parent / "jax_cache"
  return subprocess.Popen(command, cwd=REPO, env=_env(num_devices, cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _start_processes(workdir):
  port = _free_port()
  return [_main(workdir, DEVICES_PER_PROCESS, i, port) for i in range(NUM_PROCESSES)]


def _train_records(workdir):
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.is_file():
    return []
  records = []
  for line in path.read_text().splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:  # a line being written right now
      break
    if "loss" in record:
      records.append(record)
  return records


def _run_preempted_then_resumed(workdir):
  """2 processes; SIGTERM to process 1 only; both must stop at one step; then run again."""
  procs = _start_processes(workdir)
  try:
    deadline = time.monotonic() + 180
    while STOP_AFTER not in [r["step"] for r in _train_records(workdir)]:
      for proc in procs:
        assert proc.poll() is None, proc.communicate()[0]
      assert time.monotonic() < deadline, "no training steps logged in 180 s"
      time.sleep(0.02)
    procs[1].send_signal(signal.SIGTERM)
    for code, output in _finish_all(procs):
      assert code == 0, output
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  stopped_at = max(r["step"] for r in _train_records(workdir))
  assert STOP_AFTER <= stopped_at < TOTAL_STEPS, f"SIGTERM came after the loop ({stopped_at})"
  steps = sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                 if p.name.isdigit())
  assert steps[-1] == stopped_at
  assert not (pathlib.Path(workdir) / "results.json").exists()
  results = _finish_all(_start_processes(workdir))
  for code, output in results:
    assert code == 0, output
  assert f"resumed from step {stopped_at}" in results[0][1], results[0][1]  # process 0 logs


@pytest.mark.slow
def test_two_processes_train_like_one_and_resume_after_sigterm(tmp_path):
  reference_dir, multi_dir = tmp_path / "one_process", tmp_path / "two_processes"
  reference = _main(reference_dir, NUM_PROCESSES * DEVICES_PER_PROCESS)
  try:
    _run_preempted_then_resumed(multi_dir)
    [(code, output)] = _finish_all([reference])
  finally:
    if reference.poll() is None:
      reference.kill()
  assert code == 0, output
  expected, got = _train_records(reference_dir), _train_records(multi_dir)
  assert [r["step"] for r in got] == [r["step"] for r in expected] == list(
      range(1, TOTAL_STEPS + 1))
  for want, have in zip(expected, got):
    assert have.keys() == want.keys()
    for key in want:
      np.testing.assert_allclose(float(have[key]), float(want[key]), rtol=1e-5, atol=1e-6,
                                 err_msg=f"step {want['step']} {key}")
  results = [json.loads((d / "results.json").read_text()) for d in (reference_dir, multi_dir)]
  assert results[1]["num_processes"] == NUM_PROCESSES and results[0]["num_processes"] == 1
  assert results[1]["selected_step"] == results[0]["selected_step"]
  for mode in ("plain", "ncl"):
    for direction in ("t2v", "v2t"):
      for metric, value in results[0]["eval"][mode][direction].items():
        np.testing.assert_allclose(results[1]["eval"][mode][direction][metric], value,
                                   rtol=1e-5, err_msg=f"{mode} {direction} {metric}")


if __name__ == "__main__":
  if sys.argv[1] == "checkpoint":
    _checkpoint_worker(int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
  else:
    raise SystemExit(f"unknown worker {sys.argv[1]!r}")
