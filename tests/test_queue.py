"""Tests for the query ring buffer: wrap-around, validity, masking, jit, sharding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ncl_jax import errors
from ncl_jax import queue as queue_lib


class RingModel:
  """Row-at-a-time pure-Python model of the queue: slot i holds the last row written to it."""

  def __init__(self, capacity, dim):
    self.rows = np.zeros((capacity, dim), np.float32)
    self.valid = np.zeros(capacity, bool)
    self.pointer = 0

  def push(self, batch, mask=None):
    mask = np.ones(len(batch), bool) if mask is None else mask
    for row, ok in zip(batch, mask):
      self.rows[self.pointer] = row
      self.valid[self.pointer] = ok
      self.pointer = (self.pointer + 1) % len(self.rows)


def assert_matches(q, model):
  np.testing.assert_array_equal(np.asarray(q.embeddings), model.rows)
  np.testing.assert_array_equal(np.asarray(q.valid), model.valid)
  assert int(q.pointer) == model.pointer
  assert q.pointer.dtype == jnp.int32 and q.pointer.shape == ()


def test_init_is_empty():
  q = queue_lib.init_queue(6, 4, dtype=jnp.bfloat16)
  assert q.embeddings.shape == (6, 4) and q.embeddings.dtype == jnp.bfloat16
  assert not np.any(np.asarray(q.valid))
  assert int(q.pointer) == 0
  assert int(queue_lib.queue_size(q)) == 0


@pytest.mark.parametrize("capacity,batch_sizes", [
    (5, [3, 3, 3, 3]),  # capacity not a multiple of b: wrap inside a batch
    (6, [2, 2, 2, 2]),  # exact multiple
    (3, [5, 1]),  # batch larger than the capacity
    (7, [4, 1, 7, 2]),  # mixed sizes, a full-capacity batch
])
def test_enqueue_matches_ring_model(rng, capacity, batch_sizes):
  dim = 3
  q = queue_lib.init_queue(capacity, dim)
  model = RingModel(capacity, dim)
  push = jax.jit(queue_lib.enqueue)
  for b in batch_sizes:
    batch = rng.normal(size=(b, dim)).astype(np.float32)
    q = push(q, jnp.asarray(batch))
    model.push(batch)
    assert_matches(q, model)
  assert int(queue_lib.queue_size(q)) == model.valid.sum()


def test_validity_grows_until_full(rng):
  q = queue_lib.init_queue(5, 2)
  sizes = []
  for _ in range(3):
    q = queue_lib.enqueue(q, jnp.asarray(rng.normal(size=(2, 2)), jnp.float32))
    sizes.append(int(queue_lib.queue_size(q)))
  assert sizes == [2, 4, 5]
  emb, valid = queue_lib.queue_contents(q)
  assert emb.shape == (5, 2) and valid.dtype == bool and np.all(np.asarray(valid))


def test_batch_mask_marks_rows_invalid_and_still_advances(rng):
  q = queue_lib.init_queue(4, 2)
  model = RingModel(4, 2)
  for mask in ([True, False, True], [False, True, True]):
    batch = rng.normal(size=(3, 2)).astype(np.float32)
    q = queue_lib.enqueue(q, jnp.asarray(batch), jnp.asarray(mask))
    model.push(batch, np.array(mask))
    assert_matches(q, model)
  # Slot 1 was written masked, then overwritten by a valid row; slot 3 holds a masked row.
  np.testing.assert_array_equal(np.asarray(q.valid), [True, True, True, False])


def test_enqueue_casts_and_stops_gradients(rng):
  q = queue_lib.init_queue(4, 3, dtype=jnp.bfloat16)
  batch = jnp.asarray(rng.normal(size=(2, 3)), jnp.float32)
  out = queue_lib.enqueue(q, batch)
  assert out.embeddings.dtype == jnp.bfloat16
  grad = jax.grad(lambda x: jnp.sum(queue_lib.enqueue(q, x).embeddings.astype(jnp.float32)))(batch)
  np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_user_errors():
  with pytest.raises(errors.UserError, match="capacity"):
    queue_lib.init_queue(0, 4)
  q = queue_lib.init_queue(4, 3)
  with pytest.raises(errors.UserError, match=r"\[b, 3\]"):
    queue_lib.enqueue(q, jnp.zeros((2, 5)))
  with pytest.raises(errors.UserError, match="batch_mask"):
    queue_lib.enqueue(q, jnp.zeros((2, 3)), jnp.ones((3,), bool))


def test_per_device_slices_under_shard_map(rng):
  """Each device enqueues its local batch into its own capacity/n slice; the pointer stays
  replicated (the VMA check would reject a device-varying pointer with out_specs P())."""
  n_dev = 4
  mesh = Mesh(np.array(jax.devices()[:n_dev]), ("data",))
  local_capacity, local_b, dim = 3, 2, 2
  q = queue_lib.init_queue(n_dev * local_capacity, dim)
  specs = queue_lib.Queue(P("data"), P(), P("data"))
  step = jax.jit(jax.shard_map(queue_lib.enqueue, mesh=mesh, in_specs=(specs, P("data")),
                               out_specs=specs))
  models = [RingModel(local_capacity, dim) for _ in range(n_dev)]
  for _ in range(3):
    batch = rng.normal(size=(n_dev * local_b, dim)).astype(np.float32)
    q = step(q, jnp.asarray(batch))
    for d, model in enumerate(models):
      model.push(batch[d * local_b:(d + 1) * local_b])
  np.testing.assert_array_equal(np.asarray(q.embeddings), np.concatenate([m.rows for m in models]))
  np.testing.assert_array_equal(np.asarray(q.valid), np.concatenate([m.valid for m in models]))
  assert int(q.pointer) == models[0].pointer
