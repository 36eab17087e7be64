"""Tests for ncl_jax.checkpointing: round trips, retention, the config guard and SIGTERM."""

import json
import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ncl_jax import checkpointing
from ncl_jax.errors import UserError

CONFIG = {"loss": "ncl", "seed": 0, "total_steps": 10, "log_every_steps": 1,
          "optim": {"lr": 1e-4, "betas": (0.9, 0.98)}, "data": {"seed": 3}}


def _mesh(n):
  return Mesh(np.array(jax.devices()[:n]), ("data",))


def _make_state(mesh, seed=0):
  """A train-state-like pytree: params, AdamW state (NamedTuples), a sharded queue, step, rng."""
  keys = jax.random.split(jax.random.key(seed), 3)
  params = {"dense": {"kernel": jax.random.normal(keys[0], (8, 4)), "bias": jnp.zeros((4,))},
            "scale": jnp.asarray(2.0)}
  tx = optax.adamw(1e-3, b1=0.9, b2=0.98, weight_decay=0.2)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments and count
  replicated = NamedSharding(mesh, P())
  state = {
      "params": params,
      "opt_state": opt_state,
      "queue": jax.random.normal(keys[1], (16, 4)),
      "step": jnp.asarray(7, jnp.int32),
      "rng": jax.random.key_data(keys[2]),
  }
  state = jax.device_put(state, replicated)
  state["queue"] = jax.device_put(state["queue"], NamedSharding(mesh, P("data")))
  return state


def _abstract(state, mesh, queue_spec):
  """eval_shape-style target with explicit shardings (queue: ``queue_spec``; rest replicated)."""
  def leaf(path, x):
    spec = queue_spec if jax.tree_util.keystr(path) == "['queue']" else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))
  return jax.tree_util.tree_map_with_path(leaf, jax.eval_shape(lambda: state))


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_keeps_types_values_and_target_shardings(tmp_path):
  mesh4 = _mesh(4)
  state = _make_state(mesh4)
  extra = {"data_step": 12, "epoch": 1, "note": "x"}
  ckpt = checkpointing.Checkpointer(tmp_path, config=CONFIG)
  assert ckpt.restore_latest(_abstract(state, mesh4, P("data"))) is None
  assert ckpt.save(7, state, extra) is True
  ckpt.close()

  # A fresh Checkpointer (a new process) restores onto a different layout: 2 devices, queue
  # replicated instead of sharded 4 ways.
  ckpt = checkpointing.Checkpointer(tmp_path, config=CONFIG)
  assert ckpt.latest_step == 7
  mesh2 = _mesh(2)
  target = _abstract(state, mesh2, P())
  restored, restored_extra = ckpt.restore_latest(target)
  ckpt.close()
  assert restored_extra == extra
  _assert_trees_equal(restored, state)
  adam = restored["opt_state"][0]
  assert type(adam).__name__ == "ScaleByAdamState"
  assert type(adam) is type(state["opt_state"][0])
  assert int(adam.count) == 1
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
    assert got.sharding == want.sharding
  assert restored["queue"].sharding.spec == P()
  assert len(restored["queue"].sharding.device_set) == 2


def test_restore_with_concrete_arrays_as_target(tmp_path):
  mesh = _mesh(4)
  state = _make_state(mesh, seed=1)
  with checkpointing.Checkpointer(tmp_path, config=CONFIG) as ckpt:
    ckpt.save(3, state, {})
    ckpt.wait()
    zeros = jax.tree.map(jnp.zeros_like, state)
    restored, extra = ckpt.restore(3, zeros)
  assert extra == {}
  _assert_trees_equal(restored, state)
  assert restored["queue"].sharding == state["queue"].sharding


def _tiny_state(value):
  return {"w": jnp.full((3,), float(value)), "step": jnp.asarray(value, jnp.int32)}


def _tiny_abstract():
  return jax.eval_shape(lambda: _tiny_state(0))


