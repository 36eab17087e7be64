"""Devices, the data-parallel mesh, and moving batches and results between hosts and devices.

This is the only module (with ``train.py``) that knows about devices. Training runs on a 1-D
mesh with the axis ``"data"``: every array of the train state is replicated except the NCL query
queues, whose slots are split over the devices, and every batch is split along its first axis.

Axis type: the mesh is built with ``AxisType.Auto`` on purpose. The train step is written per
device inside ``jax.shard_map`` (manual axes), so sharding-in-types (``AxisType.Explicit``, the
default of ``jax.make_mesh`` since jax 0.9) would add nothing there; outside the step it would
make every global-view computation on sharded arrays a type error (e.g. the evaluation's
``text @ video.T`` on batch-sharded embeddings, or a jitted encoder whose batch is sharded) and
would require ``jax.reshard`` wherever an input's sharding differs from a ``shard_map``'s
``in_specs``. With ``Auto`` the compiler inserts such resharding itself. Choosing it here, in
one place, also keeps the code identical on jax 0.10 and newer releases.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ncl_jax import errors

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh with the axis ``"data"`` over ``devices`` (default: all devices)."""
  devices = list(jax.devices() if devices is None else devices)
  if not devices:
    errors.fail("no devices to build a mesh from")
  return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                       devices=devices)


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of an array held whole by every device."""
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Sharding of an array split along its first axis over the ``"data"`` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def check_divisible(size: int, mesh: Mesh, what: str) -> None:
  """Raises a UserError unless ``size`` splits evenly over the mesh's devices and processes.

  The processes are those of the mesh's devices (distinct ``process_index``), so a mesh of a
  TPU topology described for an ahead-of-time compile counts its hosts, not this one.
  """
  n = mesh.devices.size
  if size % n:
    errors.fail(f"{what} = {size} is not divisible by the number of devices ({n}); "
                f"choose a multiple of {n}")
  processes = mesh_process_count(mesh)
  if size % processes:
    errors.fail(f"{what} = {size} is not divisible by the number of processes ({processes})")


def mesh_process_count(mesh: Mesh) -> int:
  """The processes (hosts) that hold the mesh's devices."""
  return len({d.process_index for d in mesh.devices.flat})


def host_batch_to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles per-host batches (this process's rows) into global arrays split over "data".

  Args:
    batch: arrays with a leading per-host batch axis ``b_host``; every process passes its own
      rows, and the global batch is their concatenation in process order.
    mesh: the training mesh.

  Returns:
    The same keys as global ``jax.Array``s of leading size ``b_host * process_count``.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in batch.items()}


def process_slice(global_rows: int) -> slice:
  """The rows of a global batch of ``global_rows`` that this process feeds to its devices."""
  per_process = global_rows // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def to_host(x: Any) -> Any:
  """Brings (possibly multi-process) global arrays back to numpy on every host."""
  if jax.process_count() == 1:
    return jax.tree.map(np.asarray, x)
  return multihost_utils.process_allgather(x, tiled=True)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Places host values (identical on every process) on every device of the mesh."""
  sharding = replicated(mesh)
  return jax.tree.map(
      lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), tree)
