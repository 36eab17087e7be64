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
local.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
