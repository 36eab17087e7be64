"""Log-space Sinkhorn-Knopp for NCL's instance-wise retrieval biases.

Given logits ``L`` [n_rows, n_cols] (rows: queries, columns: candidates, ``L = s / tau``), find
potentials ``f`` [n_rows] and ``g`` [n_cols] such that

    P = exp(L + f[:, None] + g[None, :])

has row sums ``a`` (default 1: each query's retrieval probabilities sum to one) and column sums
``b`` (default n_rows / n_cols: every candidate receives its fair share of the summed retrieval
probability). ``g`` is NCL's candidate bias: adding it to a query's logits and taking a softmax
over candidates gives the normalized retrieval distribution (``f`` is then just the softmax's
log-normaliser).

Updates alternate in the log domain (max-shifted logsumexp), so logits as large as 1e4
(cosine similarities at temperature 1e-4) neither overflow nor underflow.

Masks: rows and columns that are masked out, or whose logits are all ``-inf`` among the
unmasked entries, are removed from the problem. Their potentials are reported as 0 (finite) and
default marginals count only the remaining rows and columns.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

GRADIENT_MODES = ("stop", "unroll")


class SinkhornOutput(NamedTuple):
  """Result of :func:`sinkhorn`.

  Attributes:
    row_potential: [n_rows] float32, ``f``; 0 for rows removed from the problem.
    col_potential: [n_cols] float32, ``g`` (the candidate biases); 0 for removed columns.
    iterations: int32 scalar, number of full (row + column) updates performed.
    error: float32 scalar, the row-marginal error ``sum_i |P_i. - a_i| / sum_i a_i`` (the
      column marginals hold exactly after each column update), measured at the last check.
  """

  row_potential: jax.Array
  col_potential: jax.Array
  iterations: jax.Array
  error: jax.Array


def _safe_logsumexp(x: jax.Array, axis: int) -> jax.Array:
  """logsumexp that returns -inf for all -inf slices with finite values and gradients."""
  peak = jax.lax.stop_gradient(jnp.max(x, axis=axis, keepdims=True))
  peak = jnp.where(jnp.isfinite(peak), peak, 0.0)
  total = jnp.sum(jnp.exp(x - peak), axis=axis)
  positive = total > 0
  log_total = jnp.log(jnp.where(positive, total, 1.0)) + jnp.squeeze(peak, axis)
  return jnp.where(positive, log_total, -jnp.inf)


class _Problem(NamedTuple):
  logits: jax.Array  # [n, m] float32, -inf outside the active block
  log_a: jax.Array  # [n] float32, 0 for inactive rows
  log_b: jax.Array  # [m] float32, 0 for inactive columns
  row_active: jax.Array  # [n] bool
  col_active: jax.Array  # [m] bool
  row_marginals: jax.Array  # [n] float32, 0 for inactive rows


def _prepare(logits, row_marginals, col_marginals, row_mask, col_mask) -> _Problem:
  """Applies masks, drops all -inf rows/columns and builds balanced marginals."""
  logits = jnp.asarray(logits).astype(jnp.float32)
  if logits.ndim != 2:
    raise ValueError(f"logits must be 2-D [n_rows, n_cols], got shape {logits.shape}")
  n_rows, n_cols = logits.shape
  logits = jnp.where(jnp.isnan(logits), -jnp.inf, logits)
  row_mask = jnp.ones(n_rows, bool) if row_mask is None else jnp.asarray(row_mask, bool)
  col_mask = jnp.ones(n_cols, bool) if col_mask is None else jnp.asarray(col_mask, bool)
  if row_marginals is not None:
    row_mask = row_mask & (jnp.asarray(row_marginals) > 0)
  if col_marginals is not None:
    col_mask = col_mask & (jnp.asarray(col_marginals) > 0)
  block = row_mask[:, None] & col_mask[None, :]
  logits = jnp.where(block, logits, -jnp.inf)
  finite = jnp.isfinite(logits)
  row_active = jnp.any(finite, axis=1)
  col_active = jnp.any(finite, axis=0)
  logits = jnp.where(row_active[:, None] & col_active[None, :], logits, -jnp.inf)

  n_active_rows = jnp.sum(row_active).astype(jnp.float32)
  n_active_cols = jnp.maximum(jnp.sum(col_active), 1).astype(jnp.float32)
  if row_marginals is None:
    a = jnp.ones(n_rows, jnp.float32)
  else:
    a = jnp.asarray(row_marginals, jnp.float32)
  a = jnp.where(row_active, a, 0.0)
  if col_marginals is None:
    b = jnp.full(n_cols, 1.0, jnp.float32) * (n_active_rows / n_active_cols)
  else:
    b = jnp.asarray(col_marginals, jnp.float32)
  b = jnp.where(col_active, b, 0.0)
  # Balanced problem: the column marginals are rescaled to carry the row mass.
  b = b * (jnp.sum(a) / jnp.maximum(jnp.sum(b), 1e-30))
  log_a = jnp.where(row_active, jnp.log(jnp.where(row_active, a, 1.0)), 0.0)
  log_b = jnp.where(col_active, jnp.log(jnp.where(col_active, b, 1.0)), 0.0)
  return _Problem(logits, log_a, log_b, row_active, col_active, a)


def _row_update(p: _Problem, g: jax.Array):
  """Returns the new row potential and the row-marginal error of the incoming state."""
  lse_rows = _safe_logsumexp(p.logits + g[None, :], axis=1)
  return jnp.where(p.row_active, p.log_a - lse_rows, 0.0), lse_rows


def _col_update(p: _Problem, f: jax.Array) -> jax.Array:
  lse_cols = _safe_logsumexp(p.logits + f[:, None], axis=0)
  return jnp.where(p.col_active, p.log_b - lse_cols, 0.0)


def _row_error(p: _Problem, f: jax.Array, lse_rows: jax.Array) -> jax.Array:
  """Relative L1 row-marginal error of the plan with potentials (f, g) whose row lse is given."""
  row_sums = jnp.where(p.row_active, jnp.exp(f + lse_rows), 0.0)
  total = jnp.maximum(jnp.sum(p.row_marginals), 1e-30)
  return jnp.sum(jnp.abs(row_sums - p.row_marginals)) / total


def _solve_while(p: _Problem, tol, max_iterations: int, check_every: int):
  """Runs blocks of ``check_every`` iterations until the error is below ``tol``."""
  n_rows, n_cols = p.logits.shape
  inf = jnp.asarray(jnp.inf, jnp.float32)

  def block(carry):
    f, g, it, _ = carry

    def one(_, state):
      f, g = state
      f, _ = _row_update(p, g)
      g = _col_update(p, f)
      return f, g

    steps = jnp.minimum(check_every, max_iterations - it)
    f, g = jax.lax.fori_loop(0, steps, one, (f, g))
    # The next row update's logsumexp gives the current plan's row sums at no extra cost.
    lse_rows = _safe_logsumexp(p.logits + g[None, :], axis=1)
    err = _row_error(p, f, lse_rows)
    err = jnp.where(jnp.isfinite(err), err, inf)
    return f, g, it + steps, err

  def keep_going(carry):
    _, _, it, err = carry
    return (it < max_iterations) & (err > tol)

  init = (jnp.zeros(n_rows, jnp.float32), jnp.zeros(n_cols, jnp.float32),
          jnp.asarray(0, jnp.int32), inf)
  return jax.lax.while_loop(keep_going, block, init)


def _solve_unrolled(p: _Problem, num_iterations: int):
  """Exactly ``num_iterations`` updates with ``lax.scan``: reverse-differentiable."""
  n_rows, n_cols = p.logits.shape

  def one(state, _):
    f, g = state
    f, _ = _row_update(p, g)
    g = _col_update(p, f)
    return (f, g), None

  init = (jnp.zeros(n_rows, jnp.float32), jnp.zeros(n_cols, jnp.float32))
  (f, g), _ = jax.lax.scan(one, init, None, length=num_iterations)
  lse_rows = _safe_logsumexp(p.logits + g[None, :], axis=1)
  err = _row_error(p, f, lse_rows)
  return f, g, jnp.asarray(num_iterations, jnp.int32), err


@functools.partial(
    jax.jit, static_argnames=("max_iterations", "check_every", "gradient"))
def sinkhorn(
    logits: jax.Array,
    *,
    row_marginals: jax.Array | None = None,
    col_marginals: jax.Array | None = None,
    row_mask: jax.Array | None = None,
    col_mask: jax.Array | None = None,
    tol: float = 1e-4,
    max_iterations: int = 1000,
    check_every: int = 10,
    gradient: str = "stop",
) -> SinkhornOutput:
  """Solves the entropic balancing problem for ``logits`` in the log domain.

  Args:
    logits: [n_rows, n_cols] float (float32 or bfloat16; computed in float32). ``-inf`` entries
      are allowed; NaN entries are treated as ``-inf``.
    row_marginals: [n_rows] target row sums ``a``; default all ones.
    col_marginals: [n_cols] target column sums ``b``; default ``n_rows / n_cols`` each (over the
      active rows and columns). Rescaled to carry the same total mass as ``a``.
    row_mask: [n_rows] bool, False removes the row.
    col_mask: [n_cols] bool, False removes the column.
    tol: stop once the relative L1 row-marginal error is at most ``tol`` (``gradient='stop'``).
    max_iterations: iteration cap (``'stop'``), or the exact iteration count (``'unroll'``).
    check_every: iterations between error checks in the ``'stop'`` mode.
    gradient: ``'stop'`` (NCL's default): potentials are constants for autodiff and the
      ``lax.while_loop`` stops at ``tol``. ``'unroll'``: exactly ``max_iterations`` updates run
      in a ``lax.scan`` and gradients flow through every update.

  Returns:
    A :class:`SinkhornOutput`.
  """
  if gradient not in GRADIENT_MODES:
    raise ValueError(f"gradient must be one of {GRADIENT_MODES}, got {gradient!r}")
  if gradient == "stop":
    logits = jax.lax.stop_gradient(logits)
  problem = _prepare(logits, row_marginals, col_marginals, row_mask, col_mask)
  if gradient == "stop":
    f, g, iterations, err = _solve_while(problem, tol, max_iterations, max(1, check_every))
    f, g = jax.lax.stop_gradient(f), jax.lax.stop_gradient(g)
  else:
    f, g, iterations, err = _solve_unrolled(problem, max_iterations)
  return SinkhornOutput(f, g, iterations, err)


def log_plan(logits: jax.Array, out: SinkhornOutput) -> jax.Array:
  """[n_rows, n_cols] log of the balanced plan ``L + f + g`` (no masking applied)."""
  logits = jnp.asarray(logits, jnp.float32)
  return logits + out.row_potential[:, None] + out.col_potential[None, :]
