"""The sparse plan with its bank rows split over a device mesh, across processes too.

:class:`ShardedSparsePlan` computes what :class:`ncl_jax.gallery.sparse.SparsePlan` computes,
but each device of a 1-D mesh (axis ``"data"``) owns a block of bank rows: their kept scores,
ids and omitted levels stay on it, and each pass sends only the biases [Ng] to every device
and brings back the column sums, combined with one ``psum`` over the mesh. Under
``jax.distributed`` each process searches and holds only its own block of the bank
(:func:`process_block`), so the ``Nb K`` kept entries (5 GB in float32 for 10^8 rows at K =
128, plus as much again for the ids) are split over the hosts instead of held by one.

Precision: the one-host plan forms each row's omitted sum ``sum_{j omitted} exp(g_j)`` in
float64 on the host; here it is ``total - kept`` in float32 on the device, with a relative
error of about ``2**-24 K total / rest`` (small while the kept items hold a small share of the
gallery's ``exp(g)``, as at K << Ng), and the column sums are float32 scatter-adds.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ncl_jax import sharding as sharding_lib
from ncl_jax.gallery import sparse


@functools.lru_cache(maxsize=None)
def _pass(mesh: Mesh, n_items: int):
  """Jitted one pass: ([2, Ng] kept mass and omitted-weight sums per column, [] weight total),
  the rows split over ``mesh``, summed over it."""
  axis = sharding_lib.DATA_AXIS

  def local(scores, index, level, valid, g, total, floor, scale):
    kept_exp = jnp.exp(g)[index].sum(axis=1)
    log_rest = jnp.log(jnp.maximum(total - kept_exp, floor))
    probs, weight = sparse.row_probabilities(scores, index, level, log_rest, g, scale)
    probs, weight = probs * valid[:, None], weight * valid
    ids = index.reshape(-1)
    columns = jnp.stack([
        jax.ops.segment_sum(probs.reshape(-1), ids, n_items),
        jax.ops.segment_sum(jnp.repeat(weight, index.shape[1]), ids, n_items)])
    return jax.lax.psum(columns, axis), jax.lax.psum(weight.sum(), axis)

  return jax.jit(jax.shard_map(
      local, mesh=mesh, in_specs=(P(axis),) * 4 + (P(),) * 4, out_specs=(P(), P())))


def process_block(n_rows: int, processes: int, index: int) -> slice:
  """Process ``index``'s contiguous block of ``n_rows`` bank rows: ``ceil(n_rows / processes)``
  rows each, in process order (the last block may be shorter, or empty)."""
  per_process = -(-n_rows // processes)
  return slice(min(index * per_process, n_rows), min((index + 1) * per_process, n_rows))


def _process_rows(mesh: Mesh, block_rows: int, local, dtype=np.float32):
  """A global row-split array from this process's rows ``local`` [r <= block_rows, ...]: every
  process contributes ``block_rows`` rows rounded up to its devices (padded with zeros: the
  padding rows' validity is 0); the rows' order does not matter to column sums."""
  devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  padded = -(-block_rows // devices) * devices
  local = np.asarray(local, dtype)
  if len(local) < padded:
    local = np.concatenate([local, np.zeros((padded - len(local),) + local.shape[1:], dtype)])
  split = NamedSharding(mesh, P(sharding_lib.DATA_AXIS))
  processes = sharding_lib.mesh_process_count(mesh)
  return jax.make_array_from_process_local_data(split, local,
                                                (padded * processes,) + local.shape[1:])


class ShardedSparsePlan:
  """Column sums of the sparse plan, the bank rows split over ``mesh``; one pass per call.

  Args:
    scores: [r, K] float32 kept similarities of this process's bank rows (all of them in one
      process).
    index: [r, K] int32 their kept item ids.
    levels: [r] their omitted logit levels (:func:`ncl_jax.gallery.sparse.omitted_level`).
    n_items: gallery size.
    scale: ``1 / temperature``.
    mesh: a 1-D mesh with axis ``"data"`` (:func:`ncl_jax.sharding.make_mesh`) over every
      process's devices.
    block_rows: the most rows any process holds (:func:`process_block`; default ``r``: one
      process).
  """

  def __init__(self, scores, index, levels, n_items: int, scale: float, mesh: Mesh,
               block_rows: int | None = None):
    self._mesh, self._n_items, self._k = mesh, n_items, index.shape[1]
    block_rows = len(index) if block_rows is None else block_rows
    self._rows = (_process_rows(mesh, block_rows, scores),
                  _process_rows(mesh, block_rows, index, dtype=np.int32),
                  _process_rows(mesh, block_rows, levels),
                  _process_rows(mesh, block_rows, np.ones(len(index), np.float32)))
    self._scale = sharding_lib.put_replicated(np.float32(scale), mesh)

  def __call__(self, bias) -> np.ndarray:
    """Column sums [n_items] float64 of the plan under biases ``bias`` [n_items]."""
    g = np.asarray(bias, np.float64)
    g = g - g.max()
    e = np.exp(g)
    total, floor = e.sum(), (self._n_items - self._k) * e.min()
    replicated = sharding_lib.put_replicated(
        (g.astype(np.float32), np.float32(total), np.float32(floor)), self._mesh)
    columns, weight_sum = _pass(self._mesh, self._n_items)(*self._rows, *replicated,
                                                          self._scale)
    kept_mass, row_weight = np.asarray(sharding_lib.to_host(columns), np.float64)
    weight_sum = float(sharding_lib.to_host(weight_sum))
    return kept_mass + e * np.maximum(weight_sum - row_weight, 0.0)
