"""The sparse mode's plan and its certified error: everything about the omitted items.

The sparse problem keeps, for each bank row ``i``, its top-K scores (:mod:`ncl_jax.gallery.search`)
and gives every omitted item ``j`` the logit ``L_i + g_j``, with one level ``L_i`` per row
(:func:`omitted_level`: the mass the deeper search saw below rank K, spread over the omitted
items). The matrix is dense, so Sinkhorn on it is always feasible and every bias stays finite,
yet it is stored in ``O(Nb K)``: a row's omitted items enter only through
``rest_i = sum_{j omitted} exp(g_j)``. :class:`SparsePlan` sums its columns, one pass per call.

The certificate: the probability each row's true softmax puts outside its kept items is bounded
(:func:`omitted_mass_bound`, from the kept scores, the deeper ranks' scores and, after an ivf
search, :func:`unscanned_log_mass` for the lists the row never scanned); the true and the
solved plan differ per row by at most twice the larger of their omitted probabilities, so the
dense problem's column error is at most the solved one plus twice the mean of that larger value
(:func:`worst_case_gap`). The bound functions use float64 numpy: the omitted sums are
differences of large sums.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse   # a JAX dependency

from ncl_jax.errors import UserError

# Bank rows per sparse update chunk.
_SPARSE_ROWS = 65536


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
  (:class:`SparsePlan` sums its columns)."""
  scores = np.asarray(kept_scores, np.float64) * scale
  index = np.asarray(kept_index, np.int64)
  g = np.asarray(bias, np.float64) - np.max(bias)
  level = (scores.min(axis=1) if omitted_level is None
           else np.asarray(omitted_level, np.float64))
  kept = scores + g[index]
  peak = kept.max(axis=1)
  kept_lse = peak + np.log(np.exp(kept - peak[:, None]).sum(axis=1))
  return _sigmoid(level + np.log(_omitted_exp_sums(index, g, n_items)) - kept_lse)


def float32_score_error(dim: int, norm_product: float = 1.0) -> float:
  """Bound on the rounding error of a float32 dot product of two vectors of ``dim`` whose norms
  multiply to at most ``norm_product``.

  Recursive summation gives ``|fl(x.y) - x.y| <= dim * u * sum_i |x_i y_i| <= dim * u |x| |y|``
  with ``u = 2**-24`` (Cauchy-Schwarz); blocked BLAS kernels do no worse.
  """
  return dim * 2.0 ** -24 * norm_product


def max_row_norm(array, rows: int = _SPARSE_ROWS) -> float:
  """The largest L2 norm of a row of ``array`` [N, D] (array or memmap, read in chunks)."""
  return max(float(np.linalg.norm(np.asarray(array[first:first + rows], np.float64),
                                  axis=1).max()) for first in range(0, array.shape[0], rows))


def score_error(bank, gallery) -> float:
  """The rounding allowance of one float32 bank x gallery score, from the rows' largest norms
  (the command line accepts norms up to 1.01; the Python API checks none)."""
  return float32_score_error(bank.shape[1], max_row_norm(bank) * max_row_norm(gallery))


def kept_rounding_gap(scale: float, error: float) -> float:
  """The most a row's plan moves in L1 when its kept scores are off by ``error`` each.

  The kept scores come from float32 FAISS scores: if every kept logit of a row is off by at most
  ``e = scale * error``, each probability changes by a factor within ``exp(+-2e)``, so the row's
  L1 change is at most ``exp(2e) - 1``.
  """
  return float(np.expm1(2.0 * scale * error))


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
      it did not scan (:func:`unscanned_log_mass`); the caps above then
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


def omitted_level(deep_scores, deep_index, k: int, n_items: int, scale: float) -> np.ndarray:
  """Per row, the logit each omitted item gets in the sparse solve (before its bias), [r].

  The search saw the scores of ranks ``k+1 .. depth`` but keeps only the top ``k`` ids, so a
  row's omitted items receive, together, the softmax mass of those ranks (exact), plus at most
  the rank-``depth`` score for each remaining item, spread evenly (then in proportion to
  ``exp(g_j)``): ``L = log(sum_{k<r<=depth} exp(scale s_r) + (n - k - seen) exp(scale s_depth))
  - log(n - k)``. Giving every omitted item the k-th score instead (the clipped matrix, an
  upper bound) over-weights them, which moved 2.4 % of held-out top-1 results away from the
  dense solution's on the benchmark data, against 0.24 % with this level.

  Args:
    deep_scores: [r, depth] the search's scores, best first (padding after the real ones).
    deep_index: [r, depth] their ids, -1 for padding.
    k: kept items per row.
    n_items: gallery size (> k).
    scale: ``1 / temperature``.
  """
  scores = np.asarray(deep_scores, np.float64) * scale
  real = np.asarray(deep_index) >= 0
  below = np.where(real[:, k:], scores[:, k:], -np.inf)
  seen = real[:, k:].sum(axis=1)
  last = np.where(real, scores, np.inf).min(axis=1)   # the lowest score the search returned
  rest = n_items - k - seen
  tail = np.where(rest > 0, last + np.log(np.maximum(rest, 1)), -np.inf)
  terms = np.concatenate([below, tail[:, None]], axis=1)
  peak = terms.max(axis=1)
  total = peak + np.log(np.exp(terms - peak[:, None]).sum(axis=1))
  return total - np.log(n_items - k)



