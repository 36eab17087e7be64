"""Each bank query's top-k gallery items: the searches behind the sparse mode.

* ``exact``: a FAISS flat inner-product search (one pass of ``2 Nb Ng D`` FLOP).
* ``ivf``: inverted lists (FAISS k-means) scanned in batches of queries that share their
  nearest list; each query's top-k is exact within the lists its batch scanned, and the result
  records those lists (:class:`IvfLists`) so that :mod:`ncl_jax.gallery.sparse` can bound the
  items it never saw.

Both go ``2**_TIERS`` times deeper than ``k`` and keep the scores at ranks ``2k, 4k, ...``
(:class:`TopK`): the omitted items below such a rank score at most that much.
"""

from __future__ import annotations

import time
from typing import Callable, NamedTuple

import numpy as np

from ncl_jax import streaming
from ncl_jax.errors import UserError
from ncl_jax.gallery import sparse

# Bank rows per FAISS search call.
_SEARCH_ROWS = 16384
# ivf search: queries per batch, and lists a batch scans (this many times nprobe at most).
_IVF_BATCH = 2048
_IVF_UNION = 8
# The top-k search goes 2**_TIERS times deeper to bound the omitted items' scores in tiers.
_TIERS = 3


class IvfLists(NamedTuple):
  """The inverted lists of an approximate top-k search, enough to bound what it did not scan.

  Attributes:
    centroids: [nlist, D] float32 list centres.
    radius: [nlist] float64, the largest ``|v - c|`` over each list's items: an item ``v`` of
      list ``c`` scores ``q.v <= q.c + |q| radius_c`` for any query ``q``.
    assignment: [Ng] int64 list of each item.
    scanned: [n_batches, nlist] bool, the lists each batch of queries scanned (filled by the
      search; see :attr:`TopK.scan_batch`).
  """

  centroids: np.ndarray
  radius: np.ndarray
  assignment: np.ndarray
  scanned: np.ndarray | None = None


class TopK(NamedTuple):
  """Each bank query's top-k items and the scores at a few deeper ranks.

  Attributes:
    scores: [Nb, k] float32 similarities, best first.
    index: [Nb, k] int32 item ids.
    tier_scores: [Nb, t] float32 similarity at ranks ``tier_ranks`` (1-based) of each row.
    tier_ranks: [t] the ranks, ``2k, 4k, ...`` up to the gallery size.
    scan_batch: ivf search only: [Nb] int32, the batch each query was scanned in; the query's
      top-k is exact within that batch's lists (``lists.scanned[scan_batch]``).
    lists: ivf search only: the lists (:class:`IvfLists`).
    omitted_level: with a temperature: [Nb] float64 logit level the sparse solve gives each
      omitted item of a row (:func:`ncl_jax.gallery.sparse.omitted_level`).
  """

  scores: np.ndarray
  index: np.ndarray
  tier_scores: np.ndarray
  tier_ranks: np.ndarray
  scan_batch: np.ndarray | None = None
  lists: IvfLists | None = None
  omitted_level: np.ndarray | None = None


SEARCH_KINDS = ("exact", "ivf")


def time_left(done: int, total: int, since: float) -> str:
  """``", ~N s left"`` at the rate since ``since`` (monotonic time), or ``""`` when done."""
  if done >= total or done <= 0:
    return ""
  return f", ~{(time.monotonic() - since) / done * (total - done):.0f} s left"


def tier_ranks(k: int, n_items: int, tiers: int = _TIERS) -> np.ndarray:
  """Deeper ranks whose scores tighten the omitted-mass bound: ``2k, 4k, ...`` (at most n)."""
  ranks = [k << t for t in range(1, tiers + 1)]
  return np.asarray([r for r in ranks if r <= n_items], np.int64)


