"""The streaming engine of the bank normalizers: row chunks, column sums, the column fixed point.

A bank or gallery matrix of any size (a ``np.load(..., mmap_mode="r")`` memmap included) is read
in fixed-size row chunks (:func:`host_chunks`, :func:`device_chunks`), so only [n_candidates]
vectors persist between chunks. :func:`column_fixed_point` is NCL's Sinkhorn column update,
Anderson-accelerated, for any way of computing a plan's column sums: a streamed matrix
(:func:`streamed_mass`, used by :func:`ncl_jax.normalize.streamed_ncl_biases`), embedding tiles
sharded over devices (:mod:`ncl_jax.gallery.dense`) or a sparse top-k plan
(:mod:`ncl_jax.gallery.sparse`). Single-device math: the mesh lives in the callers.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Rows per streamed chunk hold about this many entries (4 MiB of float32): small enough to stay
# in the L2 cache between the passes over a chunk, which measured faster than 4x larger chunks.
CHUNK_ELEMENTS = 1 << 20
# Floor on a column's summed probability in the streamed NCL update: a column that underflows
# to zero then rises by at most log(b / TINY) per iteration instead of becoming infinite.
TINY = 1e-30


class Biases(NamedTuple):
  """Candidate biases from a query bank.

  Attributes:
    bias: [n_candidates] float32, added to ``sims / temperature``.
    iterations: Sinkhorn iterations run (0 for non-iterative methods).
    error: relative L1 marginal error at the end (0 for non-iterative methods).
  """

  bias: np.ndarray
  iterations: int
  error: float


def chunk_rows_for(n_rows: int, n_cols: int, chunk_rows: int | None) -> int:
  """Rows per chunk: ``chunk_rows`` if given, else about :data:`CHUNK_ELEMENTS` entries."""
  # A multiple of 16 rows keeps every float32 chunk of a .npy memmap 64-byte aligned, which
  # lets jax.device_put alias it instead of copying.
  rows = chunk_rows or max(16, CHUNK_ELEMENTS // max(n_cols, 1) // 16 * 16)
  return max(1, min(rows, n_rows))


def host_chunks(matrix, chunk_rows: int):
  """Yields (float32 [chunk_rows, m] numpy block, [chunk_rows] bool valid), zero-padded tails.

  Reads one block of rows at a time, so a memory-mapped matrix (any float dtype) is never
  loaded whole. A multiple of 16 rows keeps float32 memmap blocks 64-byte aligned.
  """
  n_rows = matrix.shape[0]
  for start in range(0, n_rows, chunk_rows):
    block = np.ascontiguousarray(matrix[start:start + chunk_rows], np.float32)
    valid = np.ones(chunk_rows, bool)
    if block.shape[0] < chunk_rows:
      valid[block.shape[0]:] = False
      block = np.concatenate(
          [block, np.zeros((chunk_rows - block.shape[0], block.shape[1]), np.float32)])
    yield block, valid


def device_chunks(matrix, chunk_rows: int):
  """:func:`host_chunks` with each block on the default device.

  Blocks go to the device with ``jax.device_put(..., may_alias=True)``: on CPU a 64-byte
  aligned block (every default-sized chunk of a .npy memmap) is aliased instead of copied. The
  blocks are never written to.
  """
  for block, valid in host_chunks(matrix, chunk_rows):
    yield jax.device_put(block, may_alias=True), valid


@jax.jit
def chunk_mass(block, valid, scale, bias):
  """Σ_i softmax_j(scale * block_ij + bias_j) over the valid rows: [m] float32.

  One ``exp`` per entry: rows are max-shifted, so every row's largest term is exactly 1.
  """
  logits = block * scale + bias[None, :]
  peak = jnp.max(logits, axis=1, keepdims=True)
  e = jnp.exp(logits - peak)
  weights = jnp.where(valid, 1.0 / jnp.sum(e, axis=1), 0.0)
  # Full float32 precision: at the GPU default (TF32) the column sums would carry ~1e-3
  # relative error and stall Sinkhorn above its tolerance.
  return jnp.matmul(weights, e, precision=jax.lax.Precision.HIGHEST)


def streamed_mass(matrix, rows: int, scale, bias) -> np.ndarray:
  """Σ over all rows of :func:`chunk_mass`, [m] float64.

  Chunk results are summed on the device without waiting for each, so chunk slicing and
  dispatch overlap the computation; one transfer per pass.
  """
  total = None
  for block, valid in device_chunks(matrix, rows):
    mass = chunk_mass(block, valid, scale, bias)
    total = mass if total is None else total + mass
  return np.asarray(total, np.float64)


def balanced_marginals(col_marginals, n_bank: int, n_cols: int) -> np.ndarray:
  """Column targets that carry the bank's total mass (each bank query distributes 1)."""
  if col_marginals is None:
    return np.full(n_cols, n_bank / n_cols, np.float64)
  b = np.asarray(col_marginals, np.float64)
  if b.shape != (n_cols,) or np.any(b <= 0):
    raise ValueError(f"col_marginals must be {n_cols} positive values, got shape {b.shape}")
  return b * (n_bank / b.sum())


