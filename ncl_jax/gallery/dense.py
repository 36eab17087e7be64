"""Dense mode's pass over the bank on a 2-D device mesh: gallery shards x bank row groups.

The mesh has axes ``("bank", "data")``. Along ``"data"`` (:data:`GALLERY_AXIS`, the training
mesh's axis) the gallery's rows are split; along ``"bank"`` (:data:`BANK_AXIS`) the bank's rows
are: group ``b`` owns a contiguous range of ``ceil(Nb / G)`` rows and streams only those, in
chunks, each chunk replicated over its group's gallery shards. Per chunk, each device scores
its group's chunk against its items (:mod:`ncl_jax.gallery.tiles`); the row normalisers over
the whole gallery are combined with one ``pmax`` and one ``psum`` of [chunk] vectors over
``"data"``, within the group; each device adds its column sums to its group's running total.
After the last chunk, one ``psum`` over ``"bank"`` (an all-reduce of the ``Ng`` column sums,
split over the gallery shards) combines the groups: once per pass. With ``G = 1`` this is the
1-D mesh of earlier versions; across processes under ``jax.distributed`` each process reads
only its devices' gallery rows and its group's bank rows.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ncl_jax import sharding as sharding_lib
from ncl_jax.errors import UserError
from ncl_jax.gallery import tiles

BANK_AXIS = "bank"
GALLERY_AXIS = sharding_lib.DATA_AXIS
# A device's tile (bank rows x its items) holds about this many float32 entries (32 MiB).
_TILE_ELEMENTS = 1 << 23
# Bank rows per chunk stay within these bounds: enough rows that a chunk's matmul reads the
# items once for many rows, few enough that the chunk itself stays small.
_MIN_CHUNK_ROWS, _MAX_CHUNK_ROWS = 64, 4096


def make_mesh(bank_groups: int = 1, devices=None) -> Mesh:
  """A ``(bank_groups, n / bank_groups)`` mesh over ``devices`` (default all), axes
  ``("bank", "data")``. Devices are taken in order, so with as many groups as processes each
  process's devices form one group (the gallery split within a host, the bank across)."""
  devices = list(jax.devices() if devices is None else devices)
  if bank_groups < 1 or len(devices) % bank_groups:
    raise UserError(f"--bank_groups must divide the {len(devices)} devices, got {bank_groups}")
  return jax.make_mesh((bank_groups, len(devices) // bank_groups), (BANK_AXIS, GALLERY_AXIS),
                       axis_types=(AxisType.Auto,) * 2, devices=devices)


def as_bank_mesh(mesh: Mesh) -> Mesh:
  """``mesh`` with axes ``("bank", "data")``: a 1-D ``"data"`` mesh becomes one bank group."""
  if mesh.axis_names == (BANK_AXIS, GALLERY_AXIS):
    return mesh
  if mesh.axis_names == (GALLERY_AXIS,):
    return Mesh(mesh.devices.reshape(1, -1), (BANK_AXIS, GALLERY_AXIS))
  raise UserError(f"the mesh must have axes ('data',) or ('bank', 'data'), got "
                  f"{mesh.axis_names}")


def chunk_rows(n_local_items: int, rows: int | None = None) -> int:
  """Bank rows per chunk: ``rows``, or a ~32 MiB float32 tile per device."""
  if rows:
    return rows
  rows = _TILE_ELEMENTS // max(n_local_items, 1) // 16 * 16
  return int(min(max(rows, _MIN_CHUNK_ROWS), _MAX_CHUNK_ROWS))


def sharded_rows(array, padded_rows: int, sharding: NamedSharding, fill=0, dtype=np.float32):
  """A global [padded_rows, ...] ``dtype`` array from host rows; each process reads only its
  devices'.

  Rows past ``len(array)`` are ``fill``. ``array`` may be a memmap: only the addressed rows are
  read.
  """
  n = array.shape[0]

  def rows(index):
    window = index[0]
    start, stop = window.start or 0, padded_rows if window.stop is None else window.stop
    block = np.full((stop - start,) + tuple(array.shape[1:]), fill, dtype)
    real = max(0, min(stop, n) - start)
    block[:real] = array[start:start + real]
    return block

  return jax.make_array_from_callback((padded_rows,) + tuple(array.shape[1:]), sharding, rows)


@functools.lru_cache(maxsize=None)
def _chunk_step(mesh):
  """Jitted ``totals + each group's column sums of its chunk``: totals [G, Ng'] per group."""

  def local(queries, row_valid, items, item_valid, bias, scale):
    logits = tiles.scores(queries, items, scale, bias, item_valid)
    peak = jax.lax.pmax(tiles.row_peak(logits), GALLERY_AXIS)
    e, local_total = tiles.shifted_exp(logits, peak)
    row_total = jax.lax.psum(local_total, GALLERY_AXIS)
    return tiles.weighted_column_sum(e, row_total, row_valid)[None]

  chunk_mass = jax.shard_map(
      local, mesh=mesh,
      in_specs=(P(BANK_AXIS), P(BANK_AXIS), P(GALLERY_AXIS), P(GALLERY_AXIS), P(GALLERY_AXIS),
                P()),
      out_specs=P(BANK_AXIS, GALLERY_AXIS))

  def step(totals, *args):
    return totals + chunk_mass(*args)

  return jax.jit(step, donate_argnums=0)


@functools.lru_cache(maxsize=None)
def _group_sum(mesh):
  """Jitted all-reduce of the groups' totals over ``"bank"``: [G, Ng'] -> [1, Ng']."""
  return jax.jit(jax.shard_map(lambda t: jax.lax.psum(t, BANK_AXIS), mesh=mesh,
                               in_specs=P(BANK_AXIS, GALLERY_AXIS),
                               out_specs=P(None, GALLERY_AXIS)))


class DenseColumnMass:
  """Column sums of the dense plan ``softmax_j(scale q_i.v_j + g_j)`` over all bank rows, one
  pass over the bank per call, on a ``("bank", "data")`` mesh.

  Args:
    bank: [Nb, D] (array or memmap; a process reads only its groups' rows).
    gallery: [Ng, D] (a process reads only its devices' rows).
    scale: ``1 / temperature``.
    mesh: from :func:`make_mesh` (or a 1-D ``"data"`` mesh: one group).
    rows: bank rows per chunk (default :func:`chunk_rows`).
  """

  def __init__(self, bank, gallery, scale: float, mesh: Mesh, rows: int | None = None):
    self.mesh = mesh = as_bank_mesh(mesh)
    self._bank, self._n_items = bank, gallery.shape[0]
    self.groups, shards = mesh.devices.shape
    self._padded = -(-self._n_items // shards) * shards
    self._split = NamedSharding(mesh, P(GALLERY_AXIS))
    self._items = sharded_rows(gallery, self._padded, self._split)
    self._item_valid = jax.make_array_from_callback(
        (self._padded,), self._split, lambda index: np.arange(self._padded)[index] < self._n_items)
    self.rows = chunk_rows(self._padded // shards, rows)
    self._group_rows = -(-bank.shape[0] // self.groups)
    self._by_group = NamedSharding(mesh, P(BANK_AXIS))
    self._totals = NamedSharding(mesh, P(BANK_AXIS, GALLERY_AXIS))
    self._scale = sharding_lib.put_replicated(np.float32(scale), mesh)
    # One compiled constructor of the per-pass totals (a new lambda each pass would recompile).
    self._zeros = jax.jit(lambda: jnp.zeros((self.groups, self._padded), jnp.float32),
                          out_shardings=self._totals)

  def _chunk(self, step: int):
    """(queries [G r, D], valid [G r]): chunk ``step`` of every group, group-sharded; each
    process reads only its groups' rows."""
    r, dim = self.rows, self._bank.shape[1]

    @functools.lru_cache(maxsize=None)
    def group_block(group):
      first = group * self._group_rows + step * r
      stop = min(first + r, (group + 1) * self._group_rows, self._bank.shape[0])
      block = np.zeros((r, dim), np.float32)
      if stop > first:
        block[:stop - first] = self._bank[first:stop]
      return block, np.arange(r) < stop - first

    def part(index, which):
      return group_block((index[0].start or 0) // r)[which]

    shape = (self.groups * r,)
    return (jax.make_array_from_callback(shape + (dim,), self._by_group, lambda i: part(i, 0)),
            jax.make_array_from_callback(shape, self._by_group, lambda i: part(i, 1)))

  def __call__(self, bias) -> np.ndarray:
    """Column sums [Ng] float64 under biases ``bias`` [Ng]."""
    g = sharded_rows(np.asarray(bias, np.float32), self._padded, self._split)
    totals = self._zeros()
    step = _chunk_step(self.mesh)
    for index in range(-(-self._group_rows // self.rows)):
      queries, valid = self._chunk(index)
      totals = step(totals, queries, valid, self._items, self._item_valid, g, self._scale)
    summed = _group_sum(self.mesh)(totals)
    return np.asarray(sharding_lib.to_host(summed), np.float64)[0, :self._n_items]
