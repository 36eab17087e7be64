"""NCL candidate biases for large galleries from embeddings: dense on a device mesh, or sparse.

Both modes solve the same problem as :func:`ncl_jax.normalize.ncl_biases` on the matrix
``bank @ gallery.T`` (biases ``g`` [n_items] with which every item receives its target share of
the bank's summed retrieval probability), without ever storing that matrix, and share its
Anderson-accelerated update loop (:func:`ncl_jax.streaming.column_fixed_point`).

* **Dense** (:func:`dense_biases`, :mod:`ncl_jax.gallery.dense`): the gallery's rows are split
  over the devices of a mesh, across processes under ``jax.distributed``, where each process
  reads only the rows of its own devices; with ``bank_groups`` G > 1 the bank's rows are split
  over G groups of devices too, each streaming only its rows, combined by one all-reduce of the
  column sums per pass. Per chunk of bank rows, each device scores it against its items
  (:mod:`ncl_jax.gallery.tiles`), and the row normalisers over the whole gallery are combined
  with one ``pmax`` and one ``psum`` of [chunk] vectors. One pass over the bank costs
  ``2 Nb Ng D`` FLOP and ``Nb Ng`` exp, split over the devices.
* **Sparse** (:func:`sparse_biases`): each bank query keeps its top-K items from a FAISS
  search (:mod:`ncl_jax.gallery.search`; exact: one pass of ``2 Nb Ng D`` FLOP; or ivf: the
  exact top-K of the inverted lists it scans, at a fraction of that), and NCL is solved on a
  matrix stored in ``Nb K`` numbers (:mod:`ncl_jax.gallery.sparse`): the kept scores, and for
  the omitted items of a row the mass its deeper search saw below rank K, at ``Nb K`` work per
  pass. The dense problem's column error is certified twice: for every row in the worst case
  (the probability each row's true softmax puts outside its kept items is bounded), and from a
  seeded sample of rows scored exactly, at a chosen confidence; the result only claims
  convergence when the chosen certificate meets ``tol``.

Inputs are numpy arrays or ``np.load(..., mmap_mode="r")`` memmaps of float32 or float16
L2-normalised rows (:mod:`ncl_jax.gallery.inputs` checks files).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

from ncl_jax import sharding as sharding_lib
from ncl_jax import streaming
from ncl_jax.errors import UserError
from ncl_jax.gallery import search as search_lib
from ncl_jax.gallery import dense, sparse, sparse_mesh

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
      in dense mode (of the problem on float32 scores: exact scores can move a row by at most
      :func:`ncl_jax.gallery.sparse.kept_rounding_gap` in L1); in sparse mode ``error + 2 *
      mean over rows of max(omitted-mass bound, the solved plan's omitted probability)`` plus
      the float32 rounding of the kept scores (:func:`ncl_jax.gallery.sparse.worst_case_gap`).
    tol: the requested tolerance.
    converged: ``certified_error <= tol`` (``sampled_certified_error <= tol`` when
      ``certify == "sampled"``).
    passes: passes over the bank (column-sum evaluations; sparse mode adds its one search).
    seconds: wall time.
    top_k: kept items per bank query (sparse mode) or None.
    omitted_mass_bound: sparse mode: the largest per-query bound on the probability outside
      the kept items (None in dense mode).
    omitted_mass_mean: sparse mode: the mean of those bounds.
    devices, processes: the mesh it ran on (sparse mode: its plan's devices; the processes
      that split the bank's rows).
    bank_groups: dense mode: the groups of devices the bank's rows were split over.
    search: sparse mode: the top-k search, "exact" or "ivf" (None in dense mode).
    sampled_certified_error: sparse mode: ``error`` plus an upper confidence bound on the mean
      over bank rows of the L1 distance between the true softmax row and the solved one, from
      ``sample_rows`` rows drawn with ``sample_seed`` and scored exactly; it holds with
      probability ``confidence`` (:func:`ncl_jax.gallery.sparse.sampled_gap`). None when not
      computed.
    confidence, sample_rows, sample_seed: that bound's probability and its sample.
    sampled_omitted_mass_mean: the sampled rows' mean true probability outside their kept
      items (a row's distance to the plan is up to twice it: raise ``top_k`` to shrink it).
    certify: sparse mode: which certificate ``converged`` rests on, "worst_case" or "sampled".
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
  bank_groups: int = 1
  search: str | None = None
  sampled_certified_error: float | None = None
  confidence: float | None = None
  sample_rows: int | None = None
  sample_seed: int | None = None
  sampled_omitted_mass_mean: float | None = None
  certify: str | None = None

  def biases(self) -> streaming.Biases:
    """The result as :class:`ncl_jax.streaming.Biases`."""
    return streaming.Biases(self.bias, self.iterations, self.error)

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


def _counting(column_mass, progress: Progress | None, start: float, tol: float,
              max_iterations: int):
  """Wraps ``column_mass`` to count passes and report each one's error and time left."""
  calls, errors, first = [0], [], time.monotonic()

  def wrapped(g, b):
    colsum = column_mass(g)
    calls[0] += 1
    if progress:
      errors.append(streaming.column_error(colsum, b))
      left = _passes_left(errors, tol, max_iterations + 1 - calls[0])
      eta = "" if left is None else f", ~{left * (time.monotonic() - first) / calls[0]:.0f} s left"
      progress(f"pass {calls[0]}: column error {errors[-1]:.3g} "
               f"({time.monotonic() - start:.1f} s{eta})")
    return colsum

  return wrapped, calls


