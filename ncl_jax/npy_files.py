"""Arrays that command-line tools read from ``.npy`` files, checked before numpy parses them.

Shared by the post-hoc CLI (similarity matrices, ground-truth maps) and the gallery tools
(embeddings, biases), so every tool names a missing, empty, foreign, unreadable, non-2-D or empty
input the same way, in one error line.
"""

from __future__ import annotations

import os

import numpy as np

from ncl_jax.errors import UserError

# Every .npy file starts with these bytes (numpy's format specification); checking them first
# turns "pickled (object) data ... allow_pickle" for a text or CSV file into a plain answer.
_MAGIC = np.lib.format.MAGIC_PREFIX


def check_npy_file(path: str | os.PathLike, what: str) -> str:
  """Raises UserError unless ``path`` is a file that starts like a ``.npy`` file.

  Args:
    path: the file.
    what: how messages name it (a flag such as ``--bank``).

  Returns:
    ``path`` as a string.
  """
  path = str(path)
  if not os.path.isfile(path):
    raise UserError(f"{what} file {path!r} not found; give the path of a .npy file")
  try:
    with open(path, "rb") as handle:
      head = handle.read(len(_MAGIC))
  except OSError as err:
    raise UserError(f"{what} file {path!r} cannot be read ({err.strerror})") from None
  if not head:
    raise UserError(f"{what} file {path!r} is empty (0 bytes); it was not written completely: "
                    "save it again with numpy.save")
  if head != _MAGIC:
    raise UserError(f"{what} file {path!r} is not a .npy file (it does not start with numpy's "
                    "format header); save the array with numpy.save")
  return path


def load_array(path: str | os.PathLike, what: str) -> np.ndarray:
  """Reads a whole ``.npy`` array (no pickled objects) or raises UserError."""
  path = check_npy_file(path, what)
  try:
    return np.load(path, allow_pickle=False)
  except (ValueError, OSError, EOFError) as err:
    raise UserError(f"{what} file {path!r} is not a readable .npy array ({err}); "
                    "save it again with numpy.save") from None


def open_matrix(path: str | os.PathLike, what: str) -> np.ndarray:
  """Memory-maps a non-empty 2-D ``.npy`` array (nothing is read yet) or raises UserError.

  Args:
    path: the ``.npy`` file.
    what: how messages name it (a flag such as ``--bank``).

  Returns:
    The read-only memory map, shape [rows, cols], in the file's dtype.
  """
  path = check_npy_file(path, what)
  try:
    array = np.load(path, mmap_mode="r", allow_pickle=False)
  except (ValueError, OSError, EOFError) as err:
    raise UserError(f"{what} file {path!r} is not a readable .npy array ({err}); "
                    "save it again with numpy.save") from None
  if array.ndim != 2:
    raise UserError(f"{what} must be a 2-D matrix, got shape {array.shape} from {path!r}")
  if 0 in array.shape:
    raise UserError(f"{what} is empty (shape {array.shape}) in {path!r}")
  return array
