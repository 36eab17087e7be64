"""Checked .npy input and the never-overwrite, never-half-written output rule."""

import numpy as np
import pytest

from ncl_jax import npy_files
from ncl_jax.errors import UserError


def test_index_map_loads_int64_and_names_each_problem(tmp_path):
  path = tmp_path / "map.npy"
  np.save(path, np.array([2, 0, 1, 1], np.int32))
  mapping = npy_files.load_index_map(path, "--gt", 4, 3, row="text row", target="video")
  assert mapping.dtype == np.int64 and mapping.tolist() == [2, 0, 1, 1]
  with pytest.raises(UserError, match=r"one entry per text row \(5\)"):
    npy_files.load_index_map(path, "--gt", 5, 3, row="text row", target="video")
  with pytest.raises(UserError, match=r"must lie in \[0, 1\]"):
    npy_files.load_index_map(path, "--gt", 4, 2)
  np.save(path, np.zeros(4, np.float32))
  with pytest.raises(UserError, match="integer video indices"):
    npy_files.load_index_map(path, "--gt", 4, 3, target="video")
  with pytest.raises(UserError, match="not found"):
    npy_files.load_index_map(tmp_path / "missing.npy", "--gt", 4, 3)


def test_vector_must_be_finite_and_of_the_right_length(tmp_path):
  path = tmp_path / "v.npy"
  np.save(path, np.array([1.0, 2.0], np.float32))
  assert npy_files.load_vector(path, "--biases", 2).dtype == np.float64
  with pytest.raises(UserError, match="must be 3 numbers"):
    npy_files.load_vector(path, "--biases", 3)
  np.save(path, np.array([1.0, -2.0]))
  with pytest.raises(UserError, match="positive everywhere"):
    npy_files.load_vector(path, "--shares", 2, positive=True)
  (tmp_path / "text.npy").write_text("not an array")
  with pytest.raises(UserError, match="not a .npy file"):
    npy_files.load_vector(tmp_path / "text.npy", "--biases", 2)


def test_outputs_are_new_complete_files(tmp_path):
  npy_files.save_new_npy(tmp_path / "bias", np.arange(3))  # no .npy suffix is added
  np.testing.assert_array_equal(np.load(tmp_path / "bias"), np.arange(3))
  npy_files.save_new_npz(tmp_path / "top.npz", indices=np.arange(2))
  assert np.load(tmp_path / "top.npz")["indices"].tolist() == [0, 1]
  with pytest.raises(UserError, match="already exists"):
    npy_files.check_new_output(tmp_path / "bias", "--out")
  with pytest.raises(UserError, match="folder .* does not exist"):
    npy_files.check_new_output(tmp_path / "no" / "x.json", "--json")
  npy_files.check_new_output("-", "--json")  # standard output
  with pytest.raises(UserError, match="appeared while writing"):
    npy_files.save_new_text(tmp_path / "bias", "x")
  np.testing.assert_array_equal(np.load(tmp_path / "bias"), np.arange(3))

  def fail(path):
    path.write_text("half")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError):
    npy_files.save_new(tmp_path / "out.json", fail)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["bias", "top.npz"]


@pytest.mark.parametrize("content, message", [
    (b"", r"is empty \(0 bytes\)"),
    (b"1,2,3\n4,5,6\n", "is not a .npy file"),
    (b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (3, 2), }",
     "is not a readable .npy array"),  # numpy's header, cut off before the data
])
def test_empty_foreign_and_cut_files_are_named_by_every_reader(tmp_path, content, message):
  path = tmp_path / "x.npy"
  path.write_bytes(content)
  for read in (lambda: npy_files.open_matrix(path, "--bank"),
               lambda: npy_files.load_array(path, "--gt"),
               lambda: npy_files.load_vector(path, "--biases", 3)):
    with pytest.raises(UserError, match=message):
      read()