def _say(progress: Progress | None, line: str, start: float) -> None:
  if progress:
    progress(f"{line} ({time.monotonic() - start:.1f} s)")


def _passes_left(errors, tol: float, budget: int) -> int | None:
  """Passes until the column error meets ``tol`` if it keeps its geometric rate over the last
  passes (at most ``budget``); None while that rate is unknown or not decreasing."""
  if errors[-1] <= tol:
    return 0
  if tol <= 0:
    return budget
  recent = errors[-4:]
  if len(recent) < 2 or not 0 < recent[-1] < recent[0]:
    return None
  rate = (recent[-1] / recent[0]) ** (1.0 / (len(recent) - 1))
  return int(min(np.ceil(np.log(tol / recent[-1]) / np.log(rate)), budget))


# -- dense mode ------------------------------------------------------------------------------


def dense_biases(bank, gallery, *, temperature: float, col_marginals=None, tol: float = 1e-4,
                 max_iterations: int = 1000, anderson: int = 8, chunk_rows: int | None = None,
                 mesh=None, bank_groups: int = 1, initial_bias=None,
                 progress: Progress | None = None) -> Solution:
  """Exact NCL biases from embeddings, the gallery split over a device mesh (and the bank's
  rows over groups of devices: :mod:`ncl_jax.gallery.dense`).

  Args:
    bank: [Nb, D] L2-normalised bank query embeddings (array or memmap; every process reads
      its bank group's rows, one chunk at a time).
    gallery: [Ng, D] L2-normalised gallery embeddings (each process reads only its devices'
      rows).
    temperature: logits are ``bank @ gallery.T / temperature``.
    col_marginals: [Ng] positive target shares (default uniform).
    tol, max_iterations, anderson: see :func:`ncl_jax.normalize.streamed_ncl_biases`.
    chunk_rows: bank rows per chunk (default: a ~32 MiB tile per device).
    mesh: a 1-D mesh with axis ``"data"`` (:func:`ncl_jax.sharding.make_mesh`) or a 2-D one
      with axes ``("bank", "data")`` (:func:`ncl_jax.gallery.dense.make_mesh`); default: all
      devices in ``bank_groups`` groups.
    bank_groups: without ``mesh``: groups of devices that split the bank's rows (one
      all-reduce of the column sums per pass combines them); 1: every device streams the
      whole bank.
    initial_bias: [Ng] biases to start from, e.g. a sparse solution (:func:`sparse_biases`):
      the same fixed point, in fewer passes when they are close to it (38 instead of 58 to a
      column error of 1e-2 on the benchmark data at 1e5 x 1e4, docs/galleries.md).
    progress: called with one line per pass.

  Returns:
    :class:`Solution` (mode "dense"), identical on every process.
  """
  _check_shapes(bank, gallery)
  start = time.monotonic()
  mesh = dense.make_mesh(bank_groups) if mesh is None else mesh
  column_mass = dense.DenseColumnMass(bank, gallery, 1.0 / temperature, mesh, chunk_rows)
  b = streaming.balanced_marginals(col_marginals, bank.shape[0], gallery.shape[0])
  counted, passes = _counting(column_mass, progress, start, tol, max_iterations)
  out = streaming.column_fixed_point(lambda g: counted(g, b), b, tol=tol,
                                     max_iterations=max_iterations, anderson=anderson,
                                     initial=initial_bias)
  return Solution(out.bias, "dense", out.iterations, out.error, out.error, tol,
                  out.error <= tol, passes[0], time.monotonic() - start,
                  devices=mesh.devices.size, processes=jax.process_count(),
                  bank_groups=column_mass.groups)


