"""The temperatures at which float32 logits ``scores / T`` still carry a ranking and its biases.

Every normalization here works on ``logits = scores / T`` in float32 (softmaxes, Sinkhorn biases,
inverted softmaxes). Two things break at the ends of the temperature axis, whatever the method:

* T too large: the logits' spread shrinks towards float32's spacing near 1 (``eps = 2^-23``),
  where softmax sums and ``logit + bias`` are computed, and neighbouring scores tie; at
  ``spread / T < eps`` every score of a row ties (R@1 0, median rank = gallery size). The usable
  range keeps the spread at least :data:`MIN_LOGIT_SPREAD` (``2^10`` float32 steps at 1).
* T too small: the largest logit grows until its float32 spacing swallows the biases' log-scale
  corrections (at ``|logit| >= 2^24`` the spacing is 2, so no Sinkhorn update moves it), and
  beyond ``float32 max`` ``1 / T`` itself overflows to inf and yields NaN. The usable range keeps
  ``|logit| <= MAX_LOGIT = 2^13``, where the spacing is ``2^-10``, fine enough for biases to move a
  column's mass by 0.1%.

Measured (2,000 x 500 random unit vectors, |score| <= 0.73): the dense Sinkhorn solver converges
to tol 1e-4 at T = 1e-4 (largest logit 7,300, inside the range) and stalls at T = 3e-5 (24,000,
outside); on ``posthoc --demo`` (spread 0.49) the inverted softmax keeps R@1 46.5% at T = 1e3
and falls to 21% at 1e5 and 0% at 1e6, beyond the upper end (4,000).
"""

from __future__ import annotations

import numpy as np

from ncl_jax.errors import UserError

MAX_LOGIT = 2.0 ** 13
MIN_LOGIT_SPREAD = 2.0 ** -13
_BLOCK_ROWS = 8192


def usable_temperatures(max_abs_score: float, score_spread: float) -> tuple[float, float]:
  """``(lowest, highest)`` temperature for scores with this magnitude and spread.

  Args:
    max_abs_score: the largest ``|score|`` (or an upper bound of it).
    score_spread: ``max(score) - min(score)`` (or a lower bound of it).
  """
  return max_abs_score / MAX_LOGIT, score_spread / MIN_LOGIT_SPREAD


def score_range(*matrices) -> tuple[float, float]:
  """``(max |score|, max - min)`` over the given 2-D arrays (memmaps are read in row blocks).

  None entries are skipped. The spread is the smallest of the matrices' own spreads: each one is
  ranked on its own.
  """
  max_abs, spread = 0.0, np.inf
  for matrix in matrices:
    if matrix is None:
      continue
    low, high = np.inf, -np.inf
    for start in range(0, matrix.shape[0], _BLOCK_ROWS):
      block = np.asarray(matrix[start:start + _BLOCK_ROWS], np.float64)
      low, high = min(low, float(block.min())), max(high, float(block.max()))
    max_abs = max(max_abs, abs(low), abs(high))
    spread = min(spread, high - low)
  return max_abs, spread


def embedding_score_range(queries, items, max_norm: float, sample_queries: int = 256,
                          sample_items: int = 16384) -> tuple[float, float]:
  """``(bound on max |score|, sampled spread)`` of ``queries @ items.T`` without computing it all.

  Args:
    queries: [Nq, D] embeddings (array or memmap).
    items: [Ni, D] embeddings of the same dimension.
    max_norm: an upper bound of every row's L2 norm, so ``|score| <= max_norm ** 2``.
    sample_queries, sample_items: evenly spaced rows whose scores give the spread (a lower bound
      of the full matrix's, so the usable range's upper end is on the safe side).
  """
  rows = lambda array, n: np.asarray(
      array[np.unique(np.linspace(0, array.shape[0] - 1, min(n, array.shape[0])).astype(int))],
      np.float32)
  sample = rows(queries, sample_queries) @ rows(items, sample_items).T
  return float(max_norm) ** 2, float(sample.max()) - float(sample.min())


def check_temperature(temperature: float, max_abs_score: float, score_spread: float, *,
                      flag: str = "--temperature", source: str = "the scores") -> None:
  """Raises UserError unless ``temperature`` lies in :func:`usable_temperatures`.

  Args:
    temperature: a positive finite temperature (checked by the caller).
    max_abs_score: the largest ``|score|`` (or an upper bound of it).
    score_spread: ``max(score) - min(score)`` (or a lower bound of it).
    flag: how messages name the temperature option.
    source: how messages name where the score range came from.
  """
  lowest, highest = usable_temperatures(max_abs_score, score_spread)
  where = f"{source} reach |score| {max_abs_score:.3g} and spread over {score_spread:.3g}"
  if score_spread <= 0:
    raise UserError(f"{source} are all equal ({max_abs_score:.3g}): there is no ranking to "
                    "normalize at any temperature")
  if lowest > highest:
    raise UserError(f"no {flag} suits {source} in float32: they are too large ({max_abs_score:.3g})"
                    f" for their spread ({score_spread:.3g}); subtract a constant or rescale them")
  if temperature < lowest:
    raise UserError(f"{flag} {temperature:g} is too small for float32 logits: {where}, so the "
                    f"largest |score| / T would exceed {MAX_LOGIT:g} and the normalization's "
                    f"log-scale corrections would vanish; use a temperature in "
                    f"[{lowest:.3g}, {highest:.3g}]")
  if temperature > highest:
    raise UserError(f"{flag} {temperature:g} is too large for float32 logits: {where}, so scores / T "
                    f"would spread over less than {MIN_LOGIT_SPREAD:.3g} (2^10 float32 steps "
                    f"near 1) and neighbouring scores would tie; use a "
                    f"temperature in [{lowest:.3g}, {highest:.3g}]")
