"""Training on prepared frames with Grain worker processes: a run stopped and resumed sees the
batches of an uninterrupted run, whatever the number of worker processes.

The dummy MSR-VTT videos are prepared at 16 px; a one-block ViT reads 4 frames per clip. The
stop is deterministic: the preemption watcher reports SIGTERM after step 2 (the real signal path
is covered by tests/test_resume.py).
"""

import contextlib

import jax
import pytest
from jax.experimental.compilation_cache import compilation_cache

from ncl_jax import checkpointing, train
from ncl_jax.data import prepare

import train_testutils as tu
from data_testutils import DUMMY, SIZE, write_dummy_videos

TOTAL_STEPS = 4


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  return write_dummy_videos(tmp_path_factory.mktemp("videos"))


def _frames_config(data_dir, num_workers):
  config = tu.load_config("msrvtt")
  config.clip_dir = ""
  config.data.update(dict(data_dir=str(data_dir), image_size=SIZE, max_frames=4, max_words=8,
                          num_workers=num_workers, prefetch=2, augment=True))
  model = config.model
  model.max_frames, model.embed_dim = 4, 16
  model.vision.update(dict(width=16, layers=1, heads=2, patch_size=8, image_size=SIZE))
  model.text.update(dict(width=16, layers=1, heads=2, context_length=8))
  config.update(dict(global_batch_size=4, total_steps=TOTAL_STEPS, eval_every_steps=2,
                     checkpoint_every_steps=0, max_to_keep=1))
  config.ncl.queue_size = 8
  config.eval.batch_size = 8
  return config


def _stop_after(monkeypatch, steps):
  calls = {"n": 0}

  def should_stop(self, step=None):
    calls["n"] += 1
    return calls["n"] == steps

  monkeypatch.setattr(checkpointing.PreemptionWatcher, "should_stop", should_stop)


@contextlib.contextmanager
def _shared_compilation_cache(directory):
  """The three runs compile the same programs: a persistent cache compiles them once."""
  keys = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
          "jax_persistent_cache_min_entry_size_bytes")
  previous = {k: getattr(jax.config, k) for k in keys}
  for key, value in zip(keys, (str(directory), 0, 0)):
    jax.config.update(key, value)
  compilation_cache.reset_cache()
  try:
    yield
  finally:
    for key, value in previous.items():
      jax.config.update(key, value)
    compilation_cache.reset_cache()


@pytest.mark.slow
def test_resumed_run_with_two_workers_matches_an_uninterrupted_in_process_run(
    videos, tmp_path, monkeypatch, capsys):
  argv = ["msrvtt", "--manual_dir", str(DUMMY / "msrvtt"), "--data_dir", str(tmp_path / "data"),
          "--image_size", str(SIZE), "--videos_dir", videos["msrvtt"][0]]
  assert prepare.main(argv) == 0
  capsys.readouterr()
  with tu.fast_compile(), _shared_compilation_cache(tmp_path / "jax_cache"):
    reference = tmp_path / "in_process"
    train.train_and_evaluate(_frames_config(tmp_path / "data", 0), str(reference))
    resumed = tmp_path / "two_workers"
    with monkeypatch.context() as patch:
      _stop_after(patch, 2)
      assert train.train_and_evaluate(_frames_config(tmp_path / "data", 2), str(resumed)) is None
    assert "stopped by SIGTERM after step 2" in capsys.readouterr().out
    train.train_and_evaluate(_frames_config(tmp_path / "data", 2), str(resumed))
  assert "resumed from step 2" in capsys.readouterr().out
  expected, got = tu.deterministic_logs(reference), tu.deterministic_logs(resumed)
  assert got[0] == expected[0]   # every logged value of every step, bit for bit
  assert got[1] == expected[1]
  assert expected[1]["step"] == TOTAL_STEPS