# -- sparse mode -----------------------------------------------------------------------------


def sparse_biases(bank, gallery, *, temperature: float, top_k: int, col_marginals=None,
                  tol: float = 1e-4, max_iterations: int = 1000, anderson: int = 8,
                  search: str = "exact", nlist: int | None = None, nprobe: int | None = None,
                  sample_rows: int = 10_000, confidence: float = 0.999, sample_seed: int = 0,
                  certify: str = "worst_case", mesh=None,
                  progress: Progress | None = None) -> Solution:
  """NCL biases from each bank query's top-``top_k`` items, with a certified error.

  The solve keeps each row's ``top_k`` scores and gives its omitted items, together, the mass
  its deeper search saw below rank ``top_k`` (:func:`ncl_jax.gallery.sparse.omitted_level`),
  spread in proportion to ``exp(g_j)``. Then it certifies the dense problem's column error
  twice: in the worst case over every row (:func:`ncl_jax.gallery.sparse.worst_case_gap`:
  twice the mean of ``max(bound on the true omitted probability, the solved plan's)``), and
  from ``sample_rows`` rows scored exactly against the whole gallery, with probability
  ``confidence`` (:func:`ncl_jax.gallery.sparse.sampled_gap`).

  Args:
    bank, gallery, temperature, col_marginals, tol, max_iterations, anderson: see
      :func:`dense_biases`.
    top_k: items kept per bank query, ``1 <= top_k < Ng``.
    search, nlist, nprobe: the top-k search (:func:`ncl_jax.gallery.search.top_k_items`):
      "exact" (flat), or "ivf" (scans ``nprobe`` of ``nlist`` lists per query: much faster on
      big galleries, exact within the scanned lists, and the bound still covers the rest, more
      loosely).
    sample_rows: rows of the sampled certificate (``2 sample_rows Ng D`` FLOP in float64; 0:
      none; at least ``Nb``: every row, exact).
    confidence: the sampled certificate's probability, in (0, 1).
    sample_seed: seed of its draw.
    certify: "worst_case" or "sampled": the certificate ``converged`` rests on.
    mesh: a 1-D mesh (axis ``"data"``) to split the kept entries over by bank rows
      (:class:`ncl_jax.gallery.sparse_mesh.ShardedSparsePlan`); default: one host's memory,
      or under ``jax.distributed`` every device, each process searching and holding only its
      block of the bank's rows (:func:`ncl_jax.gallery.sparse_mesh.process_block`) and the
      certificates' sums combined across processes.
    progress: called with one line per search chunk and per pass.

  Returns:
    :class:`Solution` (mode "sparse"). ``converged`` is False when the chosen certificate does
    not meet ``tol`` even if the sparse problem did: widen ``top_k`` (or ``nprobe``) then.
  """
  _check_shapes(bank, gallery, top_k)
  sparse.check_certificate_options(sample_rows, confidence, certify)
  start = time.monotonic()
  n_bank, n_items = bank.shape[0], gallery.shape[0]
  processes = jax.process_count()
  if n_bank < processes:
    raise UserError(f"the bank has {n_bank} rows but the sparse mode splits them over "
                    f"{processes} processes: use at most {n_bank} processes")
  if processes > 1 and mesh is None:
    mesh = sharding_lib.make_mesh()
  block = sparse_mesh.process_block(n_bank, processes, jax.process_index())
  local_bank = bank[block]   # a memmap stays a memmap: each process reads its rows only
  found = search_lib.top_k_items(local_bank, gallery, top_k, search=search, nlist=nlist,
                                 nprobe=nprobe, temperature=temperature, progress=progress)
  scale = 1.0 / temperature
  plan_rows = (found.scores, found.index, found.omitted_level, n_items, scale)
  plan = (sparse.SparsePlan(*plan_rows) if mesh is None
          else sparse_mesh.ShardedSparsePlan(*plan_rows, mesh,
                                             block_rows=-(-n_bank // processes)))
  b = streaming.balanced_marginals(col_marginals, n_bank, n_items)
  counted, passes = _counting(plan, progress, start, tol, max_iterations)
  out = streaming.column_fixed_point(lambda g: counted(g, b), b, tol=tol,
                                     max_iterations=max_iterations, anderson=anderson)
  # Certificates: each process sums over its own rows; the sums are combined across processes.
  error = float(_gathered([sparse.score_error(local_bank, gallery)]).max())
  gap = sparse.gap_from_sums(
      _gathered(sparse.worst_case_sums(local_bank, found, out.bias, scale, n_items, error)),
      scale, error)
  certified = out.error + gap.gap
  _say(progress, f"worst-case certificate: {certified:.3g}", start)
  sampled = _sampled_fields(local_bank, gallery, found, out, scale, sample_rows, confidence,
                            sample_seed, (n_bank, block.start),
                            lambda line: _say(progress, line, start))
  chosen = sampled["sampled_certified_error"] if certify == "sampled" else certified
  return Solution(out.bias, "sparse", out.iterations, out.error, certified, tol,
                  chosen <= tol, passes[0] + 1, time.monotonic() - start, top_k=top_k,
                  omitted_mass_bound=gap.bound_max, omitted_mass_mean=gap.bound_mean,
                  search=search, certify=certify, devices=1 if mesh is None else mesh.size,
                  processes=processes, **sampled)


def _gathered(values) -> np.ndarray:
  """Every process's ``values`` [n] float64, one row each: [processes, n]. Sent as a float32
  pair (value and remainder) so float64 sums survive JAX's default 32-bit arrays."""
  values = np.asarray(values, np.float64)
  if jax.process_count() == 1:
    return values[None]
  high = values.astype(np.float32)
  low = (values - high).astype(np.float32)
  both = np.asarray(multihost_utils.process_allgather(np.stack([high, low])), np.float64)
  return both[:, 0] + both[:, 1]


def _sampled_fields(bank_block, gallery, found, out, scale: float, sample_rows: int,
                    confidence: float, seed: int, rows: tuple[int, int], say: Progress) -> dict:
  """The sampled certificate's :class:`Solution` fields (none when ``sample_rows`` is 0).
  ``rows``: (bank rows in all, this process's first row); each process scores the drawn rows
  of its block and the values are combined."""
  if not sample_rows:
    return {}
  n_bank, first_row = rows
  drawn_rows = sparse.sample_rows(n_bank, sample_rows, seed)
  values = _gathered(sparse.sampled_block_values(bank_block, gallery, found, out.bias, scale,
                                                 drawn_rows, first_row).ravel()).sum(axis=0)
  distances, omitted = values.reshape(2, -1)
  drawn = sparse.sampled_bound(distances, omitted, n_bank, confidence, seed)
  say(f"sampled certificate: {out.error + drawn.gap:.3g} at confidence {drawn.confidence:g} "
      f"from {drawn.rows} rows")
  return dict(sampled_certified_error=out.error + drawn.gap, confidence=drawn.confidence,
              sample_rows=drawn.rows, sample_seed=drawn.seed,
              sampled_omitted_mass_mean=drawn.omitted_mean)
