"""Data parallelism: the 1-D mesh, host-to-device batches, and 1 device == 4 devices.

The train step must not depend on how many devices share the global batch: a 1-device mesh and
a 4-device mesh (made in the same process from the fake CPU devices) give the same losses and
parameters, and the first step matches a direct, unsharded computation of the loss, its
gradient and the optimiser update.
"""

import jax
import numpy as np
import optax
import pytest
from jax.sharding import AxisType

from ncl_jax import errors
from ncl_jax import sharding
from ncl_jax import train
from ncl_jax.train_state import clamp_logit_scale

import train_testutils as tu


def test_mesh_is_one_dimensional_with_auto_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",)
  assert mesh.devices.size == len(jax.devices()) == 4
  assert mesh.axis_types == (AxisType.Auto,)
  one = sharding.make_mesh(jax.devices()[:1])
  assert one.devices.size == 1


def test_host_batch_is_split_over_devices_in_order():
  mesh = sharding.make_mesh()
  batch = {"x": np.arange(8 * 3).reshape(8, 3).astype(np.float32)}
  out = sharding.host_batch_to_global(batch, mesh)["x"]
  assert out.shape == (8, 3)
  shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start)
  assert [s.data.shape for s in shards] == [(2, 3)] * 4
  np.testing.assert_array_equal(np.concatenate([np.asarray(s.data) for s in shards]), batch["x"])
  np.testing.assert_array_equal(sharding.to_host(out), batch["x"])
  assert sharding.process_slice(8) == slice(0, 8)


def test_sizes_that_do_not_split_over_devices_are_user_errors():
  mesh = sharding.make_mesh()
  with pytest.raises(errors.UserError, match="not divisible by the number of devices"):
    sharding.check_divisible(18, mesh, "config.global_batch_size")
  sharding.check_divisible(16, mesh, "config.global_batch_size")


def _run_steps(config, mesh, batches):
  run = train.Run(config, mesh)
  state = run.initial_state()
  losses, metrics = [], []
  for batch in batches:
    state, m = run.train_step(state, sharding.host_batch_to_global(batch, mesh))
    m = {k: float(v) for k, v in jax.device_get(m).items()}
    losses.append(m["loss"])
    metrics.append(m)
  return run, state, np.asarray(losses), metrics


def _queue_rows(queue):
  """The valid rows of a queue as a set-like sorted array (slot order differs per layout)."""
  emb, valid = sharding.to_host((queue.embeddings, queue.valid))
  rows = np.asarray(emb)[np.asarray(valid)]
  return rows[np.lexsort(rows.T[::-1])]


@pytest.mark.slow
def test_one_and_four_devices_give_the_same_steps():
  config = tu.tiny_config("ncl")
  config.ncl.queue_size = 32  # two global batches: the queue wraps around within 4 steps
  with tu.fast_compile():
    dataset = train.open_dataset(config.data)
    iterator = dataset.train_iterator(config.global_batch_size, seed=0)
    batches = [next(iterator) for _ in range(4)]
    _, state1, losses1, metrics1 = _run_steps(config, sharding.make_mesh(jax.devices()[:1]),
                                              batches)
    _, state4, losses4, metrics4 = _run_steps(config, sharding.make_mesh(), batches)

  assert np.all(np.isfinite(losses1))
  np.testing.assert_allclose(losses4, losses1, rtol=1e-5)
  # The queue fills up: NCL's Sinkhorn sees 16 (batch only), then 32, 48, 48 queries.
  assert [m["num_queries_t2v"] for m in metrics4] == [16, 32, 48, 48]
  assert [m["num_queries_t2v"] for m in metrics1] == [16, 32, 48, 48]
  for a, b in zip(jax.tree.leaves(jax.device_get(state1.params)),
                  jax.tree.leaves(jax.device_get(state4.params))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(_queue_rows(state4.text_queue), _queue_rows(state1.text_queue),
                             atol=1e-5)
  np.testing.assert_allclose(_queue_rows(state4.video_queue), _queue_rows(state1.video_queue),
                             atol=1e-5)
  assert int(state4.step) == int(state1.step) == 4
  # Four devices hold a quarter of the queue each.
  shard_shapes = {s.data.shape for s in state4.text_queue.embeddings.addressable_shards}
  assert shard_shapes == {(8, 16)}


@pytest.mark.slow
def test_sharded_step_matches_a_direct_unsharded_update():
  """Step 2 on 4 devices (after step 1 filled the queue) equals loss, grad and AdamW by hand."""
  config = tu.tiny_config("ncl")
  config.optimizer.warmup_fraction = 0.0  # a non-zero learning rate from the first step
  with tu.fast_compile():
    mesh = sharding.make_mesh()
    run = train.Run(config, mesh)
    iterator = run.dataset.train_iterator(config.global_batch_size, seed=0)
    b1, b2 = next(iterator), next(iterator)
    state = run.initial_state()
    state, _ = run.train_step(state, sharding.host_batch_to_global(b1, mesh))
    before = jax.device_get(state)
    text_queue = jax.tree.map(np.asarray, before.text_queue)
    video_queue = jax.tree.map(np.asarray, before.video_queue)
    new_state, metrics = run.train_step(state, sharding.host_batch_to_global(b2, mesh))

    def direct_loss(params):
      text, video, scale = run.model.apply({"params": params}, b2["text_tokens"], b2["video"],
                                           b2["frame_mask"])
      return run.loss_fn(text, video, scale, text_queue, video_queue)[0]

    @jax.jit
    def direct_update(params, opt_state):
      loss, grads = jax.value_and_grad(direct_loss)(params)
      updates, _ = run.tx.update(grads, opt_state, params)
      return loss, grads, clamp_logit_scale(optax.apply_updates(params, updates))

    loss, grads, expected = direct_update(before.params, before.opt_state)

  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
  np.testing.assert_allclose(float(metrics["grad_norm"]), float(optax.tree.norm(grads)),
                             rtol=1e-4)
  for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(jax.device_get(new_state.params))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  changed = [not np.allclose(a, b) for a, b in zip(jax.tree.leaves(before.params),
                                                     jax.tree.leaves(expected))]
  assert any(changed)  # the step really updated the parameters