def unscanned_log_mass(block, scanned, lists, scale: float, bias,
                       score_error: float) -> np.ndarray:
  """log of an upper bound on ``sum exp(scale q.v_j + g_j - max g)`` over the items of the
  lists a query did not scan, [r]: an item ``v`` of list ``c`` scores
  ``q.v = q.c + q.(v - c) <= q.c + |q| radius_c`` (Cauchy-Schwarz, with each query's own norm,
  so rows of any norm are covered, not only unit ones).

  Args:
    block: [r, D] the queries.
    scanned: [r, nlist] bool, the lists each one scanned.
    lists: :class:`ncl_jax.gallery.search.IvfLists`.
    scale: ``1 / temperature``.
    bias: [Ng] biases.
    score_error: rounding allowance per score.
  """
  g = np.asarray(bias, np.float64)
  per_list = np.bincount(lists.assignment, np.exp(g - g.max()), minlength=len(lists.radius))
  queries = np.asarray(block, np.float64)
  caps = queries @ lists.centroids.T.astype(np.float64)
  caps += np.linalg.norm(queries, axis=1, keepdims=True) * lists.radius
  logits = (caps + score_error) * scale + np.log(np.maximum(per_list, 1e-300))
  logits[:, per_list == 0] = -np.inf     # empty lists hold nothing
  logits[np.asarray(scanned, bool)] = -np.inf
  peak = logits.max(axis=1)
  finite = np.isfinite(peak)
  out = np.full(len(logits), -np.inf)
  out[finite] = peak[finite] + np.log(
      np.exp(logits[finite] - peak[finite, None]).sum(axis=1))
  return out


@jax.jit
def row_probabilities(scores, index, level, log_rest, bias, scale):
  """The sparse plan's kept probabilities [r, K] and omitted weights ``w_i = exp(L_i - lse_i)``
  [r] of one chunk of rows (``lse_i`` the row's log-normaliser over kept and omitted items),
  fused in float32: gather, exp and row sums in one loop, no temporaries the size of the
  chunk."""
  kept = scores * scale + bias[index]
  omitted = level + log_rest
  peak = jnp.maximum(kept.max(axis=1), omitted)
  lse = peak + jnp.log(jnp.exp(kept - peak[:, None]).sum(axis=1) + jnp.exp(omitted - peak))
  return jnp.exp(kept - lse[:, None]), jnp.exp(level - lse)


