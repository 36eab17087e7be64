"""Guards against training that runs but does not learn NCL: the real train step, checked
against references computed here from the definitions.

Each check is aimed at a bug that leaves the end-to-end learning test (test_train.py) passing
or failing only indirectly:

* the NCL biases enter the loss with the wrong sign, or not at all: the step's loss must equal
  the cross-entropy of ``logits + beta`` with ``beta`` from POT's Sinkhorn (float64) on the
  step's own logits against ``[queue ; batch]``, the package's biases must meet the Sinkhorn
  marginals there, and the loss must be measurably far from InfoNCE and from ``logits - beta``;
* the queue is never updated: after each step the queues hold exactly the embeddings of that
  step's batch (as the parameters before the step encode it), and a full queue joins the
  Sinkhorn queries;
* a tower gets no gradient: with weight decay off, one step moves the parameters of both the
  text and the video tower.

The model is the tiny synthetic-feature demo on the suite's 4 CPU devices (batch 16, queue 32:
full after two steps).
"""

import jax
import numpy as np
import ot
import pytest

from ncl_jax import losses
from ncl_jax import sharding
from ncl_jax import train

import train_testutils as tu

BATCH, QUEUE = 16, 32
# float32 logits and Sinkhorn's stop rule (1e-4 relative L1 marginal error) against float64.
LOSS_TOLERANCE = 2e-3
# The NCL loss must sit this far from InfoNCE and from the sign-flipped loss (measured on this
# config: 0.0X; see the assertions), so that dropping or flipping the biases cannot hide in the
# tolerance above.
MIN_BIAS_EFFECT = 10 * LOSS_TOLERANCE


@pytest.fixture(scope="module")
def steps():
  """Three steps of the real trainer: per step the host batch, the parameters and queues before
  it, its metrics, and the queues after it."""
  # seqTransf gives the video side parameters (the demo's meanP on features has none).
  config = tu.tiny_config("ncl", global_batch_size=BATCH, ncl__queue_size=QUEUE,
                          optimizer__weight_decay=0.0, optimizer__lr=1e-2,
                          model__head="seqTransf", model__head_layers=1, model__head_heads=2)
  with tu.fast_compile():
    run = train.Run(config)
    state = run.initial_state()
    iterator = run.train_iterator(num_workers=0)
    records = []
    for _ in range(3):
      batch = next(iterator)
      before = jax.device_get((state.params, state.text_queue, state.video_queue))
      state, metrics = run.train_step(state, sharding.host_batch_to_global(batch, run.mesh))
      after = jax.device_get((state.text_queue, state.video_queue))
      records.append(dict(batch=batch, params=before[0], queues=before[1:], queues_after=after,
                          metrics={k: float(v) for k, v in jax.device_get(metrics).items()}))
  return run, records


def _embed(run, params, batch):
  """The step's embeddings and logit scale, the way the train step calls the model."""
  text, video, scale = run.model.apply({"params": params}, batch["text_tokens"], batch["video"],
                                       batch["frame_mask"])
  return np.asarray(text, np.float64), np.asarray(video, np.float64), float(scale)


def _pot_biases(logits):
  """Candidate biases from POT's log-domain Sinkhorn (float64): rows of ``softmax(L + beta)``
  sum to 1 and columns to Q / N. With marginals a = 1/Q, b = 1/N and cost -L at reg 1, POT's
  plan is ``diag(u) exp(L) diag(v)``, so ``beta = log v`` (up to a constant)."""
  q, n = logits.shape
  _, log = ot.sinkhorn(np.full(q, 1.0 / q), np.full(n, 1.0 / n), -logits, reg=1.0,
                       method="sinkhorn_log", numItermax=100_000, stopThr=1e-12, log=True)
  return log["log_v"]


def _cross_entropy(logits, biases):
  z = logits + biases[None, :]
  z_max = z.max(axis=1, keepdims=True)
  lse = np.log(np.exp(z - z_max).sum(axis=1)) + z_max[:, 0]
  return float(np.mean(lse - np.diag(z)))


def _queue_rows(queue):
  embeddings, valid = np.asarray(queue.embeddings, np.float64), np.asarray(queue.valid, bool)
  return embeddings[valid]


