"""Executes notebooks/ncl_colab.ipynb headless (nbclient, kernel python3) with a tiny demo, so
the notebook cannot rot: train, metrics table, histograms, export, search."""

import pathlib

import nbclient
import nbformat

import train_testutils

REPO = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "notebooks" / "ncl_colab.ipynb"


def _outputs_text(cell) -> str:
  parts = []
  for output in cell.get("outputs", []):
    parts.append(output.get("text", ""))
    parts.extend(str(v) for k, v in output.get("data", {}).items() if k.startswith("text/"))
  return "".join(parts)


def test_notebook_runs_the_tiny_demo_end_to_end(tmp_path, monkeypatch):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(params) == 1
  overrides = dict(train_testutils.TINY_OVERRIDES)
  params[0].source = "\n".join([
      "import sys",
      f"REPO = {str(REPO)!r}",
      f"WORKDIR = {str(tmp_path / 'run')!r}",
      f"BUNDLE = {str(tmp_path / 'bundle')!r}",
      f"OVERRIDES = {overrides!r}",
  ])
  # The kernel inherits the environment: 4 fake CPU devices (conftest) and fast compiles.
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(tmp_path)}})
  client.execute()   # raises CellExecutionError, with the cell's traceback, on any error

  code = [c for c in nb.cells if c.cell_type == "code"]
  text = [_outputs_text(c) for c in code]
  assert "skipping the install" in text[1]
  assert (tmp_path / "run" / "results.json").is_file()
  table = next(t for t in text if "| inference | direction |" in t)
  assert table.count("| plain |") == 2 and table.count("| ncl |") == 2
  images = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2
  search = text[-1]
  assert "plain: R@1" in search and "  ncl: R@1" in search
  assert (tmp_path / "bundle" / "manifest.json").is_file()