class SparsePlan:
  """Column sums of the sparse plan over all bank rows, one pass per call.

  Row ``i`` keeps its K scores and gives each omitted item ``j`` the logit ``L_i + g_j``
  (``L_i`` from :func:`omitted_level`), so item ``j``'s column sum is its probability over the
  rows that keep it plus ``exp(g_j)`` times the omitted weights ``w_i`` of the rows that do not.
  The per-row softmax runs jitted in float32; the scatter of [r, K] values into item columns is
  a transposed sparse-matrix product over each chunk's fixed kept pattern (scipy CSR, float64
  sums). The omitted sums ``sum_{j omitted} exp(g_j)`` stay float64 (differences of large
  sums). A numpy reference of the same plan is in the tests.

  Args:
    scores: [Nb, K] float32 kept similarities.
    index: [Nb, K] int32 kept item ids.
    levels: [Nb] float64 omitted logit levels (:func:`omitted_level`).
    n_items: gallery size.
    scale: ``1 / temperature``.
  """

  def __init__(self, scores, index, levels, n_items: int, scale: float,
               rows: int = _SPARSE_ROWS):
    self._n_items, self._scale, self._rows = n_items, np.float32(scale), rows
    self._chunks = []
    k = self._k = index.shape[1]
    for first in range(0, len(index), rows):
      # Views of the caller's arrays where they are already int32 / float32 (1e6 x 128 rows
      # are 0.5 GB each); the pattern shares the ids and stores 1-byte ones.
      ids = np.ascontiguousarray(index[first:first + rows], np.int32)
      n = len(ids)
      pattern = scipy.sparse.csr_matrix(
          (np.ones(n * k, bool), ids.reshape(-1), np.arange(0, n * k + 1, k)),
          shape=(n, n_items))
      self._chunks.append((pattern, np.ascontiguousarray(scores[first:first + rows], np.float32),
                           ids, np.asarray(levels[first:first + rows], np.float32)))

  def _padded(self, array):
    """One compiled shape for every chunk: the last one is padded to ``rows``."""
    pad = self._rows - len(array)
    return array if not pad else np.pad(array, ((0, pad),) + ((0, 0),) * (array.ndim - 1))

  def __call__(self, bias) -> np.ndarray:
    """Column sums [n_items] float64 of the plan under biases ``bias`` [n_items]."""
    g = np.asarray(bias, np.float64)
    g = g - g.max()
    e = np.exp(g)
    total = e.sum()
    floor = (self._n_items - self._k) * e.min()   # no omitted sum is below this
    g32 = jnp.asarray(g, jnp.float32)
    kept_mass = np.zeros(self._n_items)
    row_weight = np.zeros(self._n_items)
    weight_sum = 0.0
    for pattern, scores, ids, levels in self._chunks:
      n = len(ids)
      rest = np.maximum(total - pattern @ e, floor)   # float64 [n]
      probs, weight = row_probabilities(
          self._padded(scores), self._padded(ids), self._padded(levels),
          self._padded(np.log(rest).astype(np.float32)), g32, self._scale)
      probs = np.asarray(probs)[:n]
      weight = np.asarray(weight, np.float64)[:n]
      kept_mass += _transposed_product(pattern, probs)
      row_weight += pattern.T @ weight
      weight_sum += weight.sum()
    return kept_mass + e * np.maximum(weight_sum - row_weight, 0.0)


def _transposed_product(pattern, values) -> np.ndarray:
  """``sum_i values[i, c] e_{index[i, c]}``: the column sums of a CSR matrix with the pattern's
  structure and ``values`` [n, K] as its data, in float64."""
  filled = scipy.sparse.csr_matrix((values.ravel(), pattern.indices, pattern.indptr),
                                   shape=pattern.shape)
  return filled.T @ np.ones(pattern.shape[0])


class Gap(NamedTuple):
  """The worst-case certificate's terms over all bank rows.

  Attributes:
    gap: the most the dense problem's relative L1 column error exceeds the solved one's:
      ``2 * mean over rows of max(omitted-mass bound, solved omitted probability)`` plus
      ``rounding``.
    bound_max, bound_mean: the largest and the mean per-row omitted-mass bound.
    rounding: :func:`kept_rounding_gap`: the kept scores are float32.
  """

  gap: float
  bound_max: float
  bound_mean: float
  rounding: float


def worst_case_gap(bank, found, bias, scale: float, n_items: int, error: float) -> Gap:
  """:class:`Gap` of the sparse solution ``bias`` for the top-k search result ``found``
  (:class:`ncl_jax.gallery.search.TopK` with its omitted levels), rows in chunks.

  Per row, the true softmax ``P_i`` and the solved plan's ``S_i`` are compared through ``P'_i``,
  the true row with the kept scores as stored: ``|P_i - P'_i|_1 <= rounding``, and ``P'_i`` and
  ``S_i`` share their kept logits, so they differ by at most twice the larger of their omitted
  probabilities (the bound covers ``P'_i``'s: its caps are raised by ``error``). Summed over
  rows, the column sums of ``P`` and ``S`` differ by at most ``Nb * gap``.

  Args:
    bank: [Nb, D] the bank queries (read again only after an ivf search).
    found: the search result the plan was built from.
    bias: [Ng] the solved biases.
    scale: ``1 / temperature``.
    n_items: gallery size.
    error: the rounding allowance of one stored score (:func:`score_error`).
  """
  return gap_from_sums(worst_case_sums(bank, found, bias, scale, n_items, error)[None], scale,
                       error)


