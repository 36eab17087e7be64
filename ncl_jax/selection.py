"""Hyper-parameter selection for the inference-time normalizers, without the test queries.

A normalizer's knob (QB-Norm's ``beta`` and ``k``, the inverted softmax's ``beta``, CSLS's ``k``,
DSL's temperature) tuned on the test queries' labels makes any comparison unfair. The rule here
reads only the bank, the same matrix the normalizer is given anyway:

1. The bank's rows are split, by a seeded permutation, into two halves (at most ``max_rows``
   rows are used in all, drawn by the same permutation).
2. Two folds: one half are pseudo-queries, the other half their pseudo-bank, then the reverse.
   Every grid value normalizes the pseudo-queries with the pseudo-bank (DSL, which has no bank,
   normalizes the pseudo-queries over themselves).
3. Each grid value gets the mean over the folds of a criterion:

   * ``"balance"`` (label-free, the default): the mean relative normalization error
     ``|mass / expected - 1|`` of the pseudo-queries' summed retrieval probability per
     candidate, lower is better. It asks what every normalizer here is for: that unseen
     queries from the bank's distribution spread their probability over the candidates in
     proportion to the expected shares. It needs no labels, so it works for a bank of training
     captions scored against *test* videos (which has no ground truth) and for the test
     queries themselves in the transductive setting (their labels are never read).
   * ``"recall"``: when each bank row's correct candidate is known (``bank_gt``), the
     pseudo-queries' R@1 (ties broken by the lower mean rank), higher is better.

   DSL rescales logits instead of balancing a distribution, so its balance score does not
   measure what it does: DSL needs ``"recall"`` (a labelled bank).
4. The best value wins; equal scores keep the first in grid order.

The grids are the registry's (:data:`ncl_jax.normalize.REGISTRY`, each row's knobs); methods
without a grid (``none``) select nothing.

:func:`select_on_queries` is the labelled counterpart for a training run: the grid scored by
R@1 on the validation split (never the test split), with the training bank as the bank.
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any, Callable, NamedTuple

import numpy as np

from ncl_jax import metrics as metrics_lib
from ncl_jax import normalize as norm_lib

CRITERIA = ("balance", "recall")
# Rows of the bank the selection reads at most (two halves of this many / 2).
MAX_ROWS = 20000
# Level of select_on_queries' one-sided sign test against the plain ranking, Bonferroni-
# corrected over the grid (docs/normalization.md: measured on held-out thirds of both real
# matrices).
GUARD_LEVEL = 0.05


class Selection(NamedTuple):
  """The chosen options and the scores behind them.

  Attributes:
    values: the chosen ``{option: value}`` (empty for methods without a knob).
    criterion: ``"balance"``, ``"recall"`` or ``"none"`` (nothing to select).
    grid: one ``{option: value, ..., "score": float}`` per grid point, in grid order; the score
      is the fold mean (relative error for balance, R@1 in percent for recall).
    rows: bank rows used (pseudo-queries + pseudo-bank).
  """

  values: dict[str, Any]
  criterion: str
  grid: list[dict[str, Any]]
  rows: int

  def as_json(self) -> dict[str, Any]:
    return {"values": self.values, "criterion": self.criterion, "rows": self.rows,
            "grid": self.grid}


def grid(method: str) -> dict[str, tuple]:
  """``method``'s selectable options -> candidate values (its registry row's knobs)."""
  return norm_lib.normalizer(method).grid


def grid_points(method: str, n_pseudo_bank: int, n_candidates: int) -> list[dict[str, Any]]:
  """Every combination of ``method``'s grid values that is valid at these sizes."""
  row = norm_lib.normalizer(method)
  sizes = {"bank": n_pseudo_bank, "candidates": n_candidates}
  knobs = [knob for knob in row.knobs if knob.grid]
  points = []
  for combo in itertools.product(*(knob.grid for knob in knobs)):
    if all(knob.at_most is None or value <= sizes[knob.at_most]
           for knob, value in zip(knobs, combo)):
      points.append({knob.name: value for knob, value in zip(knobs, combo)})
  return points


