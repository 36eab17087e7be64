"""Inference-time normalization of retrieval scores, and the normalization error it targets.

All functions take a similarity matrix ``sims`` [n_queries, n_candidates] (rows are queries,
e.g. raw cosine similarities of text queries x videos) and return **normalized logits** of the
same shape: scores on the logit scale (already divided by ``temperature``) whose softmax over
candidates is the method's retrieval distribution, so the normalization error of every method
is measured the same way. For the other direction apply the same function to the transposed
matrix (video queries x text candidates) with a bank of video queries.

Methods (the rows of :data:`REGISTRY`, see :func:`normalize`):

* ``none``: ``sims / temperature``.
* ``ncl`` (NCL's test-time step): candidate biases ``g`` from Sinkhorn on a query bank, so that
  every candidate receives its expected share of the bank's summed retrieval probability;
  scores ``sims / temperature + g``. **Inductive** with a bank of training queries x test
  candidates; **transductive** when the bank is the test queries themselves.
* ``dsl`` (dual softmax, CAMoE): ``L * n_q * softmax_over_queries(L / dsl_temperature)`` with
  ``L = sims / temperature``. **Transductive**: it uses all test queries jointly.
* ``qbnorm`` (QB-Norm's dynamic inverted softmax): candidates that are the top-``k`` of some bank
  query form the activation set; a query whose top-1 candidate is in it gets inverted-softmax
  scores, any other query keeps its raw scores. Written as a gated candidate bias
  ``sims / temperature - gate_i * lse_b(beta * bank_bj) / (beta * temperature)``, which ranks
  every row exactly as QB-Norm's ``beta * s_ij - lse_b(beta * bank_bj)`` does. **Inductive**
  with a training bank, transductive with the test queries as bank.
* ``is`` (inverted softmax, Smith et al. 2017): every query gets QB-Norm's inverted-softmax
  scores, ungated: ``sims / temperature - lse_b(beta * bank_bj) / (beta * temperature)``.
* ``csls`` (cross-domain similarity local scaling, Conneau et al. 2018):
  ``sims / temperature - r_j / (2 * temperature)`` with ``r_j`` the mean similarity of candidate
  ``j``'s ``k`` nearest bank queries; this is ``CSLS / (2 * temperature)`` up to a per-query
  constant. Both are inductive with a training bank, transductive with the test queries.

* ``nnn`` (Nearest Neighbor Normalization, Chowdhury et al. 2024): ``(sims - alpha * r_j) / T``,
  ``r_j`` the mean of candidate ``j``'s ``k`` largest bank similarities.
* ``dn`` (Distribution Normalization, Zhou et al. 2023): ``(sims - lambda * mean_b bank_bj) / T``,
  the query minus ``lambda`` x the bank's mean query, on a similarity matrix.
* ``dualis`` (DBNorm's dual inverted softmax, Wang et al. 2023): the inverted softmax over the
  query bank times one over a *gallery bank* (gallery-side items scored against the candidates).

``ncl``, ``qbnorm``, ``is`` and ``csls`` take a strength ``alpha`` that scales their bias
(``alpha = 1``: the method as published; ``0``: the plain ranking), as NNN's ``alpha`` does, so
every selection grid can choose "no normalization". All but DSL reduce to one bias per
candidate (:class:`Biases`) added to ``sims / temperature``; QB-Norm's is gated per query.

**Inductive is not automatically better.** With a bank of captions whose answers are not in the
gallery (training captions x test videos), a bank about the gallery's size makes the biases
overfit it: on the real MSR-VTT halves split (500-caption bank, 500 videos) every bank method
at full strength loses t2v R@1 (docs/normalization.md). Choose ``alpha`` on a validation split
(``posthoc --select val``), or use a bank many times the gallery (benchmarks/bank_size.py).

Banks of any size are streamed through jitted functions in fixed-size row chunks (pass a
``np.load(..., mmap_mode="r")`` memmap for banks larger than memory; the engine is
:mod:`ncl_jax.streaming`); only [n_candidates] vectors persist between chunks. A small NCL bank
goes through :func:`ncl_jax.sinkhorn.sinkhorn`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from ncl_jax import sinkhorn as sinkhorn_lib
from ncl_jax import streaming
from ncl_jax.streaming import Biases


# Banks up to this many entries are solved in one piece by ncl_jax.sinkhorn.sinkhorn.
DENSE_LIMIT = 1 << 24


@jax.jit
def _chunk_col_lse(block, valid, scale):
  """log Σ_i exp(scale * block_ij) over the valid rows: [m] float32 (-inf without rows)."""
  logits = jnp.where(valid[:, None], block * scale, -jnp.inf)
  peak = jnp.max(logits, axis=0)
  safe = jnp.where(jnp.isfinite(peak), peak, 0.0)
  total = jnp.sum(jnp.exp(logits - safe[None, :]), axis=0)
  return jnp.where(total > 0, jnp.log(jnp.where(total > 0, total, 1.0)) + safe, -jnp.inf)


@functools.partial(jax.jit, static_argnames=("k",))
def _chunk_top_k(block, k):
  return jax.lax.top_k(block, k)[1]


def candidate_mass(scores, *, scale: float = 1.0, bias=None, chunk_rows: int | None = None):
  """Each candidate's retrieval probability summed over the queries.

  Args:
    scores: [n_queries, n_candidates] logits (or similarities with ``scale = 1/temperature``).
    scale: multiplies ``scores`` before the softmax over candidates.
    bias: optional [n_candidates] added after scaling.
    chunk_rows: rows per streamed chunk.

  Returns:
    [n_candidates] float64; sums to n_queries.
  """
  n_rows, n_cols = scores.shape
  rows = streaming.chunk_rows_for(n_rows, n_cols, chunk_rows)
  bias = jnp.zeros(n_cols, jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
  return streaming.streamed_mass(scores, rows, jnp.float32(scale), bias)


def expected_mass(n_queries: int, n_candidates: int, text_to_video=None, *,
                  direction: str = "t2v") -> np.ndarray:
  """Each candidate's ideal summed retrieval probability, [n_candidates] float64.

  One caption per video: ``n_queries / n_candidates`` each. With a caption->video map,
  text-to-video: video ``j`` should attract as many queries as it has captions; video-to-text:
  caption ``c`` should get ``1 / (#captions of its video)`` (its video's unit of mass, shared).
  """
  if text_to_video is None:
    return np.full(n_candidates, n_queries / max(n_candidates, 1), np.float64)
  text_to_video = np.asarray(text_to_video, np.int64)
  if direction == "t2v":
    return np.bincount(text_to_video, minlength=n_candidates).astype(np.float64)
  if direction == "v2t":
    counts = np.bincount(text_to_video, minlength=n_queries).astype(np.float64)
    return 1.0 / counts[text_to_video]
  raise ValueError(f"direction must be 't2v' or 'v2t', got {direction!r}")


def normalization_error(mass, expected, *, bins: int = 50) -> dict:
  """Deviation of each candidate's summed retrieval probability from its expected share.

  Absolute: ``|mass - expected|``, in units of probability mass, so on multi-caption data the
  direction with the larger shares dominates (MSVD t2v shares are ~41, v2t ~0.024). Relative:
  ``|mass / expected - 1|``, unit-free and comparable across directions and data sets (0 for a
  perfectly normalized candidate, 1 for one that gets nothing or twice its share).

  Args:
    mass: [n_candidates] summed retrieval probability (:func:`candidate_mass`).
    expected: [n_candidates] expected share (:func:`expected_mass`), positive.
    bins: histogram bins over ``mass``.

  Returns:
    ``{"mae", "max"}`` (absolute mean and max), ``{"relative_mae", "relative_max"}`` (relative
    mean and max), and ``"histogram": {"counts": [bins], "edges": [bins + 1]}`` of ``mass``.
  """
  mass = np.asarray(mass, np.float64)
  expected = np.broadcast_to(np.asarray(expected, np.float64), mass.shape)
  deviation = np.abs(mass - expected)
  relative = np.abs(mass / expected - 1.0)
  counts, edges = np.histogram(mass, bins=bins)
  return {"mae": float(deviation.mean()), "max": float(deviation.max()),
          "relative_mae": float(relative.mean()), "relative_max": float(relative.max()),
          "histogram": {"counts": counts.tolist(), "edges": edges.tolist()}}


def streamed_ncl_biases(bank, *, temperature: float, col_marginals=None, tol: float = 1e-4,
                        max_iterations: int = 1000, anderson: int = 8,
                        chunk_rows: int | None = None) -> Biases:
  """Sinkhorn candidate biases from a bank of any size, streamed in row chunks.

  With row marginals 1 the row potential is the row log-normaliser, so only the column
  potential is iterated: ``g_j <- log b_j - lse_i(L_ij - lse_k(L_ik + g_k))`` with
  ``L = bank / temperature``. Each iteration is one pass over the bank that accumulates
  ``colsum_j = Σ_i softmax_k(L_i. + g)_j`` (one ``exp`` per entry), then
  ``g <- g + log b - log colsum``, which is the same update. ``colsum`` is also the current
  plan's column sums, so the relative L1 error ``Σ|colsum - b| / Σb`` comes for free.

  Each pass costs a full read of the bank, so the passes are Anderson-accelerated (``anderson``
  previous iterates; 0 gives plain Sinkhorn, iterate for iterate the same as
  :func:`ncl_jax.sinkhorn.sinkhorn`). An extrapolated step that raises the error (or makes a
  column underflow) is undone and replaced by a plain Sinkhorn step, and the stopping rule is
  unchanged, so the answer is a Sinkhorn fixed point to ``tol`` either way.
  On the MSR-VTT 1k-A score matrices in ``../shared/data`` acceleration cut the bias updates to
  ``tol = 1e-4`` from 81 to 22 and from 269 to 33.

  Args:
    bank: [n_bank, n_candidates] similarities (numpy array or memmap).
    temperature: logits are ``bank / temperature``.
    col_marginals: [n_candidates] positive expected shares (rescaled to sum to n_bank);
      default uniform ``n_bank / n_candidates``.
    tol: stop once the relative L1 column error is at most ``tol``.
    max_iterations: cap on passes over the bank.
    anderson: Anderson memory (0 disables acceleration).
    chunk_rows: rows per chunk (default: about 1M entries).

  Returns:
    :class:`Biases` with ``bias = g``; ``iterations`` counts passes over the bank after the
    first (bias updates, including undone extrapolations).
  """
  n_bank, n_cols = bank.shape
  b = streaming.balanced_marginals(col_marginals, n_bank, n_cols)
  rows = streaming.chunk_rows_for(n_bank, n_cols, chunk_rows)
  scale = jnp.float32(1.0 / temperature)
  return streaming.column_fixed_point(
      lambda g: streaming.streamed_mass(bank, rows, scale, jnp.asarray(g, jnp.float32)), b, tol=tol,
      max_iterations=max_iterations, anderson=anderson)


def ncl_biases(bank, *, temperature: float, col_marginals=None, tol: float = 1e-4,
               max_iterations: int = 1000, anderson: int = 8, chunk_rows: int | None = None,
               stream: bool | None = None) -> Biases:
  """NCL candidate biases ``g`` [n_candidates] from a query bank [n_bank, n_candidates].

  Inductive with training queries as the bank, transductive with the test queries. Banks with
  at most 16M entries use :func:`ncl_jax.sinkhorn.sinkhorn` unless ``stream=True``; larger ones
  (or ``stream=True``) use :func:`streamed_ncl_biases` (Anderson-accelerated unless
  ``anderson=0``; then both run the same iteration from ``g = 0``). Either way the result is a
  Sinkhorn fixed point to ``tol``.
  """
  n_bank, n_cols = bank.shape
  if stream is None:
    stream = n_bank * n_cols > DENSE_LIMIT
  if stream:
    return streamed_ncl_biases(bank, temperature=temperature, col_marginals=col_marginals,
                               tol=tol, max_iterations=max_iterations, anderson=anderson,
                               chunk_rows=chunk_rows)
  b = streaming.balanced_marginals(col_marginals, n_bank, n_cols)
  out = sinkhorn_lib.sinkhorn(
      jnp.asarray(np.asarray(bank, np.float32) / np.float32(temperature)),
      col_marginals=jnp.asarray(b, jnp.float32), tol=tol, max_iterations=max_iterations)
  return Biases(np.asarray(out.col_potential, np.float32), int(out.iterations),
                float(out.error))


def qbnorm_biases(bank, *, beta: float = 20.0, k: int = 1, chunk_rows: int | None = None):
  """QB-Norm's bank statistics in one streamed pass.

  Args:
    bank: [n_bank, n_candidates] similarities (cosine scale; QB-Norm's ``beta`` applies to it).
    beta: inverse temperature of the inverted softmax.
    k: a candidate joins the activation set when it is among some bank query's top ``k``.
    chunk_rows: rows per chunk.

  Returns:
    ``(lse, active)``: [n_candidates] float64 ``log Σ_b exp(beta * bank_bj)`` and
    [n_candidates] bool activation set.
  """
  n_bank, n_cols = bank.shape
  if not 1 <= k <= n_cols:
    raise ValueError(f"k must lie in [1, {n_cols}], got {k}")
  rows = streaming.chunk_rows_for(n_bank, n_cols, chunk_rows)
  lse = np.full(n_cols, -np.inf, np.float64)
  active = np.zeros(n_cols, bool)
  for block, valid in streaming.device_chunks(bank, rows):
    lse = np.logaddexp(lse, np.asarray(_chunk_col_lse(block, valid, jnp.float32(beta)),
                                       np.float64))
    top = np.asarray(_chunk_top_k(block, k))[valid]
    active[top.ravel()] = True
  return lse, active


def _rowwise(sims, fn, chunk_rows: int | None = None) -> np.ndarray:
  """``fn(rows, block)`` applied to float32 row blocks of ``sims``, written into one output.

  Keeps temporaries to one chunk, so a 60,000 x 3,000 matrix needs only its input and output.
  """
  n_rows, n_cols = sims.shape
  step = chunk_rows or max(1, (1 << 22) // max(n_cols, 1))
  out = np.empty((n_rows, n_cols), np.float32)
  for start in range(0, n_rows, step):
    rows = slice(start, min(start + step, n_rows))
    out[rows] = fn(rows, np.asarray(sims[rows], np.float32))
  return out


def _as_float32(sims) -> np.ndarray:
  sims = np.asarray(sims, np.float32)
  if sims.ndim != 2:
    raise ValueError(f"sims must be 2-D [n_queries, n_candidates], got shape {sims.shape}")
  return sims


def _check_bank(bank, n_cols: int):
  if bank.ndim != 2 or bank.shape[1] != n_cols:
    raise ValueError(f"bank must be [n_bank, {n_cols}] to match the candidates, got {bank.shape}")


def ncl(sims, bank=None, *, temperature: float, col_marginals=None, tol: float = 1e-4,
        max_iterations: int = 1000, anderson: int = 8, chunk_rows: int | None = None,
        stream: bool | None = None, alpha: float = 1.0) -> tuple[np.ndarray, Biases]:
  """NCL normalized logits ``sims / temperature + alpha * g`` [n_queries, n_candidates].

  Args:
    sims: [n_queries, n_candidates] similarities.
    bank: [n_bank, n_candidates] bank similarities; ``None`` uses ``sims`` (transductive).
    temperature: logit temperature (0.01 for CLIP-style models); used in Sinkhorn too.
    alpha: strength of the biases (1: NCL; 0: the plain ranking), as NNN scales its bias.
    col_marginals, tol, max_iterations, anderson, chunk_rows, stream: see :func:`ncl_biases`.

  Returns:
    ``(logits, biases)``.
  """
  sims = _as_float32(sims)
  bank = sims if bank is None else bank
  _check_bank(bank, sims.shape[1])
  biases = ncl_biases(bank, temperature=temperature, col_marginals=col_marginals, tol=tol,
                      max_iterations=max_iterations, anderson=anderson, chunk_rows=chunk_rows,
                      stream=stream)
  return _biased(sims, np.float32(alpha) * biases.bias, temperature), biases


def dsl(sims, *, temperature: float, dsl_temperature: float = 1.0,
        chunk_rows: int | None = None) -> np.ndarray:
  """Dual softmax (CAMoE) normalized logits [n_queries, n_candidates]; transductive.

  ``L' = L * n_q * softmax_over_queries(L / dsl_temperature)`` with ``L = sims / temperature``
  (CAMoE applies it to logit-scale scores with ``dsl_temperature = 1`` at inference).
  """
  sims = _as_float32(sims)
  n_rows, n_cols = sims.shape
  rows = streaming.chunk_rows_for(n_rows, n_cols, chunk_rows)
  scale = 1.0 / (temperature * dsl_temperature)
  col_lse = np.full(n_cols, -np.inf, np.float64)
  for block, valid in streaming.device_chunks(sims, rows):
    col_lse = np.logaddexp(col_lse, np.asarray(_chunk_col_lse(block, valid, jnp.float32(scale)),
                                               np.float64))
  inv_t, col_lse = np.float32(1.0 / temperature), col_lse.astype(np.float32)

  def rescale(_, block):
    logits = block * inv_t
    prior = np.exp(logits / np.float32(dsl_temperature) - col_lse[None, :])
    return logits * (np.float32(n_rows) * prior)

  return _rowwise(sims, rescale, chunk_rows)


def qbnorm(sims, bank=None, *, temperature: float, beta: float = 20.0, k: int = 1,
           chunk_rows: int | None = None, alpha: float = 1.0) -> np.ndarray:
  """QB-Norm (dynamic inverted softmax) normalized logits [n_queries, n_candidates].

  Args:
    sims: [n_queries, n_candidates] similarities.
    bank: [n_bank, n_candidates] bank similarities; ``None`` uses ``sims`` (transductive).
    temperature: logit temperature of the output scale.
    beta: QB-Norm's inverse temperature on the similarities (default 20).
    k: activation-set size per bank query (default 1).
    chunk_rows: rows per streamed bank chunk.
    alpha: scales the inverted-softmax bias (1: QB-Norm; 0: the plain ranking).

  Returns:
    Normalized logits; at ``alpha = 1`` each row ranks exactly like QB-Norm's scores.
  """
  sims = _as_float32(sims)
  bank = sims if bank is None else bank
  _check_bank(bank, sims.shape[1])
  lse, active = qbnorm_biases(bank, beta=beta, k=k, chunk_rows=chunk_rows)
  # Ties at the top count as one top-1 (argmax's first index), as in QB-Norm's argmax.
  bias = (-alpha * lse / (beta * temperature)).astype(np.float32)
  inv_t = np.float32(1.0 / temperature)

  def rescale(_, block):
    gate = active[np.argmax(block, axis=1)]
    return block * inv_t + np.where(gate[:, None], bias[None, :], np.float32(0))

  return _rowwise(sims, rescale, chunk_rows)


def _biased(sims, bias: np.ndarray, temperature: float) -> np.ndarray:
  """``sims / temperature + bias`` [n_queries, n_candidates] float32, in row chunks."""
  inv_t = np.float32(1.0 / temperature)
  return _rowwise(sims, lambda _, block: block * inv_t + bias[None, :])


def inverted_softmax_biases(bank, *, temperature: float, beta: float | None = None,
                            chunk_rows: int | None = None) -> Biases:
  """Inverted-softmax candidate biases from a query bank, in one streamed pass.

  Smith, Turban, Hamblin & Hammerla, "Offline bilingual word vectors, orthogonal
  transformations and the inverted softmax" (ICLR 2017), eq. 5: the probability of translating
  target ``y`` from source ``x`` is normalised over the *sources*,
  ``P(y -> x) = exp(beta * S_yx) / sum_x' exp(beta * S_yx')``. Here the sources are the bank
  queries and the targets the candidates, so ``log P = beta * s_qj - lse_b(beta * bank_bj)``;
  divided by ``beta * temperature`` it becomes a bias on the model's logit scale with the same
  ranking in every row.

  Args:
    bank: [n_bank, n_candidates] similarities.
    temperature: the model's logit temperature (output scale).
    beta: inverse temperature of the inverted softmax on the similarities; default
      ``1 / temperature`` (then the bias is NCL's Sinkhorn potential after zero iterations).
    chunk_rows: rows per streamed chunk.

  Returns:
    :class:`Biases` with ``bias = -lse_b(beta * bank_bj) / (beta * temperature)`` [n_candidates].
  """
  beta = 1.0 / temperature if beta is None else float(beta)
  if not beta > 0:
    raise ValueError(f"beta must be positive, got {beta}")
  n_bank, n_cols = bank.shape
  rows = streaming.chunk_rows_for(n_bank, n_cols, chunk_rows)
  lse = np.full(n_cols, -np.inf, np.float64)
  for block, valid in streaming.device_chunks(bank, rows):
    lse = np.logaddexp(lse, np.asarray(_chunk_col_lse(block, valid, jnp.float32(beta)),
                                       np.float64))
  return Biases((-lse / (beta * temperature)).astype(np.float32), 0, 0.0)


def inverted_softmax(sims, bank=None, *, temperature: float, beta: float | None = None,
                     chunk_rows: int | None = None, alpha: float = 1.0) -> np.ndarray:
  """Inverted-softmax normalized logits [n_queries, n_candidates] (Smith et al. 2017).

  Args:
    sims: [n_queries, n_candidates] similarities.
    bank: [n_bank, n_candidates] bank similarities; ``None`` uses ``sims`` (transductive).
    temperature, beta, chunk_rows: see :func:`inverted_softmax_biases`.
    alpha: scales the bias (1: the inverted softmax; 0: the plain ranking).

  Returns:
    ``sims / temperature + alpha * bias``; at ``alpha = 1`` each row ranks as
    ``beta * s - lse_b(beta * bank_b)``.
  """
  sims = _as_float32(sims)
  bank = sims if bank is None else bank
  _check_bank(bank, sims.shape[1])
  biases = inverted_softmax_biases(bank, temperature=temperature, beta=beta,
                                   chunk_rows=chunk_rows)
  return _biased(sims, np.float32(alpha) * biases.bias, temperature)


def csls_biases(bank, *, temperature: float, k: int = 10,
                chunk_rows: int | None = None) -> Biases:
  """CSLS candidate biases from a query bank, in one streamed pass.

  Conneau, Lample, Ranzato, Denoyer & Jégou, "Word translation without parallel data" (ICLR
  2018), eq. 6: ``CSLS(x, y) = 2 cos(x, y) - r_T(x) - r_S(y)``, where ``r_S(y)`` is the mean
  cosine of target ``y`` with its ``k`` nearest source neighbours (``k = 10`` in the paper) and
  ``r_T(x)`` the same for the query ``x`` over the targets. Here ``r_S`` is taken over the bank
  queries: ``r_j = mean of the k largest bank_bj``. ``r_T(x)`` is constant within a query's
  row, so it changes neither the ranking nor the row softmax and is dropped; halving the rest
  keeps the similarities on the model's logit scale: ``sims / temperature - r_j / (2T)``.

  Args:
    bank: [n_bank, n_candidates] similarities.
    temperature: the model's logit temperature (output scale).
    k: bank neighbours per candidate, ``1 <= k <= n_bank``.
    chunk_rows: rows per streamed chunk.

  Returns:
    :class:`Biases` with ``bias = -r_j / (2 * temperature)`` [n_candidates].
  """
  r = top_k_mean(bank, k, chunk_rows=chunk_rows)
  return Biases((-r / (2.0 * temperature)).astype(np.float32), 0, 0.0)


def top_k_mean(bank, k: int, *, chunk_rows: int | None = None) -> np.ndarray:
  """Each candidate's mean of its ``k`` largest bank similarities, [n_candidates] float64.

  One streamed pass that keeps each column's ``k`` largest values so far.
  """
  n_bank, n_cols = bank.shape
  if not 1 <= k <= n_bank:
    raise ValueError(f"k must lie in [1, {n_bank}] (the bank's rows), got {k}")
  rows = streaming.chunk_rows_for(n_bank, n_cols, chunk_rows)
  top = np.empty((0, n_cols), np.float32)  # each column's k largest bank scores so far
  for block, valid in streaming.device_chunks(bank, rows):
    top = np.concatenate([top, np.asarray(block)[valid]])
    if top.shape[0] > k:
      top = -np.partition(-top, k - 1, axis=0)[:k]
  return top.astype(np.float64).mean(axis=0)


def column_mean(bank, *, chunk_rows: int | None = None) -> np.ndarray:
  """Each candidate's mean bank similarity, [n_candidates] float64, in one streamed pass."""
  n_bank, n_cols = bank.shape
  rows = streaming.chunk_rows_for(n_bank, n_cols, chunk_rows)
  total = np.zeros(n_cols, np.float64)
  for block, valid in streaming.host_chunks(bank, rows):
    total += block[valid].sum(axis=0, dtype=np.float64)
  return total / max(n_bank, 1)


def nnn(sims, bank=None, *, temperature: float, k: int = 128, alpha: float = 0.75,
        chunk_rows: int | None = None) -> np.ndarray:
  """Nearest Neighbor Normalization logits [n_queries, n_candidates].

  Chowdhury, Wang, Shenoy, Kiela, Schwettmann & Thrush, "Nearest Neighbor Normalization
  Improves Multimodal Retrieval" (EMNLP 2024): ``s'(q, j) = s(q, j) - alpha * r_j`` with
  ``r_j`` the mean of candidate ``j``'s ``k`` largest bank similarities (the paper sweeps
  ``alpha`` 0.25-1.5 and ``k`` 1-512; defaults here are the notes' 0.75 and 128). Returned on
  the model's logit scale: ``(sims - alpha * r_j) / temperature``.

  Args:
    sims: [n_queries, n_candidates] similarities.
    bank: [n_bank, n_candidates] bank similarities; ``None`` uses ``sims`` (transductive).
    temperature: the model's logit temperature.
    k: bank neighbours per candidate, ``1 <= k <= n_bank``.
    alpha: strength (0: the plain ranking).
    chunk_rows: rows per streamed chunk.
  """
  sims = _as_float32(sims)
  bank = sims if bank is None else bank
  _check_bank(bank, sims.shape[1])
  r = top_k_mean(bank, k, chunk_rows=chunk_rows)
  return _biased(sims, (-alpha * r / temperature).astype(np.float32), temperature)


def dn(sims, bank=None, *, temperature: float, strength: float = 0.5,
       chunk_rows: int | None = None) -> np.ndarray:
  """Distribution Normalization logits [n_queries, n_candidates].

  Zhou, Li, Gao, Zhang, Xu, Zhang, Bansal & Zhu (NeurIPS 2023) subtract ``lambda`` times the
  bank queries' mean embedding from the query embedding. On a similarity matrix of dot
  products, ``(q - lambda * mean_b b) . v_j = s(q, j) - lambda * mean_b s(b, j)``: a bias per
  candidate (subtracting a gallery-side mean as well only adds a per-query constant, which
  changes no ranking). Returned on the logit scale: ``(sims - lambda * mean_b bank_bj) / T``.

  Args:
    sims: [n_queries, n_candidates] similarities.
    bank: [n_bank, n_candidates] bank similarities; ``None`` uses ``sims`` (transductive).
    temperature: the model's logit temperature.
    strength: ``lambda`` (the paper's 0.5; the registry's key is ``"lambda"``).
    chunk_rows: rows per streamed chunk.
  """
  sims = _as_float32(sims)
  bank = sims if bank is None else bank
  _check_bank(bank, sims.shape[1])
  mean = column_mean(bank, chunk_rows=chunk_rows)
  return _biased(sims, (-strength * mean / temperature).astype(np.float32), temperature)


def dualis(sims, bank=None, gallery_bank=None, *, temperature: float,
           beta1: float | None = None, beta2: float | None = None,
           chunk_rows: int | None = None) -> np.ndarray:
  """DBNorm's dual inverted softmax logits [n_queries, n_candidates].

  Wang, Jian & Xue, "Balance Act: Mitigating Hubness in Cross-Modal Retrieval with Query and
  Gallery Banks" (EMNLP 2023): the inverted softmax over a query bank times the inverted
  softmax over a gallery bank,
  ``exp(beta1 s_qj) / sum_b exp(beta1 bank_bj) * exp(beta2 s_qj) / sum_g exp(beta2 gbank_gj)``,
  where the gallery bank holds gallery-side items (e.g. training videos for t2v) scored against
  the test candidates (video x video similarities). Its log, divided by
  ``(beta1 + beta2) * temperature``, is a bias per candidate on the model's logit scale:
  ``sims / T - (lse_b(beta1 bank_bj) + lse_g(beta2 gbank_gj)) / ((beta1 + beta2) T)``.

  Args:
    sims: [n_queries, n_candidates] similarities.
    bank: [n_bank, n_candidates] query-bank similarities; ``None`` uses ``sims``.
    gallery_bank: [n_gallery_bank, n_candidates] gallery-bank similarities (required).
    temperature: the model's logit temperature.
    beta1, beta2: inverse temperatures on the similarities (default ``1 / temperature``).
    chunk_rows: rows per streamed chunk.
  """
  sims = _as_float32(sims)
  bank = sims if bank is None else bank
  _check_bank(bank, sims.shape[1])
  if gallery_bank is None:
    raise ValueError("dualis needs a gallery bank: gallery-side items (e.g. training videos for "
                     "text-to-video) scored against the test candidates")
  _check_bank(gallery_bank, sims.shape[1])
  beta1 = 1.0 / temperature if beta1 is None else float(beta1)
  beta2 = 1.0 / temperature if beta2 is None else float(beta2)
  # inverted_softmax_biases gives -lse(beta * bank) / (beta * T); weight each by its beta.
  query_side = inverted_softmax_biases(bank, temperature=temperature, beta=beta1,
                                       chunk_rows=chunk_rows).bias.astype(np.float64)
  gallery_side = inverted_softmax_biases(gallery_bank, temperature=temperature, beta=beta2,
                                         chunk_rows=chunk_rows).bias.astype(np.float64)
  bias = (beta1 * query_side + beta2 * gallery_side) / (beta1 + beta2)
  return _biased(sims, bias.astype(np.float32), temperature)


def csls(sims, bank=None, *, temperature: float, k: int = 10,
         chunk_rows: int | None = None, alpha: float = 1.0) -> np.ndarray:
  """CSLS normalized logits [n_queries, n_candidates] (Conneau et al. 2018).

  Args:
    sims: [n_queries, n_candidates] similarities.
    bank: [n_bank, n_candidates] bank similarities; ``None`` uses ``sims`` (transductive).
    temperature, k, chunk_rows: see :func:`csls_biases`.
    alpha: scales the bias (1: CSLS; 0: the plain ranking).

  Returns:
    ``sims / temperature - r_j / (2 * temperature)``: ``CSLS / (2 * temperature)`` plus
    ``r_T(x) / (2 * temperature)``, a per-query constant.
  """
  sims = _as_float32(sims)
  bank = sims if bank is None else bank
  _check_bank(bank, sims.shape[1])
  biases = csls_biases(bank, temperature=temperature, k=k, chunk_rows=chunk_rows)
  return _biased(sims, np.float32(alpha) * biases.bias, temperature)


# ---------------------------------------------------------------------------------------------
# The registry: one row per method. normalize(), ncl_jax.selection and ncl_jax.posthoc read it,
# so a new normalizer is one function (sims, bank -> logits) plus one row (docs/normalization.md).


@dataclasses.dataclass(frozen=True)
class Knob:
  """One option of a normalizer.

  Attributes:
    name: keyword of :func:`normalize` and key in JSON ``"hyperparameters"``.
    flag: the ``posthoc`` option that sets it (rows may share a flag; it is added once).
    default: value when not given; a callable gets the temperature (e.g. ``1 / T``).
    help: ``posthoc --help`` text.
    check: ``"positive"``, ``"nonnegative"`` or ``"count"`` (an integer >= 1).
    grid: the values selection tries; empty: the option is not selected (e.g. a tolerance).
    at_most: ``"bank"`` or ``"candidates"``: grid values above the pseudo-bank's rows or the
      candidates are skipped (neighbour counts).
    neutral: the value that gives the plain ranking (a strength's 0), or None; validation
      selection keeps that point unless another wins clearly.
  """

  name: str
  flag: str
  default: Any
  help: str
  check: str = "positive"
  grid: tuple = ()
  at_most: str | None = None
  neutral: Any = None

  @property
  def kind(self) -> type:
    return int if self.check == "count" else float

  def value(self, given, temperature: float):
    """``given``, or the default (resolved at ``temperature``) when ``given`` is None."""
    if given is None:
      return self.default(temperature) if callable(self.default) else self.default
    return given

  def problem(self, value) -> str | None:
    """Why ``value`` is not allowed (None if it is)."""
    if value is None:
      return None
    if self.check == "count":
      return None if value >= 1 else f"{self.flag} must be an integer >= 1, got {value}"
    if not np.isfinite(value) or value < 0 or (self.check == "positive" and value == 0):
      what = "a positive number" if self.check == "positive" else "a number >= 0"
      return f"{self.flag} must be {what}, got {value}"
    return None


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """One registry row.

  Attributes:
    name: the method's name (``normalize(..., method=name)``, ``posthoc --method name``).
    apply: ``(sims, bank, *, temperature, col_marginals, **options) -> logits``
      [n_queries, n_candidates]; ``bank`` is None for the test queries (transductive).
    summary: one line for ``posthoc --help``.
    knobs: its options, selectable ones with a grid.
    uses_bank: False for methods that normalize over the test queries only (DSL, none).
    transductive_only: True when no bank can make it inductive (DSL).
    balance: whether the label-free balance criterion measures what it does (False for DSL,
      which rescales logits instead of balancing a distribution).
    gallery_bank: True when ``apply`` also needs ``gallery_bank`` (gallery-side items scored
      against the test candidates, e.g. training videos x test videos for t2v: DualIS).
  """

  name: str
  apply: Callable[..., np.ndarray]
  summary: str
  knobs: tuple[Knob, ...] = ()
  uses_bank: bool = True
  transductive_only: bool = False
  balance: bool = True
  gallery_bank: bool = False

  @property
  def grid(self) -> dict[str, tuple]:
    """Selectable options -> candidate values, in knob order."""
    return {knob.name: knob.grid for knob in self.knobs if knob.grid}


REGISTRY: dict[str, Normalizer] = {}


def register(row: Normalizer) -> Normalizer:
  """Adds ``row`` to :data:`REGISTRY` (by name); returns it."""
  REGISTRY[row.name] = row
  return row


def normalizer(method: str) -> Normalizer:
  """The registry row of ``method``; ValueError for an unknown name."""
  if method not in REGISTRY:
    raise ValueError(f"method must be one of {method_names()}, got {method!r}")
  return REGISTRY[method]


def method_names() -> tuple[str, ...]:
  """Every registered method, in registration order."""
  return tuple(REGISTRY)


def setting(method: str, bank_is_test: bool) -> str:
  """``"inductive"`` or ``"transductive"`` (or ``"none"`` for the identity) for a method/bank."""
  if method == "none":
    return "none"
  if normalizer(method).transductive_only or bank_is_test:
    return "transductive"
  return "inductive"


def _identity(sims, bank=None, *, temperature: float, col_marginals=None) -> np.ndarray:
  del bank, col_marginals
  inv_t = np.float32(1.0 / temperature)
  return _rowwise(_as_float32(sims), lambda _, block: block * inv_t)


def _ncl_logits(sims, bank=None, *, temperature: float, col_marginals=None, **options):
  return ncl(sims, bank, temperature=temperature, col_marginals=col_marginals, **options)[0]


def _without_marginals(function: Callable[..., np.ndarray]) -> Callable[..., np.ndarray]:
  """``function(sims, bank, temperature=..., **options)`` that ignores ``col_marginals``."""

  def apply(sims, bank=None, *, temperature: float, col_marginals=None, **options):
    del col_marginals
    return function(sims, bank, temperature=temperature, **options)

  return apply


def _dsl_logits(sims, bank=None, *, temperature: float, col_marginals=None, **options):
  del bank, col_marginals
  return dsl(sims, temperature=temperature, **options)


_BETAS = (5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0)
# Strength of a bias (0: the plain ranking), so every selection can choose "no normalization".
_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
_STRENGTH_HELP = "strength of the bias; 0 gives the plain ranking"


def _alpha(default: float = 1.0, grid: tuple = _ALPHAS) -> Knob:
  return Knob("alpha", "--alpha", default, _STRENGTH_HELP, check="nonnegative", grid=grid,
              neutral=0.0)


def _dn_logits(sims, bank=None, *, temperature: float, col_marginals=None, chunk_rows=None,
               **options):
  del col_marginals
  return dn(sims, bank, temperature=temperature, strength=options.get("lambda", 0.5),
            chunk_rows=chunk_rows)


def _dualis_logits(sims, bank=None, *, temperature: float, col_marginals=None,
                   gallery_bank=None, **options):
  del col_marginals
  return dualis(sims, bank, gallery_bank, temperature=temperature, **options)


def _inverse_temperature(temperature: float) -> float:
  return 1.0 / temperature


register(Normalizer("none", _identity, "none", uses_bank=False))
register(Normalizer(
    "ncl", _ncl_logits, "ncl (Sinkhorn biases)",
    knobs=(Knob("tol", "--tol", 1e-4, "Sinkhorn tolerance", check="nonnegative"),
           Knob("max_iterations", "--max-iterations", 1000, "iteration cap", check="count"),
           _alpha())))
register(Normalizer(
    "dsl", _dsl_logits, "dsl (dual softmax, transductive)", uses_bank=False,
    transductive_only=True, balance=False,
    knobs=(Knob("dsl_temperature", "--dsl-temperature", 1.0,
                "temperature of the softmax over queries (on the logits)",
                grid=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0)),)))
register(Normalizer(
    "qbnorm", _without_marginals(qbnorm), "qbnorm (dynamic inverted softmax)",
    knobs=(Knob("beta", "--qb-beta", 20.0, "inverse temperature", grid=_BETAS),
           Knob("k", "--qb-k", 1, "activation top-k", check="count", grid=(1, 2, 5),
                at_most="candidates"),
           _alpha())))
register(Normalizer(
    "is", _without_marginals(inverted_softmax), "is (inverted softmax)",
    knobs=(Knob("beta", "--is-beta", _inverse_temperature,
                "inverse temperature of the inverted softmax on the similarities "
                "(default 1/--temperature)", grid=_BETAS),
           _alpha())))
register(Normalizer(
    "csls", _without_marginals(csls), "csls (cross-domain similarity local scaling)",
    knobs=(Knob("k", "--csls-k", 10, "bank neighbours per candidate (default 10, as in the paper)",
                check="count", grid=(1, 2, 5, 10, 20, 50, 100), at_most="bank"),
           _alpha())))
register(Normalizer(
    "nnn", _without_marginals(nnn), "nnn (nearest neighbor normalization)",
    knobs=(Knob("k", "--nnn-k", 128, "bank neighbours per candidate", check="count",
                grid=(1, 8, 32, 128, 512), at_most="bank"),
           _alpha(0.75, (0.0, 0.25, 0.5, 0.75, 1.0, 1.5)))))
register(Normalizer(
    "dn", _dn_logits, "dn (distribution normalization)",
    knobs=(Knob("lambda", "--dn-lambda", 0.5, "weight of the bank's mean query subtracted",
                check="nonnegative", grid=(0.0, 0.25, 0.5, 0.75, 1.0), neutral=0.0),)))
register(Normalizer(
    "dualis", _dualis_logits,
    "dualis (DBNorm's dual inverted softmax; needs --gallery-bank)", gallery_bank=True,
    knobs=(Knob("beta1", "--dualis-beta1", _inverse_temperature,
                "inverse temperature over the query bank (default 1/--temperature)",
                grid=(10.0, 20.0, 50.0, 100.0)),
           Knob("beta2", "--dualis-beta2", _inverse_temperature,
                "inverse temperature over the gallery bank (default 1/--temperature)",
                grid=(10.0, 20.0, 50.0, 100.0)))))


def normalize(sims, method: str, bank=None, *, temperature: float, col_marginals=None,
              gallery_bank=None, **options) -> np.ndarray:
  """Normalized logits of ``method`` (a :data:`REGISTRY` row).

  Args:
    sims: [n_queries, n_candidates] similarities.
    method: one of :func:`method_names` (``none``, ``ncl``, ``dsl``, ``qbnorm``, ``is``,
      ``csls``, and any registered later).
    bank: [n_bank, n_candidates] query bank, or ``None`` for the test queries (transductive).
      Transductive-only methods (``dsl``) only accept ``None``.
    temperature: logit temperature.
    col_marginals: expected candidate shares (e.g. caption counts; NCL reads them).
    gallery_bank: [n_gallery_bank, n_candidates] gallery-side bank for methods whose row needs
      one (``dualis``); others refuse it.
    **options: the method's options (its row's knobs: ``tol``, ``max_iterations``, ``beta``,
      ``k``, ``dsl_temperature``, ...) plus ``chunk_rows`` (and NCL's ``anderson``,
      ``stream``); see each method's function.

  Returns:
    [n_queries, n_candidates] float32 normalized logits.
  """
  row = normalizer(method)
  if temperature <= 0:
    raise ValueError(f"temperature must be positive, got {temperature}")
  if row.transductive_only and bank is not None:
    raise ValueError(f"{method} is transductive: it normalizes over the test queries, not a bank")
  if row.gallery_bank:
    options["gallery_bank"] = gallery_bank
  elif gallery_bank is not None:
    raise ValueError(f"{method} takes no gallery bank")
  return row.apply(sims, bank, temperature=temperature, col_marginals=col_marginals, **options)