def worst_case_sums(bank, found, bias, scale: float, n_items: int, error: float) -> np.ndarray:
  """The worst-case certificate's sums over some bank rows (one process's, when the rows are
  split over processes), [4] float64: ``(rows, sum of max(bound, solved omitted probability),
  sum of bounds, largest bound)``. Arguments as :func:`worst_case_gap`; :func:`gap_from_sums`
  combines the blocks' sums into a :class:`Gap`."""
  n_bank = found.scores.shape[0]
  bound_max, bound_sum, gap_sum = 0.0, 0.0, 0.0
  bound_rows = _SPARSE_ROWS // 8   # the ivf term holds [rows, nlist] float64 arrays
  for first in range(0, n_bank, bound_rows):
    rows = slice(first, first + bound_rows)
    unscanned = None
    if found.lists is not None:
      scanned = found.lists.scanned[found.scan_batch[rows]]
      unscanned = unscanned_log_mass(bank[rows], scanned, found.lists, scale, bias, error)
    bound = omitted_mass_bound(found.scores[rows], found.index[rows], scale, bias, n_items,
                               error, found.tier_scores[rows], found.tier_ranks, unscanned)
    solved = solved_omitted_probability(found.scores[rows], found.index[rows], scale, bias,
                                        n_items, found.omitted_level[rows])
    bound_max, bound_sum = max(bound_max, float(bound.max())), bound_sum + float(bound.sum())
    gap_sum += float(np.maximum(bound, solved).sum())
  return np.array([n_bank, gap_sum, bound_sum, bound_max], np.float64)


def gap_from_sums(block_sums, scale: float, error: float) -> Gap:
  """:class:`Gap` from :func:`worst_case_sums` of blocks that cover all bank rows once,
  [blocks, 4]: their rows and sums add up, their largest bounds give the largest."""
  block_sums = np.asarray(block_sums, np.float64)
  rows, gap_sum, bound_sum = (float(v) for v in block_sums[:, :3].sum(axis=0))
  bound_max = float(block_sums[:, 3].max())
  rounding = kept_rounding_gap(scale, error)
  return Gap(2.0 * gap_sum / rows + rounding, bound_max, bound_sum / rows, rounding)


# -- the sampled certificate ---------------------------------------------------------------------


CERTIFICATES = ("worst_case", "sampled")


def check_certificate_options(sample_rows: int, confidence: float, certify: str) -> None:
  """Raises :class:`ncl_jax.errors.UserError` for options no certificate can use."""
  if certify not in CERTIFICATES:
    raise UserError(f"certify must be one of {CERTIFICATES}, got {certify!r}")
  if sample_rows < 0 or (certify == "sampled" and sample_rows < 2):
    raise UserError(f"--sample_rows must be >= 0 (>= 2 with --certify sampled), got "
                    f"{sample_rows}")
  if not 0.0 < confidence < 1.0:
    raise UserError(f"--confidence must lie strictly between 0 and 1, got {confidence}")


class SampledGap(NamedTuple):
  """An upper confidence bound on the mean over all bank rows of ``|P_i - S_i|_1``, the L1
  distance between a row's true softmax and the solved plan's row.

  Attributes:
    gap: the bound (at least the sample mean): holds with probability ``confidence`` over the
      draw of the rows; the dense problem's column error is at most the solved one plus it.
    mean: the sample mean.
    omitted_mean: the sampled rows' mean true probability outside their kept items (the
      distance is about twice that when the plan spreads the omitted mass elsewhere).
    rows: rows drawn (or every bank row, then ``gap == mean`` and ``confidence == 1``).
    confidence: the bound's probability.
    seed: the draw's seed.
  """

  gap: float
  mean: float
  omitted_mean: float
  rows: int
  confidence: float
  seed: int


def sample_rows(n_bank: int, m: int, seed: int) -> np.ndarray:
  """``m`` bank rows drawn uniformly with replacement (independent draws), sorted; every row
  once when ``m >= n_bank``."""
  if m >= n_bank:
    return np.arange(n_bank)
  return np.sort(np.random.default_rng(seed).integers(0, n_bank, m))


def row_differences(bank, gallery, found, bias, scale: float, rows):
  """``(|P_i - S_i|_1, P_i's mass outside the kept items)``, each [len(rows)], for bank rows
  ``rows``: ``P_i`` the softmax of ``scale q_i.v_j + g_j`` over the whole gallery with scores in
  float64 (exact up to float64 rounding), ``S_i`` the solved plan's row (the kept float32
  scores, ``omitted_level`` + ``g_j`` elsewhere). Costs ``2 len(rows) Ng D`` FLOP and holds the
  gallery in float64."""
  distance, omitted = np.empty(len(rows)), np.empty(len(rows))
  for out, true, plan, kept in true_and_plan_rows(bank, gallery, found, bias, scale, rows):
    distance[out] = np.abs(true - plan).sum(axis=1)
    omitted[out] = 1.0 - np.take_along_axis(true, kept, axis=1).sum(axis=1)
  return distance, omitted


