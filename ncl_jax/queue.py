"""Fixed-capacity ring buffer of past query embeddings for NCL's training-time Sinkhorn.

NCL balances the current batch's candidates against a larger set of queries than one batch
holds: the embeddings of recent training queries, kept in a queue. The queue is a pytree
(:class:`Queue`) with static shapes, so it lives in the train state, passes through ``jax.jit``
and can be sharded like any other array.

Semantics:

* ``enqueue`` writes a batch of ``b`` rows at slots ``pointer, pointer + 1, ...`` modulo the
  capacity (overwriting the oldest entries) and always advances the pointer by ``b``. Rows
  whose ``batch_mask`` is False still occupy their slot but are marked invalid, so the pointer
  never depends on data.
* Slots never written are invalid. Readers use ``valid`` as a mask (see ``queue_contents``).
* Entries are constants: ``enqueue`` stops gradients, as a queue of detached features should.

Because the pointer advance depends only on the static batch size, a queue sharded over
devices (each device holding ``capacity / n_devices`` slots and enqueueing its local batch,
e.g. inside ``shard_map`` with ``embeddings``/``valid`` split along their first axis and
``pointer`` replicated) keeps an identical pointer on every device without communication.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from ncl_jax import errors


class Queue(NamedTuple):
  """A ring buffer of embeddings.

  Attributes:
    embeddings: [capacity, dim] stored embeddings (unwritten slots hold zeros).
    pointer: int32 scalar, the slot the next enqueued row goes to.
    valid: [capacity] bool, True for slots holding a real embedding.
  """

  embeddings: jax.Array
  pointer: jax.Array
  valid: jax.Array


def init_queue(capacity: int, dim: int, dtype=jnp.float32) -> Queue:
  """Returns an empty queue.

  Args:
    capacity: number of slots, at least 1.
    dim: embedding size.
    dtype: storage dtype of the embeddings (float32 or bfloat16, say).

  Returns:
    A :class:`Queue` with zero embeddings [capacity, dim], pointer 0 and no valid entry.
  """
  if int(capacity) < 1:
    errors.fail(f"queue capacity must be at least 1, got {capacity}; "
                "to train without a queue pass no queue to the loss instead")
  if int(dim) < 1:
    errors.fail(f"queue embedding dim must be at least 1, got {dim}")
  return Queue(
      embeddings=jnp.zeros((int(capacity), int(dim)), dtype),
      pointer=jnp.zeros((), jnp.int32),
      valid=jnp.zeros((int(capacity),), bool),
  )


def enqueue(queue: Queue, batch: jax.Array, batch_mask: jax.Array | None = None) -> Queue:
  """Writes ``batch`` into the queue, overwriting the oldest slots.

  Args:
    queue: the current :class:`Queue`.
    batch: [b, dim] embeddings to store (any float dtype; cast to the queue's dtype).
    batch_mask: optional [b] bool; False rows take their slot but are stored as invalid
      (padding rows of a fixed-size batch, say).

  Returns:
    The updated :class:`Queue`; the pointer has advanced by ``b`` modulo the capacity. If
    ``b`` exceeds the capacity only the last ``capacity`` rows are kept, as if the rows had been
    written one at a time.
  """
  capacity, dim = queue.embeddings.shape
  if batch.ndim != 2 or batch.shape[1] != dim:
    errors.fail(f"enqueue expects a batch of shape [b, {dim}], got {batch.shape}")
  b = batch.shape[0]
  mask = jnp.ones((b,), bool) if batch_mask is None else jnp.asarray(batch_mask, bool)
  if mask.shape != (b,):
    errors.fail(f"batch_mask must have shape ({b},), got {mask.shape}")
  batch = jax.lax.stop_gradient(batch).astype(queue.embeddings.dtype)
  skipped = max(0, b - capacity)
  # Rows older than the last `capacity` would be overwritten within this same call; dropping
  # them statically keeps the scatter indices distinct (duplicate scatter order is undefined).
  rows, mask = batch[skipped:], mask[skipped:]
  slots = (queue.pointer + skipped + jnp.arange(rows.shape[0], dtype=jnp.int32)) % capacity
  return Queue(
      embeddings=queue.embeddings.at[slots].set(rows, unique_indices=True),
      pointer=((queue.pointer + b) % capacity).astype(jnp.int32),
      valid=queue.valid.at[slots].set(mask, unique_indices=True),
  )


def queue_contents(queue: Queue) -> tuple[jax.Array, jax.Array]:
  """Returns ``(embeddings [capacity, dim], valid [capacity] bool)`` for masked use."""
  return queue.embeddings, queue.valid


def queue_size(queue: Queue) -> jax.Array:
  """int32 scalar: number of valid entries."""
  return jnp.sum(queue.valid).astype(jnp.int32)
