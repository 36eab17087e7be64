"""NCL candidate biases for large galleries from embeddings: dense on a device mesh, or sparse.

Both modes solve the same problem as :func:`ncl_jax.normalize.ncl_biases` on the matrix
``bank @ gallery.T`` (biases ``g`` [n_items] with which every item receives its target share of
the bank's summed retrieval probability), without ever storing that matrix, and share its
Anderson-accelerated update loop (:func:`ncl_jax.normalize.column_fixed_point`).

* **Dense** (:func:`dense_biases`): the gallery's rows are split over the devices of a 1-D mesh
  (axis ``"data"``, :mod:`ncl_jax.sharding`), across processes under ``jax.distributed``, where
  each process reads only the rows of its own devices. The bank is streamed from the host in row
  chunks, replicated to every device. Per chunk, each device scores the chunk against its items
  (:mod:`ncl_jax.gallery.tiles`), the row normalisers over the whole gallery are combined with
  one ``pmax`` and one ``psum`` of [chunk] vectors, and the column sums stay on their device. One
  pass over the bank costs ``2 Nb Ng D`` FLOP and ``Nb Ng`` exp, split over the devices.
* **Sparse** (:func:`sparse_biases`): each bank query keeps its top-K items from a FAISS
  search (exact: one pass of ``2 Nb Ng D`` FLOP; or ivf: the exact top-K of the inverted lists
  it scans, at a fraction of that), and NCL is solved on a matrix stored in ``Nb K`` numbers:
  the kept scores, and for the omitted items of a row the mass its deeper search saw below rank
  K (:func:`omitted_level`; :class:`SparsePlan`), at ``Nb K`` work per pass. The probability each row's true softmax puts outside its kept items is bounded
  (:func:`ncl_jax.gallery.tiles.omitted_mass_bound`, plus :func:`unscanned_log_mass` after an
  ivf search); the dense problem's column error is then at most the solved one plus twice the
  mean of the larger of that bound and the solved plan's own omitted probability, and the
  result only claims convergence when that certified error meets ``tol``.

Inputs are numpy arrays or ``np.load(..., mmap_mode="r")`` memmaps of float32 or float16
L2-normalised rows (:mod:`ncl_jax.gallery.inputs` checks files).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ncl_jax import normalize
from ncl_jax import sharding as sharding_lib
from ncl_jax.errors import UserError
from ncl_jax.gallery import tiles

# A device's tile (bank rows x its items) holds about this many float32 entries (32 MiB).
_TILE_ELEMENTS = 1 << 23
# Bank rows per chunk stay within these bounds: enough rows that a chunk's matmul reads the
# items once for many rows, few enough that the chunk itself stays small.
_MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS = 64, 4096
# Bank rows per FAISS search call and per sparse update chunk.
_SEARCH_ROWS = 16384
_SPARSE_ROWS = 65536
# ivf search: queries per batch, and lists a batch scans (this many times nprobe at most).
_IVF_BATCH = 2048
_IVF_UNION = 8
# The top-k search goes 2**_TIERS times deeper to bound the omitted items' scores in tiers.
_TIERS = 3
# Rows may deviate from unit norm by the accepted tolerance (ncl_jax.gallery.inputs), which
# scales a dot product's rounding error by up to (1 + 1e-2)^2; 1.1 covers it with room.
_NORM_SLACK = 1.1

Progress = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class Solution:
  """Biases and how they were obtained.

  Attributes:
    bias: [n_items] float32 biases (defined up to a common constant).
    mode: "dense" or "sparse".
    iterations: bias updates (Sinkhorn/Anderson steps).
    error: relative L1 column error of the problem solved (the sparse one in sparse mode).
    certified_error: an upper bound on the dense problem's relative L1 column error: ``error``
      in dense mode; in sparse mode ``error + 2 * mean over rows of max(omitted-mass bound,
      the solved plan's omitted probability)``.
    tol: the requested tolerance.
    converged: ``certified_error <= tol``.
    passes: passes over the bank (column-sum evaluations; sparse mode adds its one search).
    seconds: wall time.
    top_k: kept items per bank query (sparse mode) or None.
    omitted_mass_bound: sparse mode: the largest per-query bound on the probability outside
      the kept items (None in dense mode).
    omitted_mass_mean: sparse mode: the mean of those bounds.
    devices, processes: the mesh it ran on (dense mode; 1 and 1 in sparse mode).
    search: sparse mode: the top-k search, "exact" or "ivf" (None in dense mode).
  """

  bias: np.ndarray
  mode: str
  iterations: int
  error: float
  certified_error: float
  tol: float
  converged: bool
  passes: int
  seconds: float
  top_k: int | None = None
  omitted_mass_bound: float | None = None
  omitted_mass_mean: float | None = None
  devices: int = 1
  processes: int = 1
  search: str | None = None

  def biases(self) -> normalize.Biases:
    """The result as :class:`ncl_jax.normalize.Biases`."""
    return normalize.Biases(self.bias, self.iterations, self.error)

  def report(self) -> dict:
    """Everything but the biases, JSON-ready."""
    out = dataclasses.asdict(self)
    del out["bias"]
    return out


def _check_shapes(bank, gallery, top_k: int | None = None) -> None:
  if bank.ndim != 2 or gallery.ndim != 2 or 0 in bank.shape or 0 in gallery.shape:
    raise UserError(f"bank and gallery must be non-empty [N, D] arrays, got {bank.shape} and "
                    f"{gallery.shape}")
  if bank.shape[1] != gallery.shape[1]:
    raise UserError(f"the bank has dimension {bank.shape[1]} but the gallery {gallery.shape[1]}; "
                    "embed both with the same model")
  if top_k is not None and not 1 <= top_k < gallery.shape[0]:
    raise UserError(f"top_k must lie in [1, {gallery.shape[0] - 1}] (below the gallery size "
                    f"{gallery.shape[0]}), got {top_k}; without top_k the dense mode is exact")


def _counting(column_mass, progress: Progress | None, start: float):
  """Wraps ``column_mass`` to count passes and report each one's error."""
  calls = [0]

  def wrapped(g, b):
    colsum = column_mass(g)
    calls[0] += 1
    if progress:
      error = np.abs(colsum - b).sum() / b.sum()
      progress(f"pass {calls[0]}: column error {error:.3g} ({time.monotonic() - start:.1f} s)")
    return colsum

  return wrapped, calls


# -- dense mode ------------------------------------------------------------------------------


def _chunk_rows(n_local_items: int, chunk_rows: int | None) -> int:
  if chunk_rows:
    return chunk_rows
  rows = _TILE_ELEMENTS // max(n_local_items, 1) // 16 * 16
  return int(min(max(rows, _MIN_CHUNK_ROWS), _MAX_CHUNK_ROWS))


def _sharded_rows(array, padded_rows: int, sharding: NamedSharding, fill=0):
  """A global [padded_rows, ...] array from host rows; each process reads only its devices'.

  Rows past ``len(array)`` are ``fill``. ``array`` may be a memmap: only the addressed rows are
  read.
  """
  n = array.shape[0]

  def rows(index):
    window = index[0]
    start, stop = window.start or 0, padded_rows if window.stop is None else window.stop
    block = np.full((stop - start,) + tuple(array.shape[1:]), fill, np.float32)
    real = max(0, min(stop, n) - start)
    block[:real] = array[start:start + real]
    return block

  return jax.make_array_from_callback((padded_rows,) + tuple(array.shape[1:]), sharding, rows)


@functools.lru_cache(maxsize=None)
def _dense_step(mesh):
  """Jitted ``total + column sums of one bank chunk``, the items split over ``mesh``."""
  axis = sharding_lib.DATA_AXIS

  def local(queries, row_valid, items, item_valid, bias, scale):
    logits = tiles.scores(queries, items, scale, bias, item_valid)
    peak = jax.lax.pmax(tiles.row_peak(logits), axis)
    e, local_total = tiles.shifted_exp(logits, peak)
    return tiles.weighted_column_sum(e, jax.lax.psum(local_total, axis), row_valid)

  chunk_mass = jax.shard_map(
      local, mesh=mesh, in_specs=(P(), P(), P(axis), P(axis), P(axis), P()),
      out_specs=P(axis))

  def step(total, *args):
    return total + chunk_mass(*args)

  return jax.jit(step, donate_argnums=0)


def dense_biases(bank, gallery, *, temperature: float, col_marginals=None, tol: float = 1e-4,
                 max_iterations: int = 1000, anderson: int = 8, chunk_rows: int | None = None,
                 mesh=None, progress: Progress | None = None) -> Solution:
  """Exact NCL biases from embeddings, the gallery split over a device mesh.

  Args:
    bank: [Nb, D] L2-normalised bank query embeddings (array or memmap; every process reads
      all of it, one chunk at a time).
    gallery: [Ng, D] L2-normalised gallery embeddings (each process reads only its devices'
      rows).
    temperature: logits are ``bank @ gallery.T / temperature``.
    col_marginals: [Ng] positive target shares (default uniform).
    tol, max_iterations, anderson: see :func:`ncl_jax.normalize.streamed_ncl_biases`.
    chunk_rows: bank rows per chunk (default: a ~32 MiB tile per device).
    mesh: a 1-D mesh with axis ``"data"`` (default: all devices,
      :func:`ncl_jax.sharding.make_mesh`).
    progress: called with one line per pass.

  Returns:
    :class:`Solution` (mode "dense"), identical on every process.
  """
  _check_shapes(bank, gallery)
  start = time.monotonic()
  mesh = sharding_lib.make_mesh() if mesh is None else mesh
  n_bank, n_items = bank.shape[0], gallery.shape[0]
  n_devices = mesh.devices.size
  padded = -(-n_items // n_devices) * n_devices
  split = sharding_lib.batch_sharded(mesh)
  items = _sharded_rows(gallery, padded, split)
  item_valid = jax.make_array_from_callback(
      (padded,), split, lambda index: np.arange(padded)[index] < n_items)
  rows = _chunk_rows(padded // n_devices, chunk_rows)
  step = _dense_step(mesh)
  scale = sharding_lib.put_replicated(np.float32(1.0 / temperature), mesh)
  b = normalize.balanced_marginals(col_marginals, n_bank, n_items)

  def column_mass(g):
    bias = _sharded_rows(np.asarray(g, np.float32), padded, split)
    total = _sharded_rows(np.zeros(0, np.float32), padded, split)
    for block, valid in normalize.host_chunks(bank, rows):
      queries, row_valid = sharding_lib.put_replicated((block, valid), mesh)
      total = step(total, queries, row_valid, items, item_valid, bias, scale)
    return np.asarray(sharding_lib.to_host(total), np.float64)[:n_items]

  counted, passes = _counting(column_mass, progress, start)
  out = normalize.column_fixed_point(lambda g: counted(g, b), b, tol=tol,
                                     max_iterations=max_iterations, anderson=anderson)
  return Solution(out.bias, "dense", out.iterations, out.error, out.error, tol,
                  out.error <= tol, passes[0], time.monotonic() - start,
                  devices=n_devices, processes=jax.process_count())


# -- sparse mode -----------------------------------------------------------------------------


class IvfLists(NamedTuple):
  """The inverted lists of an approximate top-k search, enough to bound what it did not scan.

  Attributes:
    centroids: [nlist, D] float32 list centres.
    radius: [nlist] float64, the largest ``|v - c|`` over each list's items: an item ``v`` of
      list ``c`` scores ``q.v <= q.c + radius_c`` for any unit query ``q``.
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
      omitted item of a row (:func:`omitted_level`).
  """

  scores: np.ndarray
  index: np.ndarray
  tier_scores: np.ndarray
  tier_ranks: np.ndarray
  scan_batch: np.ndarray | None = None
  lists: IvfLists | None = None
  omitted_level: np.ndarray | None = None


SEARCH_KINDS = ("exact", "ivf")


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
      self.levels[rows] = omitted_level(deep_scores, deep_index, self.k, self.n_items,
                                        self.scale)
    self.scores[rows] = deep_scores[:, :self.k]
    self.index[rows] = deep_index[:, :self.k]
    self.tiers[rows] = deep_scores[:, self.ranks - 1]


def _exact_search(bank, gallery, out: _Rows, depth: int, progress, start) -> None:
  import faiss  # pylint: disable=g-import-not-at-top
  index = faiss.IndexFlatIP(gallery.shape[1])
  for block, valid in normalize.host_chunks(gallery, _SEARCH_ROWS):
    index.add(block[valid])
  n_bank = bank.shape[0]
  for first in range(0, n_bank, _SEARCH_ROWS):
    block = np.ascontiguousarray(bank[first:first + _SEARCH_ROWS], np.float32)
    rows = slice(first, first + len(block))
    out.put(rows, *index.search(block, depth))
    if progress:
      progress(f"top-{out.k} search: {rows.stop}/{n_bank} bank queries "
               f"({time.monotonic() - start:.1f} s)")


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
                 f"({reported - start:.1f} s)")
  return batch_of, lists._replace(scanned=np.stack(scanned))


def top_k_items(bank, gallery, k: int, *, search: str = "exact", nlist: int | None = None,
                nprobe: int | None = None, temperature: float | None = None,
                progress: Progress | None = None) -> TopK:
  """Each bank query's ``k`` most similar gallery items.

  ``search="exact"``: a FAISS flat inner-product search, the exact top ``k`` (one pass of
  ``2 Nb Ng D`` FLOP). ``search="ivf"``: inverted lists (``nlist``; FAISS k-means) scanned in
  batches of queries that share their nearest list, each batch scanning its members' ``nprobe``
  nearest lists (:func:`_ivf_search`): the exact top ``k`` of the scanned lists at a fraction
  of the cost; the result records what each query scanned so that the omitted-mass bound can
  cover the rest.

  The search goes ``2**_TIERS`` times deeper (or to the gallery size) and keeps, besides the
  top ``k``, the score at ranks ``2k, 4k, ...``: the omitted (scanned) items below each such
  rank score at most that much, which :func:`ncl_jax.gallery.tiles.omitted_mass_bound` uses.

  Args:
    bank: [Nb, D] queries (array or memmap, read in chunks).
    gallery: [Ng, D] items.
    k: items per query, ``1 <= k <= Ng``.
    search: "exact" or "ivf".
    nlist, nprobe: ivf settings (default :func:`ivf_settings`).
    temperature: when given, also each row's :func:`omitted_level`.
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


def unscanned_log_mass(block, scanned, lists: IvfLists, scale: float, bias,
                       score_error: float) -> np.ndarray:
  """log of an upper bound on ``sum exp(scale q.v_j + g_j - max g)`` over the items of the
  lists a query did not scan, [r]: an item of list ``c`` scores at most ``q.c + radius_c``.

  Args:
    block: [r, D] the queries.
    scanned: [r, nlist] bool, the lists each one scanned.
    lists: :class:`IvfLists`.
    scale: ``1 / temperature``.
    bias: [Ng] biases.
    score_error: rounding allowance per score.
  """
  g = np.asarray(bias, np.float64)
  per_list = np.bincount(lists.assignment, np.exp(g - g.max()), minlength=len(lists.radius))
  caps = np.asarray(block, np.float64) @ lists.centroids.T.astype(np.float64)
  logits = (caps + lists.radius + score_error) * scale + np.log(np.maximum(per_list, 1e-300))
  logits[:, per_list == 0] = -np.inf     # empty lists hold nothing
  logits[np.asarray(scanned, bool)] = -np.inf
  peak = logits.max(axis=1)
  finite = np.isfinite(peak)
  out = np.full(len(logits), -np.inf)
  out[finite] = peak[finite] + np.log(
      np.exp(logits[finite] - peak[finite, None]).sum(axis=1))
  return out


@jax.jit
def _sparse_row_probs(scores, index, level, log_rest, bias, scale):
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
    import scipy.sparse  # pylint: disable=g-import-not-at-top  (a JAX dependency)
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
      probs, weight = _sparse_row_probs(
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
  import scipy.sparse  # pylint: disable=g-import-not-at-top
  filled = scipy.sparse.csr_matrix((values.ravel(), pattern.indices, pattern.indptr),
                                   shape=pattern.shape)
  return filled.T @ np.ones(pattern.shape[0])


def sparse_biases(bank, gallery, *, temperature: float, top_k: int, col_marginals=None,
                  tol: float = 1e-4, max_iterations: int = 1000, anderson: int = 8,
                  search: str = "exact", nlist: int | None = None, nprobe: int | None = None,
                  progress: Progress | None = None) -> Solution:
  """NCL biases from each bank query's top-``top_k`` items, with a certified error.

  The solve keeps each row's ``top_k`` scores and gives its omitted items, together, the mass
  its deeper search saw below rank ``top_k`` (:func:`omitted_level`), spread in proportion to
  ``exp(g_j)``. Then it bounds the probability each row's true softmax puts outside its kept
  items (:func:`ncl_jax.gallery.tiles.omitted_mass_bound`, plus the unscanned lists after an
  ivf search) and certifies the dense problem's column error as at most the solved one plus
  twice the mean of ``max(bound, the solved plan's own omitted probability)``.

  Args:
    bank, gallery, temperature, col_marginals, tol, max_iterations, anderson: see
      :func:`dense_biases`.
    top_k: items kept per bank query, ``1 <= top_k < Ng``.
    search, nlist, nprobe: the top-k search (:func:`top_k_items`): "exact" (flat), or "ivf"
      (scans ``nprobe`` of ``nlist`` lists per query: much faster on big galleries, exact
      within the scanned lists, and the bound still covers the rest, more loosely).
    progress: called with one line per search chunk and per pass.

  Returns:
    :class:`Solution` (mode "sparse"). ``converged`` is False when the certified error does
    not meet ``tol`` even if the sparse problem did: widen ``top_k`` (or ``nprobe``) then.
  """
  _check_shapes(bank, gallery, top_k)
  if jax.process_count() > 1:
    raise UserError("sparse mode runs in one process; drop the multi-process flags, or use the "
                    "dense mode to split the gallery over hosts")
  start = time.monotonic()
  n_bank, n_items = bank.shape[0], gallery.shape[0]
  found = top_k_items(bank, gallery, top_k, search=search, nlist=nlist, nprobe=nprobe,
                      temperature=temperature, progress=progress)
  scores, kept, levels = found.scores, found.index, found.omitted_level
  scale = 1.0 / temperature
  b = normalize.balanced_marginals(col_marginals, n_bank, n_items)

  counted, passes = _counting(SparsePlan(scores, kept, levels, n_items, scale), progress, start)
  out = normalize.column_fixed_point(lambda g: counted(g, b), b, tol=tol,
                                     max_iterations=max_iterations, anderson=anderson)
  bound_max, bound_sum, gap_sum = 0.0, 0.0, 0.0
  error_per_score = tiles.float32_score_error(bank.shape[1]) * _NORM_SLACK
  bound_rows = _SPARSE_ROWS // 8   # the ivf term holds [rows, nlist] float64 arrays
  for first in range(0, n_bank, bound_rows):
    rows = slice(first, first + bound_rows)
    unscanned = None
    if found.lists is not None:
      scanned = found.lists.scanned[found.scan_batch[rows]]
      unscanned = unscanned_log_mass(bank[rows], scanned, found.lists, scale, out.bias,
                                     error_per_score)
    bound = tiles.omitted_mass_bound(scores[rows], kept[rows], scale, out.bias, n_items,
                                     error_per_score, found.tier_scores[rows],
                                     found.tier_ranks, unscanned)
    # The true and the solved plan differ only outside the kept items: per row by at most
    # twice the larger of their omitted probabilities.
    solved = tiles.solved_omitted_probability(scores[rows], kept[rows], scale, out.bias,
                                              n_items, levels[rows])
    bound_max, bound_sum = max(bound_max, float(bound.max())), bound_sum + float(bound.sum())
    gap_sum += float(np.maximum(bound, solved).sum())
  certified = out.error + 2.0 * gap_sum / n_bank
  return Solution(out.bias, "sparse", out.iterations, out.error, certified, tol,
                  certified <= tol, passes[0] + 1, time.monotonic() - start, top_k=top_k,
                  omitted_mass_bound=bound_max, omitted_mass_mean=bound_sum / n_bank,
                  search=search)
