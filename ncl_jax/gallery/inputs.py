"""Embedding files for the gallery tools: open memory-mapped, check, fingerprint.

Every check streams the file in row blocks, so a bank of 10^9 rows is checked in bounded memory.
Problems raise :class:`ncl_jax.errors.UserError` with the file, the row and the fix.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from ncl_jax import npy_files
from ncl_jax.errors import UserError

# Rows must have L2 norm within this of 1: float16 storage alone moves norms by ~1e-3.
UNIT_NORM_TOLERANCE = 1e-2
FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_CHECK_ROWS = 65536


def open_embeddings(path: str | os.PathLike, what: str) -> np.ndarray:
  """Memory-maps a non-empty [N, D] float32/float16 ``.npy`` file (nothing is read yet)."""
  array = npy_files.open_matrix(path, what)
  if array.dtype not in FLOAT_DTYPES:
    raise UserError(f"{what} {path!r} has dtype {array.dtype}; save it as float32 or float16")
  return array


def check_unit_rows(array, what: str) -> None:
  """Raises unless every row is finite with L2 norm within :data:`UNIT_NORM_TOLERANCE` of 1.

  The message names the first non-finite row, or the row farthest from unit norm and by how
  much it is off.
  """
  worst_row, worst_off = -1, 0.0
  for start in range(0, array.shape[0], _CHECK_ROWS):
    block = np.asarray(array[start:start + _CHECK_ROWS], np.float32)
    finite = np.all(np.isfinite(block), axis=1)
    if not finite.all():
      row = start + int(np.flatnonzero(~finite)[0])
      raise UserError(f"{what} row {row} contains NaN or Inf; remove or re-embed that item")
    off = np.abs(np.linalg.norm(block, axis=1) - 1.0)
    if off.max() > worst_off:
      worst_row, worst_off = start + int(off.argmax()), float(off.max())
  if worst_off > UNIT_NORM_TOLERANCE:
    norm = float(np.linalg.norm(np.asarray(array[worst_row], np.float32)))
    raise UserError(f"{what} rows must be L2-normalised, but row {worst_row} has norm {norm:.4g} "
                    f"(off by {worst_off:.3g}; at most {UNIT_NORM_TOLERANCE:g} is accepted); "
                    "divide each row by its norm")


def load_checked(path, what: str) -> np.ndarray:
  """:func:`open_embeddings` and :func:`check_unit_rows`."""
  array = open_embeddings(path, what)
  check_unit_rows(array, what)
  return array


def check_same_dimension(a, a_what: str, b, b_what: str) -> None:
  if a.shape[1] != b.shape[1]:
    raise UserError(f"{a_what} has dimension {a.shape[1]} but {b_what} {b.shape[1]}; embed both "
                    "with the same model")


def fingerprint(array) -> str:
  """A BLAKE2b digest of an array's shape, dtype and values (streamed in row blocks)."""
  digest = hashlib.blake2b(digest_size=16)
  digest.update(repr((tuple(array.shape), str(array.dtype))).encode())
  for start in range(0, array.shape[0], _CHECK_ROWS):
    digest.update(np.ascontiguousarray(array[start:start + _CHECK_ROWS]).tobytes())
  return digest.hexdigest()
