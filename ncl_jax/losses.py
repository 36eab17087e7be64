"""Training objectives: symmetric InfoNCE (CLIP4Clip), dual softmax (CAMoE) and NCL.

All functions take L2-normalised embeddings and a logit scale ``lambda`` (``= exp(log scale)``,
the inverse temperature). CLIP4Clip learns the log scale and clamps it at ``ln 100`` after every
step; that clamp is the trainer's job, these functions use whatever scale they are given.

Notation: ``T`` [B, D] text embeddings, ``V`` [B, D] video embeddings, pair ``i`` is
``(T_i, V_i)`` (positives on the diagonal), ``S = lambda * T V^T`` [B, B] (rows: texts).

* InfoNCE: ``(CE_rows(S) + CE_rows(S^T)) / 2`` with ``CE_rows(X) = mean_i -log softmax_j(X)_ii``.
* DSL: ``(CE_rows(S * B * softmax_0(S / tau)) + CE_rows(S^T * B * softmax_0(S^T / tau))) / 2``,
  where ``softmax_0`` normalises over the first axis (the other modality's queries) and
  ``tau = 1000`` as in CAMoE's released training loss. The prior is not detached.
* NCL (text to video): queries ``Q = [text queue ; T]`` (masked), Sinkhorn on
  ``lambda_s * Q V^T`` with rows summing to 1 and columns to ``|Q| / B`` gives video biases
  ``beta`` [B]; the loss is ``mean_i -log softmax_j(S_ij + beta_j)`` at ``j = i``. Video to text is
  the same with a video queue, ``S^T`` and text biases. ``lambda_s`` is ``lambda`` unless a
  separate Sinkhorn scale is given. With ``gradient="stop"`` the biases are constants.

The building blocks (:func:`similarity_logits`, :func:`ncl_candidate_biases`,
:func:`biased_cross_entropy`) have single-device semantics and are meant for a per-device loss
too: local query rows against gathered candidates, with biases from gathered queries.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from ncl_jax import errors
from ncl_jax import sinkhorn as sinkhorn_lib
from ncl_jax.queue import Queue

LOSS_NAMES = ("infonce", "dsl", "ncl")
DSL_TEMPERATURE = 1000.0  # CAMoE's training-time prior temperature (applied to logits).

# Signature shared by every loss returned by `loss_fn_by_name`.
LossFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def _check_pair(text_emb: jax.Array, video_emb: jax.Array) -> None:
  if text_emb.ndim != 2 or text_emb.shape != video_emb.shape:
    errors.fail(f"text and video embeddings must both be [B, D] with the same shape, got "
                f"{text_emb.shape} and {video_emb.shape}")


def similarity_logits(query_emb: jax.Array, candidate_emb: jax.Array,
                      logit_scale: jax.Array | float) -> jax.Array:
  """Scaled cosine logits in float32 at full matmul precision.

  Args:
    query_emb: [Q, D] L2-normalised query embeddings.
    candidate_emb: [N, D] L2-normalised candidate embeddings.
    logit_scale: scalar inverse temperature.

  Returns:
    [Q, N] float32 ``logit_scale * query_emb @ candidate_emb.T``. The matmul uses
    ``Precision.HIGHEST`` so that GPUs do not silently drop to TF32, which would perturb the
    Sinkhorn fixed point at logits of ~100.
  """
  sims = jnp.matmul(query_emb.astype(jnp.float32), candidate_emb.astype(jnp.float32).T,
                    precision=jax.lax.Precision.HIGHEST)
  return jnp.asarray(logit_scale, jnp.float32) * sims


def biased_cross_entropy(logits: jax.Array, biases: jax.Array, labels: jax.Array,
                         candidate_mask: jax.Array | None = None) -> jax.Array:
  """Per-query cross-entropy of ``softmax(logits + biases)`` against integer labels.

  Args:
    logits: [b, N] query-to-candidate logits.
    biases: [N] additive candidate biases (zeros give plain cross-entropy).
    labels: [b] int, index of each query's positive candidate.
    candidate_mask: optional [N] bool; False candidates are excluded from the softmax.

  Returns:
    [b] float32 losses ``logsumexp_j(logits_j + biases_j) - (logits + biases)_label``.
  """
  z = logits.astype(jnp.float32) + biases.astype(jnp.float32)[None, :]
  if candidate_mask is not None:
    z = jnp.where(jnp.asarray(candidate_mask, bool)[None, :], z, -jnp.inf)
  positive = jnp.take_along_axis(z, labels.astype(jnp.int32)[:, None], axis=1)[:, 0]
  return jax.nn.logsumexp(z, axis=1) - positive


def infonce_loss(text_emb: jax.Array, video_emb: jax.Array,
                 logit_scale: jax.Array | float) -> jax.Array:
  """CLIP4Clip's symmetric InfoNCE.

  Args:
    text_emb: [B, D] L2-normalised text embeddings.
    video_emb: [B, D] L2-normalised video embeddings; row i is text i's positive.
    logit_scale: scalar, ``exp`` of the (clamped) learned log scale.

  Returns:
    float32 scalar, the mean of the text-to-video and video-to-text cross-entropies.
  """
  _check_pair(text_emb, video_emb)
  logits = similarity_logits(text_emb, video_emb, logit_scale)
  labels = jnp.arange(logits.shape[0])
  zeros = jnp.zeros((logits.shape[1],), jnp.float32)
  t2v = jnp.mean(biased_cross_entropy(logits, zeros, labels))
  v2t = jnp.mean(biased_cross_entropy(logits.T, zeros, labels))
  return 0.5 * (t2v + v2t)


def dual_softmax_logits(logits: jax.Array, temperature: float = DSL_TEMPERATURE) -> jax.Array:
  """CAMoE's dual-softmax reweighting of one retrieval direction.

  Args:
    logits: [Q, N] query-to-candidate logits (rows are the queries of the cross-entropy).
    temperature: prior temperature ``tau`` applied to the logits.

  Returns:
    [Q, N] ``logits * Q * softmax(logits / tau, axis=0)``: each logit is weighted by how
    strongly its candidate prefers this query over the other queries (times Q, so a uniform
    prior leaves the logits unchanged).
  """
  logits = logits.astype(jnp.float32)
  prior = jax.nn.softmax(logits / temperature, axis=0)
  return logits * logits.shape[0] * prior


def dsl_loss(text_emb: jax.Array, video_emb: jax.Array, logit_scale: jax.Array | float, *,
             temperature: float = DSL_TEMPERATURE) -> jax.Array:
  """Symmetric dual softmax loss (CAMoE, training form).

  Args:
    text_emb: [B, D] L2-normalised text embeddings.
    video_emb: [B, D] L2-normalised video embeddings; row i is text i's positive.
    logit_scale: scalar inverse temperature of the logits ``S``.
    temperature: prior temperature ``tau`` (CAMoE trains with 1000 on logits of ~100 cos).

  Returns:
    float32 scalar ``(CE_rows(DS(S)) + CE_rows(DS(S^T))) / 2`` with ``DS`` from
    :func:`dual_softmax_logits`.
  """
  _check_pair(text_emb, video_emb)
  logits = similarity_logits(text_emb, video_emb, logit_scale)
  labels = jnp.arange(logits.shape[0])
  zeros = jnp.zeros((logits.shape[1],), jnp.float32)
  t2v = jnp.mean(biased_cross_entropy(dual_softmax_logits(logits, temperature), zeros, labels))
  v2t = jnp.mean(biased_cross_entropy(dual_softmax_logits(logits.T, temperature), zeros, labels))
  return 0.5 * (t2v + v2t)


def ncl_candidate_sinkhorn(
    query_emb: jax.Array,
    candidate_emb: jax.Array,
    logit_scale: jax.Array | float,
    query_mask: jax.Array | None = None,
    candidate_mask: jax.Array | None = None,
    *,
    tol: float = 1e-4,
    max_iterations: int = 1000,
    check_every: int = 10,
    gradient: str = "stop",
) -> sinkhorn_lib.SinkhornOutput:
  """Sinkhorn balancing of candidates against a set of queries (see ncl_candidate_biases).

  Returns:
    The :class:`ncl_jax.sinkhorn.SinkhornOutput`; ``col_potential`` [N] are the biases,
    ``iterations`` and ``error`` are for logging.
  """
  if gradient not in sinkhorn_lib.GRADIENT_MODES:
    errors.fail(f"NCL gradient mode must be one of {sinkhorn_lib.GRADIENT_MODES}, "
                f"got {gradient!r}")
  if query_emb.ndim != 2 or candidate_emb.ndim != 2 or query_emb.shape[1] != candidate_emb.shape[1]:
    errors.fail(f"queries [Q, D] and candidates [N, D] must share D, got {query_emb.shape} "
                f"and {candidate_emb.shape}")
  logits = similarity_logits(query_emb, candidate_emb, logit_scale)
  return sinkhorn_lib.sinkhorn(
      logits, row_mask=query_mask, col_mask=candidate_mask, tol=tol,
      max_iterations=max_iterations, check_every=check_every, gradient=gradient)


def ncl_candidate_biases(
    query_emb: jax.Array,
    candidate_emb: jax.Array,
    logit_scale: jax.Array | float,
    query_mask: jax.Array | None = None,
    candidate_mask: jax.Array | None = None,
    *,
    tol: float = 1e-4,
    max_iterations: int = 1000,
    check_every: int = 10,
    gradient: str = "stop",
) -> jax.Array:
  """NCL's candidate biases: the Sinkhorn column potential on ``logit_scale * cos``.

  With ``L = logit_scale * query_emb @ candidate_emb.T`` (HIGHEST precision), finds ``beta``
  such that ``P_qn = softmax_n(L_q + beta)_n`` has, over the unmasked queries and candidates,
  column sums ``n_queries / n_candidates`` (every candidate receives its fair share of the
  retrieval probability; rows sum to 1 by construction).

  Args:
    query_emb: [Q, D] L2-normalised query embeddings (queue entries and/or batch queries).
    candidate_emb: [N, D] L2-normalised candidate embeddings.
    logit_scale: scalar inverse temperature of the Sinkhorn logits.
    query_mask: optional [Q] bool, False rows (empty queue slots, padding) are ignored.
    candidate_mask: optional [N] bool, False candidates are ignored (their bias is 0).
    tol: relative L1 marginal error at which the ``"stop"`` mode stops.
    max_iterations: iteration cap (``"stop"``) or exact iteration count (``"unroll"``).
    check_every: iterations between convergence checks (``"stop"``).
    gradient: ``"stop"``: biases are constants for autodiff (while_loop to ``tol``);
      ``"unroll"``: gradients flow through exactly ``max_iterations`` Sinkhorn updates.

  Returns:
    [N] float32 biases, defined up to an additive constant (softmaxes are invariant to it).
    All zeros when no query is unmasked.
  """
  return ncl_candidate_sinkhorn(
      query_emb, candidate_emb, logit_scale, query_mask, candidate_mask, tol=tol,
      max_iterations=max_iterations, check_every=check_every, gradient=gradient).col_potential


def _sinkhorn_queries(batch_emb: jax.Array, queue: Queue | None,
                      include_batch: bool) -> tuple[jax.Array, jax.Array] | None:
  """Stacks [queue entries ; batch] with their mask, or returns None when there is no query."""
  parts, masks = [], []
  if queue is not None:
    if queue.embeddings.ndim != 2 or queue.embeddings.shape[1] != batch_emb.shape[1]:
      errors.fail(f"queue embeddings must be [capacity, {batch_emb.shape[1]}] to match the "
                  f"batch, got {queue.embeddings.shape}")
    parts.append(jax.lax.stop_gradient(queue.embeddings).astype(jnp.float32))
    masks.append(jnp.asarray(queue.valid, bool))
  if include_batch:
    parts.append(batch_emb.astype(jnp.float32))
    masks.append(jnp.ones((batch_emb.shape[0],), bool))
  if not parts:
    return None
  return jnp.concatenate(parts, axis=0), jnp.concatenate(masks, axis=0)


def _ncl_direction(query_emb, candidate_emb, logit_scale, sinkhorn_scale, queue,
                   include_batch, sinkhorn_kwargs):
  """One retrieval direction: (mean loss, Sinkhorn iterations, error, number of queries)."""
  logits = similarity_logits(query_emb, candidate_emb, logit_scale)
  labels = jnp.arange(logits.shape[0])
  queries = _sinkhorn_queries(query_emb, queue, include_batch)
  if queries is None:
    biases = jnp.zeros((candidate_emb.shape[0],), jnp.float32)
    iterations, error, n_queries = jnp.int32(0), jnp.float32(0.0), jnp.int32(0)
  else:
    query_bank, query_mask = queries
    out = ncl_candidate_sinkhorn(query_bank, candidate_emb, sinkhorn_scale, query_mask,
                                 **sinkhorn_kwargs)
    biases, iterations, error = out.col_potential, out.iterations, out.error
    n_queries = jnp.sum(query_mask).astype(jnp.int32)
  loss = jnp.mean(biased_cross_entropy(logits, biases, labels))
  return loss, iterations, error, n_queries


def ncl_loss(
    text_emb: jax.Array,
    video_emb: jax.Array,
    logit_scale: jax.Array | float,
    text_queue: Queue | None = None,
    video_queue: Queue | None = None,
    *,
    use_queue: bool = True,
    include_batch: bool = True,
    sinkhorn_logit_scale: float | None = None,
    tol: float = 1e-4,
    max_iterations: int = 1000,
    check_every: int = 10,
    gradient: str = "stop",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric NCL loss: cross-entropies on logits plus Sinkhorn candidate biases.

  Text to video: biases for the B batch videos come from :func:`ncl_candidate_biases` with the
  queries ``[text_queue (valid entries) ; batch texts]``; the loss is the cross-entropy of
  ``logit_scale * T V^T + biases`` with positives on the diagonal. Video to text uses the
  video queue, the batch videos as queries and the batch texts as candidates. The result is
  the mean of both directions. The queues are read, not updated: the trainer enqueues the
  batch after the loss.

  Args:
    text_emb: [B, D] L2-normalised text embeddings.
    video_emb: [B, D] L2-normalised video embeddings; row i is text i's positive.
    logit_scale: scalar, ``exp`` of the (clamped) learned log scale.
    text_queue: :class:`Queue` of past text embeddings ([C_t, D]) or None.
    video_queue: :class:`Queue` of past video embeddings ([C_v, D]) or None.
    use_queue: False ignores both queues (biases from the batch only).
    include_batch: whether the batch's own queries join the Sinkhorn queries. With no queue
      and ``include_batch=False`` there is no query, the biases are 0 and the loss is InfoNCE.
    sinkhorn_logit_scale: inverse temperature of the Sinkhorn logits; None uses
      ``logit_scale``. The biases are added to the ``logit_scale`` logits unchanged.
    tol, max_iterations, check_every, gradient: Sinkhorn settings, see
      :func:`ncl_candidate_biases`.

  Returns:
    ``(loss, aux)``: float32 scalar loss and a dict of scalars: ``loss_t2v``, ``loss_v2t``,
    ``infonce`` (the plain symmetric InfoNCE, no gradient), ``sinkhorn_iterations_t2v`` /
    ``_v2t``, ``sinkhorn_error_t2v`` / ``_v2t`` (relative L1 marginal error) and
    ``num_queries_t2v`` / ``_v2t`` (unmasked Sinkhorn queries).
  """
  _check_pair(text_emb, video_emb)
  if not use_queue:
    text_queue = video_queue = None
  scale = jnp.asarray(logit_scale, jnp.float32)
  sinkhorn_scale = (scale if sinkhorn_logit_scale is None
                    else jnp.asarray(sinkhorn_logit_scale, jnp.float32))
  kwargs = dict(tol=tol, max_iterations=max_iterations, check_every=check_every,
                gradient=gradient)
  t2v, it_t2v, err_t2v, nq_t2v = _ncl_direction(
      text_emb, video_emb, scale, sinkhorn_scale, text_queue, include_batch, kwargs)
  v2t, it_v2t, err_v2t, nq_v2t = _ncl_direction(
      video_emb, text_emb, scale, sinkhorn_scale, video_queue, include_batch, kwargs)
  aux = {
      "loss_t2v": t2v,
      "loss_v2t": v2t,
      "infonce": jax.lax.stop_gradient(infonce_loss(text_emb, video_emb, scale)),
      "sinkhorn_iterations_t2v": it_t2v,
      "sinkhorn_iterations_v2t": it_v2t,
      "sinkhorn_error_t2v": err_t2v,
      "sinkhorn_error_v2t": err_v2t,
      "num_queries_t2v": nq_t2v,
      "num_queries_v2t": nq_v2t,
  }
  return 0.5 * (t2v + v2t), aux


