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
  search (:mod:`ncl_jax.gallery.search`; exact: one pass of ``2 Nb Ng D`` FLOP; or ivf: the
  exact top-K of the inverted lists it scans, at a fraction of that), and NCL is solved on a
  matrix stored in ``Nb K`` numbers (:mod:`ncl_jax.gallery.sparse`): the kept scores, and for
  the omitted items of a row the mass its deeper search saw below rank K, at ``Nb K`` work per
  pass. The probability each row's true softmax puts outside its kept items is bounded; the
  dense problem's column error is then at most the solved one plus twice the mean of the larger
  of that bound and the solved plan's own omitted probability, and the result only claims
  convergence when that certified error meets ``tol``.

Inputs are numpy arrays or ``np.load(..., mmap_mode="r")`` memmaps of float32 or float16
L2-normalised rows (:mod:`ncl_jax.gallery.inputs` checks files).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from ncl_jax import normalize
from ncl_jax import sharding as sharding_lib
from ncl_jax.errors import UserError
from ncl_jax.gallery import search as search_lib
from ncl_jax.gallery import sparse, tiles

# A device's tile (bank rows x its items) holds about this many float32 entries (32 MiB).
_TILE_ELEMENTS = 1 << 23
# Bank rows per chunk stay within these bounds: enough rows that a chunk's matmul reads the
# items once for many rows, few enough that the chunk itself stays small.
_MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS = 64, 4096

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


def sparse_biases(bank, gallery, *, temperature: float, top_k: int, col_marginals=None,
                  tol: float = 1e-4, max_iterations: int = 1000, anderson: int = 8,
                  search: str = "exact", nlist: int | None = None, nprobe: int | None = None,
                  progress: Progress | None = None) -> Solution:
  """NCL biases from each bank query's top-``top_k`` items, with a certified error.

  The solve keeps each row's ``top_k`` scores and gives its omitted items, together, the mass
  its deeper search saw below rank ``top_k`` (:func:`ncl_jax.gallery.sparse.omitted_level`),
  spread in proportion to ``exp(g_j)``. Then it bounds the probability each row's true softmax
  puts outside its kept items (:func:`ncl_jax.gallery.sparse.omitted_mass_bound`, plus the
  unscanned lists after an ivf search) and certifies the dense problem's column error as at most the solved one plus
  twice the mean of ``max(bound, the solved plan's own omitted probability)``.

  Args:
    bank, gallery, temperature, col_marginals, tol, max_iterations, anderson: see
      :func:`dense_biases`.
    top_k: items kept per bank query, ``1 <= top_k < Ng``.
    search, nlist, nprobe: the top-k search (:func:`ncl_jax.gallery.search.top_k_items`):
      "exact" (flat), or "ivf" (scans ``nprobe`` of ``nlist`` lists per query: much faster on big galleries, exact
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
  found = search_lib.top_k_items(bank, gallery, top_k, search=search, nlist=nlist,
                                 nprobe=nprobe, temperature=temperature, progress=progress)
  scale = 1.0 / temperature
  plan = sparse.SparsePlan(found.scores, found.index, found.omitted_level, n_items, scale)
  b = normalize.balanced_marginals(col_marginals, n_bank, n_items)
  counted, passes = _counting(plan, progress, start)
  out = normalize.column_fixed_point(lambda g: counted(g, b), b, tol=tol,
                                     max_iterations=max_iterations, anderson=anderson)
  gap = sparse.worst_case_gap(bank, found, out.bias, scale, n_items)
  certified = out.error + gap.gap
  return Solution(out.bias, "sparse", out.iterations, out.error, certified, tol,
                  certified <= tol, passes[0] + 1, time.monotonic() - start, top_k=top_k,
                  omitted_mass_bound=gap.bound_max, omitted_mass_mean=gap.bound_mean,
                  search=search)