def _folds(n_rows: int, seed: int, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
  """Two disjoint sorted row sets (sorted: memmapped banks read forward)."""
  order = np.random.default_rng(seed).permutation(n_rows)[:max_rows]
  half = len(order) // 2
  return np.sort(order[:half]), np.sort(order[half:])


def _score(method: str, options: dict, queries: np.ndarray, bank: np.ndarray, *,
           temperature: float, criterion: str, gt, shares, gallery_bank) -> tuple[float, float]:
  """(primary, tie-break) score of one grid point on one fold; larger is better for both."""
  fold_bank = bank if norm_lib.normalizer(method).uses_bank else None
  logits = norm_lib.normalize(queries, method, fold_bank, temperature=temperature,
                              col_marginals=shares, gallery_bank=gallery_bank, **options)
  if criterion == "recall":
    ranks = metrics_lib.t2v_ranks(logits, gt)
    return 100.0 * float(np.mean(ranks <= 1)), -float(np.mean(ranks))
  mass = norm_lib.candidate_mass(logits)
  return -norm_lib.normalization_error(mass, shares * len(queries))["relative_mae"], 0.0


def select_on_bank(method: str, bank, *, temperature: float, bank_gt=None, col_marginals=None,
                   seed: int = 0, max_rows: int = MAX_ROWS, gallery_bank=None) -> Selection:
  """Chooses ``method``'s options from the bank alone (see the module docstring).

  Args:
    method: a registered method (:func:`ncl_jax.normalize.method_names`).
    bank: [n_bank, n_candidates] bank similarities (numpy array or memmap).
    temperature: the model's logit temperature.
    bank_gt: optional [n_bank] int, each bank row's correct candidate: selects by ``"recall"``
      instead of ``"balance"``.
    col_marginals: [n_candidates] expected shares (e.g. caption counts); default uniform.
    seed: seed of the row split.
    max_rows: bank rows read at most.
    gallery_bank: the gallery-side bank of methods that need one (``dualis``), used whole.

  Returns:
    A :class:`Selection`.

  Raises:
    ValueError: unknown method, a bank too small to split, a bad ``bank_gt``, or DSL without
      ``bank_gt``.
  """
  n_bank, n_cols = bank.shape
  criterion = "recall" if bank_gt is not None else "balance"
  row = norm_lib.normalizer(method)
  if not row.grid:
    return Selection({}, "none", [], 0)
  if not row.balance and criterion == "balance":
    raise ValueError(f"{method} rescales logits rather than balancing a distribution, so its "
                     f"options can only be selected by recall on a labelled bank: give each "
                     f"bank row's correct candidate (bank_gt)")
  if n_bank < 4:
    raise ValueError(f"the bank needs at least 4 rows to split into pseudo-queries and a "
                     f"pseudo-bank, got {n_bank}")
  if bank_gt is not None:
    bank_gt = np.asarray(bank_gt)
    if bank_gt.shape != (n_bank,) or not np.issubdtype(bank_gt.dtype, np.integer) or (
        bank_gt.min() < 0 or bank_gt.max() >= n_cols):
      raise ValueError(f"bank_gt must be {n_bank} integers in [0, {n_cols}), one per bank row")
  shares = np.full(n_cols, 1.0 / n_cols) if col_marginals is None else (
      np.asarray(col_marginals, np.float64) / np.sum(col_marginals))
  first, second = _folds(n_bank, seed, max_rows)
  halves = [np.asarray(bank[rows], np.float32) for rows in (first, second)]
  labels = [None, None] if bank_gt is None else [bank_gt[first], bank_gt[second]]
  points = grid_points(method, min(len(first), len(second)), n_cols)
  grid, best, best_key = [], None, None
  for options in points:
    scores = [_score(method, options, halves[q], halves[1 - q], temperature=temperature,
                     criterion=criterion, gt=labels[q], shares=shares,
                     gallery_bank=gallery_bank) for q in (0, 1)]
    key = tuple(float(np.mean(parts)) for parts in zip(*scores))
    grid.append({**options, "score": abs(key[0])})
    if best_key is None or key > best_key:
      best, best_key = options, key
  return Selection(dict(best), criterion, grid, len(first) + len(second))


def select_on_queries(method: str, queries, bank, *, temperature: float,
                      ranks: Callable[[np.ndarray], np.ndarray], col_marginals=None,
                      gallery_bank=None, guard: float | None = GUARD_LEVEL) -> Selection:
  """Chooses ``method``'s options by R@1 on labelled queries that are not the test queries.

  The validation split is the use (``posthoc --select val``, a training run's
  ``config.eval.methods``): its queries with the same kind of bank as the test queries get.
  Every grid point of the registry normalizes ``queries`` with ``bank`` (DSL over ``queries``
  themselves) and is scored by R@1, ties broken by the lower mean rank, then by grid order.

  **Guard.** A few hundred validation queries pick a winner that often owes its margin to
  chance. Where the grid holds a point that is the plain ranking (strength ``alpha = 0``,
  DN's ``lambda = 0``), the winner replaces it only if it fixes significantly more
  validation queries' top-1 than it breaks: ``wins - losses >= z * sqrt(wins + losses)``
  against that plain point, a one-sided sign test (normal approximation) at level ``guard``
  divided by the number of other grid points (Bonferroni: the winner is the best of many);
  ``guard = None`` takes the unguarded winner.

  Args:
    method: a registered method (:func:`ncl_jax.normalize.method_names`).
    queries: [n_queries, n_candidates] similarities of the labelled queries.
    bank: [n_bank, n_candidates] bank similarities (ignored by ``dsl``); None: the queries are
      their own bank (transductive, as when the test queries are).
    temperature: the model's logit temperature.
    ranks: normalized logits [n_queries, n_candidates] -> [n_queries] 1-based ranks of the
      ground truth (the labels live in this function).
    col_marginals: the candidates' expected shares (NCL reads them).
    gallery_bank: the gallery-side bank of methods that need one (``dualis``).
    guard: the sign test's level before the correction (:data:`GUARD_LEVEL`); None: no test.

  Returns:
    A :class:`Selection` with criterion ``"validation"``; each grid point's ``score`` is its
    R@1 (percent), ``wins``/``losses`` its top-1 changes against the plain point.
  """
  row = norm_lib.normalizer(method)
  if not row.grid:
    return Selection({}, "none", [], 0)
  n_bank = (queries if bank is None else bank).shape[0]
  points = grid_points(method, n_bank, queries.shape[1])
  hits, keys = [], []
  for options in points:
    logits = norm_lib.normalize(queries, method, bank if row.uses_bank else None,
                                temperature=temperature, col_marginals=col_marginals,
                                gallery_bank=gallery_bank, **options)
    point_ranks = np.asarray(ranks(logits), np.float64)
    hits.append(point_ranks <= 1)
    keys.append((100.0 * float(np.mean(point_ranks <= 1)), -float(np.mean(point_ranks))))
  best = max(range(len(points)), key=lambda i: (keys[i], -i))
  plain = next((i for i, p in enumerate(points) if _is_plain(row, p)), None)
  grid = [{**p, "score": keys[i][0]} for i, p in enumerate(points)]
  if plain is not None and guard is not None:
    for i, point in enumerate(grid):
      point["wins"] = int(np.sum(hits[i] & ~hits[plain]))
      point["losses"] = int(np.sum(~hits[i] & hits[plain]))
    wins, losses = grid[best]["wins"], grid[best]["losses"]
    if wins - losses < guard_z(guard, len(points)) * np.sqrt(wins + losses):
      best = plain
  return Selection(dict(points[best]), "validation", grid, int(queries.shape[0]))


def guard_z(level: float, n_points: int) -> float:
  """z of a one-sided test at ``level`` / (``n_points`` - 1) (0 for ``level >= 0.5``)."""
  corrected = min(0.5, level / max(n_points - 1, 1))
  return statistics.NormalDist().inv_cdf(1.0 - corrected)


def _is_plain(row, point: dict) -> bool:
  """Whether ``point`` sets a knob to the value that gives the plain ranking."""
  return any(knob.neutral is not None and point.get(knob.name) == knob.neutral
             for knob in row.knobs)