def _direction(queries, candidates, queue, scale):
  """(step logits [B, B], Sinkhorn logits [Q, B]) of one direction with its queue."""
  bank = np.concatenate([_queue_rows(queue), queries])
  return scale * queries @ candidates.T, scale * bank @ candidates.T


def test_queue_holds_each_steps_batch_and_fills(steps):
  run, records = steps
  for number, record in enumerate(records, start=1):
    text, video, _ = _embed(run, record["params"], record["batch"])
    for emb, queue in zip((text, video), record["queues_after"]):
      stored = _queue_rows(queue)
      assert len(stored) == min(QUEUE, number * BATCH)
      # Every row of this step's batch is in the queue (slot order follows the devices).
      distance = np.abs(stored[None, :, :] - emb[:, None, :]).max(axis=2).min(axis=1)
      assert distance.max() < 1e-5, (number, distance.max())
  third = records[2]["metrics"]
  assert third["num_queries_t2v"] == third["num_queries_v2t"] == QUEUE + BATCH


@pytest.mark.parametrize("direction", ["t2v", "v2t"])
def test_ncl_loss_is_cross_entropy_with_sinkhorn_biases_of_the_full_queue(steps, direction):
  run, records = steps
  record = records[2]  # the queues were filled by steps 1 and 2
  text, video, scale = _embed(run, record["params"], record["batch"])
  queries, candidates, queue = ((text, video, record["queues"][0]) if direction == "t2v"
                                else (video, text, record["queues"][1]))
  assert len(_queue_rows(queue)) == QUEUE
  logits, sinkhorn_logits = _direction(queries, candidates, queue, scale)

  # The package's biases meet the marginals on these logits (rows 1, columns Q / N) ...
  biases = np.asarray(losses.ncl_candidate_biases(
      np.concatenate([_queue_rows(queue), queries]).astype(np.float32),
      candidates.astype(np.float32), scale, tol=1e-6), np.float64)
  plan = np.exp(sinkhorn_logits + biases - np.log(
      np.exp(sinkhorn_logits + biases).sum(axis=1, keepdims=True)))
  q, n = sinkhorn_logits.shape
  np.testing.assert_allclose(plan.sum(axis=0), q / n, rtol=1e-3)
  # ... and equal POT's up to the free constant.
  reference = _pot_biases(sinkhorn_logits)
  np.testing.assert_allclose(biases - biases.mean(), reference - reference.mean(), atol=1e-3)

  # The step's loss is the cross-entropy with those biases added, not subtracted or dropped.
  want = _cross_entropy(logits, reference)
  got = record["metrics"][f"loss_{direction}"]
  assert got == pytest.approx(want, abs=LOSS_TOLERANCE), (got, want)
  assert abs(want - _cross_entropy(logits, -reference)) > MIN_BIAS_EFFECT
  assert abs(want - _cross_entropy(logits, np.zeros_like(reference))) > MIN_BIAS_EFFECT
  assert abs(record["metrics"]["loss"] - record["metrics"]["infonce"]) > MIN_BIAS_EFFECT / 2


def _tower_change(before, after, tower):
  """Largest absolute change of the text tower's leaves (tower "text") or of every other
  trained leaf (tower "video": the head here), and their number."""
  changes = []
  for path, old in jax.tree_util.tree_leaves_with_path(before):
    top = str(getattr(path[0], "key", path[0]))
    if top == "logit_scale" or (top == "text") != (tower == "text"):
      continue
    new = after
    for key in path:
      new = new[getattr(key, "key", key)]
    changes.append(float(np.abs(np.asarray(new) - np.asarray(old)).max()))
  return max(changes), len(changes)


@pytest.mark.parametrize("tower", ["text", "video"])
def test_both_towers_receive_gradients(steps, tower):
  """With weight decay off, Adam moves a parameter only where its gradient is not zero (step 2:
  the warmup's learning rate is 0 at step 1)."""
  _, records = steps
  change, leaves = _tower_change(records[1]["params"], records[2]["params"], tower)
  assert leaves > 0
  assert change > 1e-4, f"the {tower} tower did not move in a step: no gradient reaches it"
