"""Per-tile math of NCL biases computed from embeddings: single-device functions, no I/O.

NCL's candidate biases ``g`` [n_items] make every gallery item receive its target share ``b``
of a query bank's retrieval probability. With logits ``L_ij = q_i . v_j / T + g_j`` the bias
update needs, per bank query ``i``, the log-normaliser over all items and, per item ``j``, the
column sum ``colsum_j = sum_i exp(L_ij - lse_k L_ik)``. These functions compute both on one
*tile* (a block of bank rows x a block of gallery items) without keeping anything else, so a
bank x gallery matrix of any size is only ever seen one tile at a time.

:func:`column_mass` is the whole computation for a tile that spans every item. A driver that
splits the items over devices (:mod:`ncl_jax.gallery.solve`) runs the same steps with two
collectives in between: the row peak of :func:`row_peak` is combined with a max and the row
totals of :func:`shifted_exp` with a sum across devices, then :func:`weighted_column_sum` stays
local. The sparse functions take each bank query's ``K`` best items instead of a dense tile.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def scores(queries, items, scale, bias, item_valid):
  """Logits of a tile: ``scale * queries @ items.T + bias``, ``-inf`` at padded items.

  Args:
    queries: [r, D] float32 bank rows.
    items: [c, D] float32 gallery rows.
    scale: scalar, ``1 / temperature``.
    bias: [c] float32 current biases of the items.
    item_valid: [c] bool, False for padding items.

  Returns:
    [r, c] float32.
  """
  # Full float32: at the GPU default (TF32) the scores carry ~1e-3 error, i.e. 0.1 logits.
  sims = jnp.matmul(queries, items.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(item_valid[None, :], sims * scale + bias[None, :], -jnp.inf)


def row_peak(logits):
  """Largest logit of each row, [r] (``-inf`` for a row of padding only)."""
  return jnp.max(logits, axis=1)


def shifted_exp(logits, peak):
  """``(exp(logits - peak[:, None]), row totals)``: [r, c] and [r].

  ``peak`` may be a larger value than this tile's own row maximum (the maximum over all
  devices' tiles); a non-finite peak (no valid item anywhere) is treated as 0.
  """
  safe = jnp.where(jnp.isfinite(peak), peak, 0.0)
  e = jnp.exp(logits - safe[:, None])
  return e, jnp.sum(e, axis=1)


def weighted_column_sum(e, row_total, row_valid):
  """``sum_i [row_valid_i] e_ij / row_total_i``, [c]: the tile's share of the column sums.

  Args:
    e: [r, c] from :func:`shifted_exp`.
    row_total: [r] sum of ``e`` over *all* items of each row (across devices).
    row_valid: [r] bool, False for padding rows.
  """
  weights = jnp.where(row_valid, 1.0 / jnp.where(row_total > 0, row_total, 1.0), 0.0)
  return jnp.matmul(weights, e, precision=jax.lax.Precision.HIGHEST)


def column_mass(logits, row_valid):
  """Each item's summed softmax probability over the valid rows of a full-width tile, [c].

  Args:
    logits: [r, c] tile logits from :func:`scores` covering every item.
    row_valid: [r] bool.

  Returns:
    [c] float32; sums to the number of valid rows.
  """
  e, total = shifted_exp(logits, row_peak(logits))
  return weighted_column_sum(e, total, row_valid)


# -- sparse: each bank query's exact top-K items ---------------------------------------------
#
# The sparse problem keeps, for each bank row ``i``, its exact top-K scores and gives every
# omitted item ``j`` the logit ``L_i + g_j``, with one level ``L_i`` per row: the K-th score
# (the *clipped* matrix, never below the true scores) or an estimate from a deeper search
# (:func:`ncl_jax.gallery.solve.omitted_level`). Either way the matrix is dense, so Sinkhorn on
# it is always feasible and every bias stays finite, yet it is stored in O(Nb K): a row's
# omitted items enter only through ``rest_i = sum_{j omitted} exp(g_j)``. The bound on the true
# omitted probability uses only the kept scores and the deeper ranks' scores
# (:class:`ncl_jax.gallery.solve.SparsePlan` sums the plan's columns). These functions use
# float64 numpy: the omitted sums are differences of large sums.


def _omitted_exp_sums(kept_index, bias, n_items: int):
  """``sum_{j not kept by row i} exp(g_j - max g)`` [r] (at least the smallest omitted term)."""
  shifted = np.exp(bias - bias.max())
  kept = shifted[kept_index].sum(axis=1)
  rest = shifted.sum() - kept
  k = kept_index.shape[1]
  return np.maximum(rest, (n_items - k) * shifted.min())


def solved_omitted_probability(kept_scores, kept_index, scale, bias, n_items: int,
                               omitted_level=None):
  """The probability the sparse plan itself puts outside each row's kept items, [r]: row ``i``
  keeps its K scores and gives each omitted item ``j`` the logit ``L_i + g_j``, with
  ``L_i = scale s_iK`` by default (the clipped matrix) or ``omitted_level`` [r]
  (:class:`ncl_jax.gallery.solve.SparsePlan` sums its columns)."""
  scores = np.asarray(kept_scores, np.float64) * scale
  index = np.asarray(kept_index, np.int64)
  g = np.asarray(bias, np.float64) - np.max(bias)
  level = (scores.min(axis=1) if omitted_level is None
           else np.asarray(omitted_level, np.float64))
  kept = scores + g[index]
  peak = kept.max(axis=1)
  kept_lse = peak + np.log(np.exp(kept - peak[:, None]).sum(axis=1))
  return _sigmoid(level + np.log(_omitted_exp_sums(index, g, n_items)) - kept_lse)


def float32_score_error(dim: int) -> float:
  """Bound on the rounding error of a float32 dot product of two unit vectors of ``dim``.

  Recursive summation gives ``|fl(x.y) - x.y| <= dim * u * sum_i |x_i y_i| <= dim * u`` with
  ``u = 2**-24`` (Cauchy-Schwarz bounds the sum by 1); blocked BLAS kernels do no worse.
  """
  return dim * 2.0 ** -24


def omitted_mass_bound(kept_scores, kept_index, scale, bias, n_items, score_error=0.0,
                       tier_scores=None, tier_ranks=(), unscanned_log_mass=None):
  """Upper bound on the probability each row's full softmax puts outside its kept items, [r].

  Every omitted item ``j`` of row ``i`` scores at most the row's lowest kept score ``s_min``
  (the kept items are the exact top-K), so the omitted sum
  ``O_i = sum_{j omitted} exp(scale s_ij + g_j)`` is at most
  ``U_i = exp(scale s_min) sum_{j omitted} exp(g_j)``, and the omitted probability
  ``O_i / (Z_i + O_i)`` (``Z_i`` the kept sum), increasing in ``O_i``, is at most
  ``U_i / (Z_i + U_i) = sigmoid(log U_i - log Z_i)``.

  Tiers tighten ``U_i``: with the scores ``c_1 >= c_2 >= ...`` at deeper ranks ``R_1 < R_2 ...``
  (``R_0 = K``, ``c_0 = s_min``), the omitted items of ranks ``(R_t, R_{t+1}]`` score at most
  ``c_t``. Whichever items those are, their sum is largest when the largest ``exp(g)`` of the
  whole gallery sit in the highest tiers, so ``O_i <= sum_t exp(scale c_t) (P(R_{t+1} - K) -
  P(R_t - K))`` with ``P(n)`` the sum of the ``n`` largest ``exp(g)`` (``R_{last+1} = n_items``).
  The smaller of the two bounds is used. Scores computed in float32 may be off by
  ``score_error`` each way, so the caps are raised and the kept scores lowered by it; sums of
  ``exp(g)`` get a float64 rounding allowance.

  Args:
    kept_scores: [r, K] similarities of each row's exact top-K items.
    kept_index: [r, K] int item ids.
    scale: ``1 / temperature``.
    bias: [n_items] biases.
    n_items: gallery size (K == n_items gives 0).
    score_error: largest error of a stored score (:func:`float32_score_error`).
    tier_scores: optional [r, t] scores at ranks ``tier_ranks`` of each row.
    tier_ranks: [t] increasing 1-based ranks, all above K and at most n_items.
    unscanned_log_mass: optional [r]: when the top-K is exact only within the items a search
      scanned (ivf), ``log`` of a bound on ``sum exp(scale s_ij + g_j - max g)`` over the items
      it did not scan (:func:`ncl_jax.gallery.solve.unscanned_log_mass`); the caps above then
      hold for the scanned items, and this is added.

  Returns:
    [r] float64 bounds in [0, 1].
  """
  kept_scores = np.asarray(kept_scores, np.float64)
  index = np.asarray(kept_index, np.int64)
  g = np.asarray(bias, np.float64) - np.max(bias)
  k = kept_scores.shape[1]
  if n_items == k:
    return np.zeros(kept_scores.shape[0])
  allowance = n_items * 1e-15
  rest = np.minimum(_omitted_exp_sums(index, g, n_items) + allowance, n_items - k)
  caps = kept_scores.min(axis=1, keepdims=True)
  log_omitted = (caps[:, 0] + score_error) * scale + np.log(rest)
  if tier_scores is not None and len(tier_ranks):
    caps = np.concatenate([caps, np.asarray(tier_scores, np.float64)], axis=1)
    # Prefix sums of the largest exp(g): P(n) for n = tier boundaries - K.
    largest = np.cumsum(np.sort(np.exp(g))[::-1])
    bounds = np.concatenate([[k], np.asarray(tier_ranks, np.int64), [n_items]]) - k
    counts = np.diff(np.concatenate([[0.0], largest[bounds[1:] - 1]]))
    shifted = (caps + score_error) * scale
    peak = shifted.max(axis=1, keepdims=True)
    tiered = peak[:, 0] + np.log(np.exp(shifted - peak) @ (counts + allowance))
    log_omitted = np.minimum(log_omitted, tiered)
  if unscanned_log_mass is not None:
    log_omitted = np.logaddexp(log_omitted, np.asarray(unscanned_log_mass, np.float64))
  kept = (kept_scores - score_error) * scale + g[index]
  peak = kept.max(axis=1)
  kept_lse = peak + np.log(np.exp(kept - peak[:, None]).sum(axis=1))
  return _sigmoid(log_omitted - kept_lse)


def _sigmoid(x):
  """``1 / (1 + exp(-x))`` without overflow, with full relative precision for x << 0."""
  e = np.exp(-np.abs(x))
  return np.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