def ivf_settings(n_items: int, nlist: int | None, nprobe: int | None):
  """(nlist, nprobe) of the ivf search: ~4 sqrt(Ng) lists (at most Ng / 39, FAISS's training
  minimum), and each query's nearest 16 (at most nlist) for its batch to scan."""
  nlist = nlist or int(min(max(1, 4 * np.sqrt(n_items)), max(1, n_items // 39)))
  if not 1 <= nlist <= n_items:
    raise UserError(f"--nlist must lie in [1, {n_items}] (the gallery size), got {nlist}")
  nprobe = nprobe or min(nlist, 16)
  if not 1 <= nprobe <= nlist:
    raise UserError(f"--nprobe must lie in [1, nlist = {nlist}], got {nprobe}")
  return nlist, nprobe


def _ivf_lists(gallery, nlist: int) -> IvfLists:
  """The gallery's inverted lists: FAISS's k-means centres (inner product), each item's list
  and each list's radius."""
  import faiss  # pylint: disable=g-import-not-at-top
  items = np.ascontiguousarray(gallery, np.float32)
  quantizer = faiss.IndexFlatIP(items.shape[1])
  faiss.IndexIVFFlat(quantizer, items.shape[1], nlist, faiss.METRIC_INNER_PRODUCT).train(items)
  centroids = quantizer.reconstruct_n(0, nlist)
  _, assigned = quantizer.search(items, 1)   # the list FAISS's IVF would put each item in
  assignment = assigned[:, 0].astype(np.int64)
  distance = np.linalg.norm(items.astype(np.float64) - centroids[assignment], axis=1)
  radius = np.zeros(nlist)
  np.maximum.at(radius, assignment, distance)
  return IvfLists(centroids, radius, assignment)



def _select(scores, ids, k: int, ranks, depth: int):
  """The top ``depth`` of each row of ``scores`` [m, u] (ids [m, u] or None: column numbers):
  (scores [m, depth], ids [m, depth]) with the top ``k`` sorted first, the exact values at
  ``ranks`` (1-based) in place, and rows with fewer than ``depth`` candidates padded with
  their lowest score (no candidate lies below it, so tier scores stay valid caps) and id -1."""
  m, u = scores.shape
  if u <= depth:
    order = np.argsort(-scores, axis=1, kind="stable")
    top = np.take_along_axis(scores, order, axis=1)
    top_ids = order if ids is None else np.take_along_axis(ids, order, axis=1)
    pad = depth - u
    return (np.pad(top, ((0, 0), (0, pad)), mode="edge"),
            np.pad(top_ids, ((0, 0), (0, pad)), constant_values=-1))
  kth = sorted({k - 1, *(int(r) - 1 for r in ranks), depth - 1})
  order = np.argpartition(-scores, kth, axis=1)[:, :depth]
  top = np.take_along_axis(scores, order, axis=1)
  first = np.argsort(-top[:, :k], axis=1, kind="stable")
  top[:, :k] = np.take_along_axis(top[:, :k], first, axis=1)
  order[:, :k] = np.take_along_axis(order[:, :k], first, axis=1)
  return top, (order if ids is None else np.take_along_axis(ids, order, axis=1))


class _Rows:
  """The per-row outputs of a top-k search, filled batch by batch."""

  def __init__(self, n_bank, n_items, k, ranks, temperature):
    self.k, self.ranks, self.n_items = k, ranks, n_items
    self.scores = np.empty((n_bank, k), np.float32)
    self.index = np.empty((n_bank, k), np.int32)
    self.tiers = np.empty((n_bank, len(ranks)), np.float32)
    self.scale = None if temperature is None else 1.0 / temperature
    self.levels = None if temperature is None or k >= n_items else np.empty(n_bank)

  def put(self, rows, deep_scores, deep_index):
    """Rows ``rows`` from their top-``depth`` results (top k first; any order after)."""
    if (deep_index[:, :self.k] < 0).any():
      raise UserError(f"some bank queries' scanned lists hold fewer than top_k = {self.k} "
                      "items; raise --nprobe or lower --top_k")
    if self.levels is not None:
      self.levels[rows] = sparse.omitted_level(deep_scores, deep_index, self.k,
                                               self.n_items, self.scale)
    self.scores[rows] = deep_scores[:, :self.k]
    self.index[rows] = deep_index[:, :self.k]
    self.tiers[rows] = deep_scores[:, self.ranks - 1]


def _exact_search(bank, gallery, out: _Rows, depth: int, progress, start) -> None:
  import faiss  # pylint: disable=g-import-not-at-top
  index = faiss.IndexFlatIP(gallery.shape[1])
  for block, valid in streaming.host_chunks(gallery, _SEARCH_ROWS):
    index.add(block[valid])
  n_bank, scan_start = bank.shape[0], time.monotonic()
  for first in range(0, n_bank, _SEARCH_ROWS):
    block = np.ascontiguousarray(bank[first:first + _SEARCH_ROWS], np.float32)
    rows = slice(first, first + len(block))
    out.put(rows, *index.search(block, depth))
    if progress:
      progress(f"top-{out.k} search: {rows.stop}/{n_bank} bank queries "
               f"({time.monotonic() - start:.1f} s{time_left(rows.stop, n_bank, scan_start)})")


def _nearest_lists(bank, centroids, nprobe: int) -> np.ndarray:
  """[Nb, nprobe] int32: each query's nprobe lists of largest centroid score, nearest first."""
  out = np.empty((bank.shape[0], nprobe), np.int32)
  for first in range(0, bank.shape[0], _SEARCH_ROWS):
    block = np.asarray(bank[first:first + _SEARCH_ROWS], np.float32)
    scores = block @ centroids.T
    top = np.argpartition(-scores, nprobe - 1, axis=1)[:, :nprobe]
    order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
    out[first:first + len(block)] = np.take_along_axis(top, order, axis=1)
  return out


def _ivf_search(bank, gallery, out: _Rows, depth: int, nlist: int, nprobe: int, progress,
                start) -> tuple[np.ndarray, IvfLists]:
  """Inverted lists, scanned in batches of queries that share their nearest list.

  FAISS's k-means makes the lists. Each query's nearest ``nprobe`` lists are found; queries
  are grouped by their nearest list (batches of at most ``_IVF_BATCH``), and each batch scans
  the union of its members' lists (at most ``_IVF_UNION`` x ``nprobe`` lists, the most often
  wanted first) with one matrix product, so the items are read once per batch, not once per
  query as FAISS's own IVF scan does (memory-bound: ~3x slower here). Every query's top-k is
  exact within its batch's lists, which the result records for the bound.

  Returns:
    ([Nb] int32 batch of each query, the lists with ``scanned`` filled in).
  """
  t0 = time.monotonic()
  lists = _ivf_lists(gallery, nlist)
  items_by_list = np.argsort(lists.assignment, kind="stable")
  list_end = np.cumsum(np.bincount(lists.assignment, minlength=nlist))
  list_start = list_end - np.bincount(lists.assignment, minlength=nlist)
  sorted_items = np.ascontiguousarray(np.asarray(gallery, np.float32)[items_by_list])
  nearest = _nearest_lists(bank, lists.centroids, nprobe)
  if progress:
    progress(f"ivf lists: {nlist}, each query's {nprobe} nearest found "
             f"({time.monotonic() - t0:.1f} s)")
  by_nearest = np.argsort(nearest[:, 0], kind="stable")
  group_end = np.cumsum(np.bincount(nearest[:, 0], minlength=nlist))
  batch_of = np.empty(bank.shape[0], np.int32)
  scanned = []
  done, reported, n_bank = 0, time.monotonic(), bank.shape[0]
  scan_start = reported
  for group in range(nlist):
    members = by_nearest[group_end[group - 1] if group else 0:group_end[group]]
    for first in range(0, len(members), _IVF_BATCH):
      rows = np.sort(members[first:first + _IVF_BATCH])
      wanted, counts = np.unique(nearest[rows], return_counts=True)
      chosen = wanted[np.argsort(-counts, kind="stable")[:_IVF_UNION * nprobe]]
      mask = np.zeros(nlist, bool)
      mask[chosen] = True
      positions = np.concatenate([np.arange(list_start[c], list_end[c]) for c in chosen])
      queries = np.asarray(bank[rows], np.float32)   # sorted rows: one memmap read each
      similarities = queries @ sorted_items[positions].T
      top, top_positions = _select(similarities, None, out.k, out.ranks, depth)
      ids = np.where(top_positions >= 0, items_by_list[positions][top_positions], -1)
      out.put(rows, top, ids.astype(np.int32))
      batch_of[rows] = len(scanned)
      scanned.append(mask)
      done += len(rows)
      if progress and time.monotonic() - reported >= 10:
        reported = time.monotonic()
        progress(f"top-{out.k} ivf search: {done}/{n_bank} bank queries "
                 f"({reported - start:.1f} s{time_left(done, n_bank, scan_start)})")
  return batch_of, lists._replace(scanned=np.stack(scanned))


def top_k_items(bank, gallery, k: int, *, search: str = "exact", nlist: int | None = None,
                nprobe: int | None = None, temperature: float | None = None,
                progress: Callable[[str], None] | None = None) -> TopK:
  """Each bank query's ``k`` most similar gallery items.

  ``search="exact"``: a FAISS flat inner-product search, the exact top ``k`` (one pass of
  ``2 Nb Ng D`` FLOP). ``search="ivf"``: inverted lists (``nlist``; FAISS k-means) scanned in
  batches of queries that share their nearest list, each batch scanning its members' ``nprobe``
  nearest lists (:func:`_ivf_search`): the exact top ``k`` of the scanned lists at a fraction
  of the cost; the result records what each query scanned so that the omitted-mass bound can
  cover the rest.

  The search goes ``2**_TIERS`` times deeper (or to the gallery size) and keeps, besides the
  top ``k``, the score at ranks ``2k, 4k, ...``: the omitted (scanned) items below each such
  rank score at most that much, which :func:`ncl_jax.gallery.sparse.omitted_mass_bound` uses.

  Args:
    bank: [Nb, D] queries (array or memmap, read in chunks).
    gallery: [Ng, D] items.
    k: items per query, ``1 <= k <= Ng``.
    search: "exact" or "ivf".
    nlist, nprobe: ivf settings (default :func:`ivf_settings`).
    temperature: when given, also each row's :func:`ncl_jax.gallery.sparse.omitted_level`.
    progress: called with progress lines.
  """
  if search not in SEARCH_KINDS:
    raise UserError(f"search must be one of {SEARCH_KINDS}, got {search!r}")
  n_bank, n_items = bank.shape[0], gallery.shape[0]
  ranks = tier_ranks(k, n_items)
  depth = int(ranks[-1]) if len(ranks) else k
  out = _Rows(n_bank, n_items, k, ranks, temperature)
  start = time.monotonic()
  batch_of = lists = None
  if search == "exact":
    _exact_search(bank, gallery, out, depth, progress, start)
  else:
    nlist, nprobe = ivf_settings(n_items, nlist, nprobe)
    batch_of, lists = _ivf_search(bank, gallery, out, depth, nlist, nprobe, progress, start)
  return TopK(out.scores, out.index, out.tiers, ranks, batch_of, lists, out.levels)