def column_error(colsum, b) -> float:
  """The relative L1 column error ``sum |colsum - b| / sum b`` of column sums [n] against their
  targets [n]: what ``tol`` is compared with."""
  return float(np.abs(np.asarray(colsum, np.float64) - b).sum() / np.sum(b))


def _anderson_step(points: list[np.ndarray], residuals: list[np.ndarray]) -> np.ndarray:
  """Anderson-accelerated step for the fixed point ``g = g + r(g)`` from recent (g, r) pairs.

  Mixes the last iterates with weights that minimise the linearised residual (a small
  regularised least-squares problem on [n_candidates, memory] differences).
  """
  g, r = points[-1], residuals[-1]
  d_points = np.stack([b - a for a, b in zip(points[:-1], points[1:])], axis=1)
  d_residuals = np.stack([b - a for a, b in zip(residuals[:-1], residuals[1:])], axis=1)
  gram = d_residuals.T @ d_residuals
  gram += 1e-10 * (np.trace(gram) + 1e-30) * np.eye(gram.shape[0])
  gamma = np.linalg.solve(gram, d_residuals.T @ r)
  return g + r - (d_points + d_residuals) @ gamma


def column_fixed_point(column_mass: Callable[[np.ndarray], np.ndarray], b: np.ndarray, *,
                       tol: float = 1e-4, max_iterations: int = 1000,
                       anderson: int = 8, initial: np.ndarray | None = None) -> Biases:
  """Anderson-accelerated Sinkhorn column update ``g <- g + log b - log column_mass(g)``.

  The loop of :func:`ncl_jax.normalize.streamed_ncl_biases`, for any way of computing the column sums (a
  streamed similarity matrix, tiles of embeddings sharded over devices, a sparse top-k
  matrix). It is deterministic given ``column_mass``'s values, so processes that all receive
  the same column sums take the same steps.

  Args:
    column_mass: maps biases [n_candidates] float64 to the current plan's column sums
      [n_candidates] (each query's softmax over candidates, summed over the queries).
    b: [n_candidates] positive targets summing to the number of queries.
    tol, max_iterations, anderson: see :func:`ncl_jax.normalize.streamed_ncl_biases`.
    initial: [n_candidates] biases to start from (a warm start, e.g. an approximate solution);
      default zeros.

  Returns:
    :class:`Biases`; ``error`` is the relative L1 column error of the last evaluated ``g``.
  """
  log_b = np.log(b)
  g = (np.zeros(len(b), np.float64) if initial is None
       else np.array(initial, np.float64).reshape(len(b)))
  points, residuals = [], []  # recent accepted iterates and their residuals (Anderson history)
  error, previous_error, iteration, extrapolated = np.inf, np.inf, 0, False
  while True:
    colsum = np.asarray(column_mass(g), np.float64)
    error = column_error(colsum, b)
    if error <= tol or iteration >= max_iterations:
      break
    iteration += 1
    underflow = bool(np.any(colsum < TINY))
    if extrapolated and (error > previous_error or underflow):
      # The extrapolated step made things worse: back to the last accepted iterate, plain step.
      g = points[-1] + residuals[-1]
      points, residuals, extrapolated = [], [], False
      continue
    residual = log_b - np.log(np.maximum(colsum, TINY))
    previous_error = error
    if underflow:  # the floored residual is not smooth: no extrapolation through it
      points, residuals = [], []
    points = (points + [g])[-(anderson + 1):]
    residuals = (residuals + [residual])[-(anderson + 1):]
    step = _anderson_step(points, residuals) if anderson and len(points) > 1 else None
    extrapolated = step is not None and bool(np.all(np.isfinite(step)))
    g = step if extrapolated else g + residual
  return Biases(g.astype(np.float32), iteration, error)
