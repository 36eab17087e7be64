"""Checked file input and output for the command-line tools.

Input: ``.npy`` matrices (memory-mapped), vectors and index maps, checked before numpy parses
them, so that every tool names a missing, empty, foreign, unreadable, misshapen or out-of-range
input the same way, in one error line. Shared by the post-hoc CLI (similarity matrices,
ground-truth maps) and the gallery tools (embeddings, biases, target shares).

Output: one rule, "a new file, never overwritten, never half-written":
:func:`check_new_output` before the work starts, :func:`save_new` (or its ``.npy``, ``.npz`` and
text forms) at the end.
"""

from __future__ import annotations

import os
import pathlib
from typing import Callable

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


def load_vector(path, what: str, length: int, *, positive: bool = False) -> np.ndarray:
  """Loads a finite float [length] ``.npy`` vector (biases, target shares) as float64."""
  vector = load_array(path, what)
  if vector.shape != (length,) or not np.issubdtype(vector.dtype, np.number):
    raise UserError(f"{what} {str(path)!r} must be {length} numbers (one per gallery item), got "
                    f"shape {vector.shape} and dtype {vector.dtype}")
  vector = vector.astype(np.float64)
  if not np.all(np.isfinite(vector)):
    raise UserError(f"{what} {str(path)!r} contains NaN or Inf")
  if positive and np.any(vector <= 0):
    raise UserError(f"{what} {str(path)!r} must be positive everywhere")
  return vector


def load_index_map(path, what: str, length: int, n_targets: int, *, row: str = "row",
                   target: str = "column") -> np.ndarray:
  """Loads a [length] int64 map from rows to indices in [0, n_targets) (e.g. caption -> video).

  Args:
    path: the ``.npy`` file.
    what: how messages name it (a flag such as ``--gt``).
    length: rows the map must have.
    n_targets: the number of valid indices.
    row, target: how messages name one row and one indexed item.
  """
  mapping = load_array(path, what)
  if mapping.shape != (length,):
    raise UserError(f"{what} must be a 1-D array with one entry per {row} ({length}), "
                    f"got shape {mapping.shape}")
  if not np.issubdtype(mapping.dtype, np.integer):
    raise UserError(f"{what} must hold integer {target} indices, got dtype {mapping.dtype}")
  if mapping.min() < 0 or mapping.max() >= n_targets:
    raise UserError(f"{what} entries must lie in [0, {n_targets - 1}] (one {target} each), "
                    f"got range [{mapping.min()}, {mapping.max()}]")
  return mapping.astype(np.int64)


def check_new_output(path: str | os.PathLike | None, flag: str) -> None:
  """Raises if ``path`` exists (outputs are never overwritten) or its folder is missing.

  ``None``, ``""`` and ``"-"`` (standard output) pass.
  """
  if not path or str(path) == "-":
    return
  target = pathlib.Path(path)
  if target.exists():
    raise UserError(f"{flag} {str(path)!r} already exists; choose a new name (nothing is "
                    "overwritten)")
  if not target.parent.resolve().is_dir():
    raise UserError(f"{flag} folder {str(target.parent)!r} does not exist")


def save_new(path: str | os.PathLike, write: Callable[[pathlib.Path], object]) -> None:
  """Calls ``write(temporary_path)`` and moves the result to ``path`` unless ``path`` exists.

  The temporary file sits beside ``path``; ``os.link`` refuses an existing target atomically,
  so a file created meanwhile is not overwritten, and a failed write leaves nothing behind.
  """
  path = pathlib.Path(path)
  temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
  try:
    write(temporary)
    try:
      os.link(temporary, path)
    except FileExistsError:
      raise UserError(f"{path} appeared while writing; the result was not saved over it") from None
  finally:
    temporary.unlink(missing_ok=True)


def save_new_npy(path: str | os.PathLike, array) -> None:
  """:func:`save_new` of one array as ``.npy`` (under ``path`` exactly: no suffix is added)."""
  save_new(path, lambda temporary: _write_with(temporary, np.save, array))


def save_new_npz(path: str | os.PathLike, **arrays) -> None:
  """:func:`save_new` of named arrays as an uncompressed ``.npz``."""
  save_new(path, lambda temporary: _write_with(temporary, np.savez, **arrays))


def save_new_text(path: str | os.PathLike, text: str) -> None:
  """:func:`save_new` of a UTF-8 text file."""
  save_new(path, lambda temporary: temporary.write_text(text, encoding="utf-8"))


def _write_with(path: pathlib.Path, save, *args, **kwargs) -> None:
  # Through a file handle: numpy appends .npy/.npz to a file *name* without that suffix.
  with open(path, "xb") as handle:
    save(handle, *args, **kwargs)