@pytest.mark.parametrize("mode, scores, best", [
    ("max", {2: 0.9, 4: 0.5, 6: 0.3}, 2),
    ("min", {2: 0.9, 4: 0.2, 6: 0.3}, 4),
])
def test_keeps_last_n_plus_best(tmp_path, mode, scores, best):
  ckpt = checkpointing.Checkpointer(tmp_path, config=CONFIG, max_to_keep=2, best_metric="r1",
                                    best_mode=mode)
  for step in range(1, 7):
    metrics = {"r1": scores[step], "other": 1.0} if step in scores else None
    assert ckpt.save(step, _tiny_state(step), {"data_step": step}, metrics=metrics)
  ckpt.wait()
  assert ckpt.all_steps == sorted({5, 6, best})
  assert ckpt.latest_step == 6
  assert ckpt.best_step == best
  ckpt.close()

  # Resume: retention and best selection come back from disk; the next save still keeps the best.
  ckpt = checkpointing.Checkpointer(tmp_path, config=CONFIG, max_to_keep=2, best_metric="r1",
                                    best_mode=mode)
  assert ckpt.best_step == best
  state, extra = ckpt.restore_best(_tiny_abstract())
  assert int(state["step"]) == best and extra == {"data_step": best}
  state, extra = ckpt.restore_latest(_tiny_abstract())
  assert int(state["step"]) == 6 and extra == {"data_step": 6}
  ckpt.save(7, _tiny_state(7), {"data_step": 7})
  ckpt.close()
  assert ckpt.all_steps == sorted({6, 7, best})


def test_without_best_metric_keeps_last_n_and_has_no_best(tmp_path):
  with checkpointing.Checkpointer(tmp_path, config=CONFIG, max_to_keep=1) as ckpt:
    for step in (1, 2, 3):
      ckpt.save(step, _tiny_state(step), {}, metrics={"r1": float(step)})
    ckpt.wait()
    assert ckpt.all_steps == [3]
    assert ckpt.best_step is None
    assert ckpt.restore_best(_tiny_abstract()) is None


def test_nan_metric_ranks_worst(tmp_path):
  with checkpointing.Checkpointer(tmp_path, config=CONFIG, max_to_keep=1, best_metric="r1") as ckpt:
    ckpt.save(1, _tiny_state(1), {}, metrics={"r1": 0.1})
    ckpt.save(2, _tiny_state(2), {}, metrics={"r1": float("nan")})
    ckpt.save(3, _tiny_state(3), {})
    ckpt.wait()
    assert ckpt.best_step == 1
    assert ckpt.all_steps == [1, 3]


def test_save_interval_force_and_existing_steps(tmp_path):
  with checkpointing.Checkpointer(tmp_path, config=CONFIG, best_metric="r1",
                                  save_interval_steps=5) as ckpt:
    assert ckpt.save(3, _tiny_state(3), {}) is False
    assert ckpt.save(3, _tiny_state(3), {}, force=True) is True
    assert ckpt.save(5, _tiny_state(5), {}) is True
    assert ckpt.save(5, _tiny_state(99), {}, force=True) is False  # already there: kept as is
    # A periodic save followed by the evaluation of the same step: the metrics are attached.
    assert ckpt.save(5, _tiny_state(5), {"evaluated": True}, metrics={"r1": 0.4}) is True
    ckpt.wait()
    assert ckpt.all_steps == [3, 5]
    assert ckpt.best_step == 5
    state, extra = ckpt.restore(5, _tiny_abstract())
    assert int(state["step"]) == 5 and extra == {"evaluated": True}


def test_bad_extra_and_metrics_are_rejected_before_saving(tmp_path):
  with checkpointing.Checkpointer(tmp_path, config=CONFIG, best_metric="r1") as ckpt:
    with pytest.raises(ValueError, match="JSON"):
      ckpt.save(1, _tiny_state(1), {"it": np.zeros(2)})
    with pytest.raises(ValueError, match="r1"):
      ckpt.save(1, _tiny_state(1), {}, metrics={"R@1": 0.3})
    assert ckpt.all_steps == []


def test_config_json_written_and_resumable_keys_may_change(tmp_path):
  with checkpointing.Checkpointer(tmp_path, config=CONFIG) as ckpt:
    ckpt.save(1, _tiny_state(1), {})
  assert json.loads((tmp_path / "config.json").read_text())["optim"]["betas"] == [0.9, 0.98]
  changed = dict(CONFIG, total_steps=20, log_every_steps=5)
  with checkpointing.Checkpointer(tmp_path, config=changed) as ckpt:
    assert ckpt.latest_step == 1
    assert ckpt.changed_keys == ["log_every_steps", "total_steps"]
    assert not ckpt.replaced_run
  assert json.loads((tmp_path / "config.json").read_text())["total_steps"] == 20