def true_and_plan_rows(bank, gallery, found, bias, scale: float, rows):
  """Yields, for chunks of bank rows ``rows``, ``(positions in rows, P, S, kept ids)``: the
  true softmax rows ``P`` [r, Ng] (float64 scores) and the solved plan's rows ``S`` [r, Ng]
  (see :func:`row_differences`), and the rows' kept item ids [r, K]."""
  items = np.asarray(gallery, np.float64)
  g = np.asarray(bias, np.float64) - np.max(bias)
  rows = np.asarray(rows)
  chunk = max(1, (1 << 22) // items.shape[0])
  for first in range(0, len(rows), chunk):
    picked = rows[first:first + chunk]
    true = _softmax(scale * (np.asarray(bank[picked], np.float64) @ items.T) + g)
    plan = np.asarray(found.omitted_level[picked], np.float64)[:, None] + g
    kept = np.asarray(found.index[picked], np.int64)
    np.put_along_axis(plan, kept, scale * np.asarray(found.scores[picked], np.float64)
                      + g[kept], axis=1)
    yield slice(first, first + chunk), true, _softmax(plan), kept


def _softmax(logits):
  """Row softmax in place of ``logits`` [r, n] float64."""
  logits -= logits.max(axis=1, keepdims=True)
  np.exp(logits, out=logits)
  logits /= logits.sum(axis=1, keepdims=True)
  return logits


def bernstein_upper(values, confidence: float, value_range: float) -> float:
  """An upper confidence bound on the mean of the distribution ``values`` [m] were drawn from
  independently, values in ``[0, value_range]``: the empirical Bernstein bound of Maurer and
  Pontil (2009, theorem 4), ``mean + sqrt(2 V ln(2/d) / m) + 7 ln(2/d) / (3 (m - 1))`` for
  values in [0, 1] (``V`` the sample variance, ``d = 1 - confidence``), scaled by the range.
  It holds with probability at least ``confidence``."""
  x = np.asarray(values, np.float64) / value_range
  m = len(x)
  if m < 2:
    return float(value_range)
  log_term = np.log(2.0 / (1.0 - confidence))
  upper = (x.mean() + np.sqrt(2.0 * x.var(ddof=1) * log_term / m)
           + 7.0 * log_term / (3.0 * (m - 1)))
  return float(min(upper, 1.0) * value_range)


def sampled_gap(bank, gallery, found, bias, scale: float, m: int, confidence: float,
                seed: int) -> SampledGap:
  """:class:`SampledGap` from ``m`` rows drawn with ``seed`` (:func:`sample_rows`), each row's
  ``|P_i - S_i|_1 <= 2`` computed exactly (:func:`row_differences`)."""
  rows = sample_rows(found.scores.shape[0], m, seed)
  distances, omitted = row_differences(bank, gallery, found, bias, scale, rows)
  return sampled_bound(distances, omitted, found.scores.shape[0], confidence, seed)


def sampled_block_values(bank_block, gallery, found, bias, scale: float, rows,
                         first_row: int) -> np.ndarray:
  """:func:`row_differences` of the drawn ``rows`` (global bank row ids) that fall in one
  process's block of bank rows, ``[first_row, first_row + len(found.scores))``: [2, len(rows)]
  float64 (distances, omitted masses), zero for rows outside the block, so the blocks' values
  add up to every drawn row's."""
  rows = np.asarray(rows)
  mine = (rows >= first_row) & (rows < first_row + found.scores.shape[0])
  values = np.zeros((2, len(rows)))
  if mine.any():
    values[:, mine] = row_differences(bank_block, gallery, found, bias, scale,
                                      rows[mine] - first_row)
  return values


def sampled_bound(distances, omitted, n_bank: int, confidence: float, seed: int) -> SampledGap:
  """:class:`SampledGap` from every drawn row's distance and omitted mass (:func:`sample_rows`
  of ``n_bank`` rows with ``seed``): the exact mean when every row was scored, otherwise
  :func:`bernstein_upper` at ``confidence``."""
  distances, omitted = np.asarray(distances, np.float64), np.asarray(omitted, np.float64)
  mean, omitted_mean = float(distances.mean()), float(omitted.mean())
  if len(distances) >= n_bank:   # every row: the exact mean
    return SampledGap(mean, mean, omitted_mean, len(distances), 1.0, seed)
  upper = bernstein_upper(distances, confidence, 2.0)
  return SampledGap(upper, mean, omitted_mean, len(distances), confidence, seed)