def _infonce_with_aux(text_emb, video_emb, logit_scale, text_queue=None, video_queue=None):
  del text_queue, video_queue  # Same signature as NCL; InfoNCE has no queue.
  loss = infonce_loss(text_emb, video_emb, logit_scale)
  return loss, {"infonce": jax.lax.stop_gradient(loss)}


def _dsl_with_aux(text_emb, video_emb, logit_scale, text_queue=None, video_queue=None, *,
                  temperature=DSL_TEMPERATURE):
  del text_queue, video_queue  # Same signature as NCL; DSL has no queue.
  loss = dsl_loss(text_emb, video_emb, logit_scale, temperature=temperature)
  aux = {"infonce": jax.lax.stop_gradient(infonce_loss(text_emb, video_emb, logit_scale))}
  return loss, aux


_LOSSES: dict[str, tuple[Callable[..., Any], tuple[str, ...]]] = {
    "infonce": (_infonce_with_aux, ()),
    "dsl": (_dsl_with_aux, ("temperature",)),
    "ncl": (ncl_loss, ("use_queue", "include_batch", "sinkhorn_logit_scale", "tol",
                       "max_iterations", "check_every", "gradient")),
}


def loss_fn_by_name(name: str, **options: Any) -> LossFn:
  """Returns the loss ``fn(text_emb, video_emb, logit_scale, text_queue=None,
  video_queue=None) -> (loss, aux)`` named ``name`` with ``options`` bound.

  Args:
    name: ``"infonce"``, ``"dsl"`` or ``"ncl"``. Only ``"ncl"`` reads the queues.
    **options: keyword options of the loss: ``temperature`` for DSL; ``use_queue``,
      ``include_batch``, ``sinkhorn_logit_scale``, ``tol``, ``max_iterations``,
      ``check_every``, ``gradient`` for NCL (see :func:`ncl_loss`).

  Returns:
    The loss function. Every aux dict holds at least ``infonce`` (no gradient).

  Raises:
    UserError: unknown name or option.
  """
  if name not in _LOSSES:
    errors.fail(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
  fn, allowed = _LOSSES[name]
  unknown = sorted(set(options) - set(allowed))
  if unknown:
    errors.fail(f"loss {name!r} has no option(s) {unknown}; its options are "
                f"{list(allowed) or 'none'}")
  if name == "ncl" and options.get("gradient", "stop") not in sinkhorn_lib.GRADIENT_MODES:
    errors.fail(f"NCL gradient mode must be one of {sinkhorn_lib.GRADIENT_MODES}, "
                f"got {options['gradient']!r}")
  return functools.partial(fn, **options)
