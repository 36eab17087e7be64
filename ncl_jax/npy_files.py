"""Matrices that command-line tools read from ``.npy`` files, memory-mapped and checked.

Shared by the post-hoc CLI (similarity matrices) and the gallery tools (embeddings), so every
tool names a missing, unreadable, non-2-D or empty input the same way, in one error line.
"""

from __future__ import annotations

import os

import numpy as np

from ncl_jax.errors import UserError


def open_matrix(path: str | os.PathLike, what: str) -> np.ndarray:
  """Memory-maps a non-empty 2-D ``.npy`` array (nothing is read yet) or raises UserError.

  Args:
    path: the ``.npy`` file.
    what: how messages name it (a flag such as ``--bank``).

  Returns:
    The read-only memory map, shape [rows, cols], in the file's dtype.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise UserError(f"{what} file {path!r} not found; give the path of a .npy file")
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError) as err:
    raise UserError(f"{what} file {path!r} is not a readable .npy array ({err}); "
                    "save it with numpy.save") from None
  if array.ndim != 2:
    raise UserError(f"{what} must be a 2-D matrix, got shape {array.shape} from {path!r}")
  if 0 in array.shape:
    raise UserError(f"{what} is empty (shape {array.shape}) in {path!r}")
  return array