def test_config_mismatch_is_a_user_error_and_overwrite_replaces(tmp_path):
  with checkpointing.Checkpointer(tmp_path, config=CONFIG) as ckpt:
    ckpt.save(1, _tiny_state(1), {})
  other = dict(CONFIG, loss="infonce", optim={"lr": 3e-4, "betas": (0.9, 0.98)})
  with pytest.raises(UserError) as err:
    checkpointing.Checkpointer(tmp_path, config=other, overwrite_hint="--overwrite")
  message = str(err.value)
  assert "loss" in message and "optim.lr" in message and "optim.betas" not in message
  assert '"ncl" -> "infonce"' in message
  assert "--workdir" in message and "--overwrite" in message
  # Nothing was touched.
  assert json.loads((tmp_path / "config.json").read_text())["loss"] == "ncl"
  assert (tmp_path / "checkpoints" / "1").is_dir()

  with checkpointing.Checkpointer(tmp_path, config=other, overwrite=True) as ckpt:
    assert ckpt.replaced_run
    assert ckpt.latest_step is None
  assert json.loads((tmp_path / "config.json").read_text())["loss"] == "infonce"


def test_overwrite_never_deletes_a_run_with_the_same_config(tmp_path):
  with checkpointing.Checkpointer(tmp_path, config=CONFIG) as ckpt:
    ckpt.save(4, _tiny_state(4), {})
  with checkpointing.Checkpointer(tmp_path, config=CONFIG, overwrite=True) as ckpt:
    assert not ckpt.replaced_run
    assert ckpt.latest_step == 4


def test_url_workdir_is_refused():
  with pytest.raises(UserError, match="gcsfuse"):
    checkpointing.Checkpointer("gs://bucket/run", config=CONFIG)


def test_checkpoints_without_config_are_refused(tmp_path):
  with checkpointing.Checkpointer(tmp_path, config=CONFIG) as ckpt:
    ckpt.save(2, _tiny_state(2), {})
  (tmp_path / "config.json").unlink()
  with pytest.raises(UserError, match="holds checkpoints but no config.json"):
    checkpointing.Checkpointer(tmp_path, config=CONFIG)


def test_foreign_logs_or_bad_config_json_are_refused(tmp_path):
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  with pytest.raises(UserError, match="holds metrics.jsonl but no config.json"):
    checkpointing.Checkpointer(tmp_path, config=CONFIG)
  assert not (tmp_path / "config.json").exists()
  (tmp_path / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="not valid JSON"):
    checkpointing.Checkpointer(tmp_path, config=CONFIG)
  with checkpointing.Checkpointer(tmp_path, config=CONFIG, overwrite=True) as ckpt:
    assert ckpt.replaced_run
  assert json.loads((tmp_path / "config.json").read_text()) == json.loads(json.dumps(CONFIG))
  # An empty or unrelated directory is fine.
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  with checkpointing.Checkpointer(other, config=CONFIG) as ckpt:
    assert not ckpt.replaced_run and ckpt.latest_step is None
  assert (other / "notes.txt").read_text() == "mine"


def test_config_differences_ignores_only_resumable_keys():
  old = {"a": {"b": 1, "eval_every_steps": 10}, "total_steps": 5, "c": [1, 2]}
  new = {"a": {"b": 2, "eval_every_steps": 20}, "total_steps": 9, "c": (1, 2), "d": None}
  assert checkpointing.config_differences(old, new) == ["a.b", "d"]
  nan = {"x": float("nan"), "y": np.float32(0.5)}
  assert checkpointing.config_differences(nan, {"x": float("nan"), "y": 0.5}) == []


def test_rewind_jsonl(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": s, "loss": s / 10} for s in (1, 2, 3, 4)] + [{"event": "eval"}]
  path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 5, "lo')
  checkpointing.rewind_jsonl(path, 2)
  assert [json.loads(x) for x in path.read_text().splitlines()] == lines[:2] + lines[4:]
  checkpointing.rewind_jsonl(path, None)
  assert path.read_text() == ""
  checkpointing.rewind_jsonl(tmp_path / "missing.jsonl", 3)
  assert not (tmp_path / "missing.jsonl").exists()


def test_preemption_watcher_sets_flag_on_sigterm_and_restores_handler():
  seen = []
  previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
  try:
    with checkpointing.PreemptionWatcher() as watcher:
      assert not watcher.requested and not watcher.should_stop()
      os.kill(os.getpid(), signal.SIGTERM)
      assert watcher.requested and watcher.should_stop()
      os.kill(os.getpid(), signal.SIGTERM)  # a second signal does not kill the process either
      assert watcher.requested
    assert seen == []
    os.kill(os.getpid(), signal.SIGTERM)  # the earlier handler is back
    assert seen == [signal.SIGTERM]
  finally:
    signal.signal(signal.SIGTERM, previous)
