"""Tests for the post-hoc CLI: end to end in a subprocess, input validation in-process."""

import json
import subprocess
import sys

import numpy as np
import pytest

from ncl_jax import metrics
from ncl_jax import normalize as nz
from ncl_jax import posthoc
from ncl_jax.errors import UserError

TITLES = "msrvtt_cap4video/msrvtt_titles_matrix.npy"


def _run(*args):
  return subprocess.run([sys.executable, "-m", "ncl_jax.posthoc", *map(str, args)],
                        capture_output=True, text=True, timeout=300, check=False)


def test_cli_end_to_end_on_real_matrix(shared_data_dir, tmp_path):
  out_json, out_png = tmp_path / "result.json", tmp_path / "hist.png"
  proc = _run(shared_data_dir / TITLES, "--method", "ncl", "--json", out_json, "--plot", out_png)
  assert proc.returncode == 0, proc.stderr
  result = json.loads(out_json.read_text())
  assert set(result) == {"method", "t2v", "v2t", "plain", "delta", "hyperparameters",
                         "normalization_error", "normalization_error_detail"}
  assert result["hyperparameters"] == {"t2v": {"alpha": 1.0}, "v2t": {"alpha": 1.0}}
  assert result["method"] == "ncl"
  for direction in ("t2v", "v2t"):
    assert tuple(result[direction]) == metrics.METRIC_NAMES
  # Plain and normalized side by side: the plain block is exactly what --method none writes,
  # and the delta is the method's row minus it.
  plain_json = tmp_path / "plain.json"
  assert posthoc.main([str(shared_data_dir / TITLES), "--json", str(plain_json)]) == 0
  plain = json.loads(plain_json.read_text())
  # Written once, no delta.
  assert set(plain) == {"method", "t2v", "v2t", "normalization_error", "normalization_error_detail"}
  assert result["plain"] == {"t2v": plain["t2v"], "v2t": plain["v2t"]}
  assert plain["t2v"]["R@1"] == pytest.approx(29.7)  # the data README's raw t2v row
  for direction in ("t2v", "v2t"):
    for name in metrics.METRIC_NAMES:
      assert result["delta"][direction][name] == pytest.approx(
          result[direction][name] - plain[direction][name], abs=1e-12)
  assert result["delta"]["t2v"]["R@1"] > 2
  assert plain["normalization_error"]["before"] == result["normalization_error"]["before"]
  # The same numbers as the library gives (transductive NCL, pessimistic ties).
  sims = np.load(shared_data_dir / TITLES)
  expected_t2v = metrics.t2v_metrics(nz.normalize(sims, "ncl", temperature=0.01))
  assert result["t2v"] == pytest.approx(expected_t2v)
  assert result["t2v"]["R@1"] > 29.7 + 2  # raw R@1 (the data README's table) plus a clear gain
  errors = result["normalization_error"]
  assert errors["before"] > 0.4 and errors["after"] < 1e-3
  # One caption per video: every expected share is 1, so relative and absolute errors agree.
  for direction in ("t2v", "v2t"):
    for when in ("before", "after"):
      detail = result["normalization_error_detail"][direction][when]
      assert detail["relative_mae"] == pytest.approx(detail["mae"], rel=1e-9)
  assert result["normalization_error_detail"]["t2v"]["before"]["mae"] == errors["before"]
  assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "t2v: 1000 queries x 1000 candidates, transductive" in proc.stdout
  # Table: per direction the plain row, the method's row and the difference.
  rows = [line.split() for line in proc.stdout.splitlines()]
  start = rows.index(next(r for r in rows if r[:2] == ["t2v", "plain"]))
  assert [rows[start][1], rows[start + 1][0], rows[start + 2][0]] == ["plain", "ncl", "delta"]
  assert float(rows[start + 2][1]) == pytest.approx(result["delta"]["t2v"]["R@1"], abs=0.051)
  assert rows[start + 3][:2] == ["v2t", "plain"]


def test_cli_bad_input_is_one_line(tmp_path):
  bad = tmp_path / "vector.npy"
  np.save(bad, np.zeros(5, np.float32))
  proc = _run(bad, "--method", "none")
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: SIMS must be a 2-D matrix"), proc.stderr
  assert proc.stdout == ""


def test_importing_cli_does_not_import_matplotlib():
  code = "import sys, ncl_jax.posthoc, ncl_jax.plots; print('matplotlib' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "False"


@pytest.fixture
def files(tmp_path, rng):
  sims = rng.standard_normal((6, 6)).astype(np.float32)
  paths = {"sims": tmp_path / "sims.npy", "wide": tmp_path / "wide.npy",
           "nan": tmp_path / "nan.npy", "map_short": tmp_path / "map_short.npy",
           "map_range": tmp_path / "map_range.npy", "bank5": tmp_path / "bank5.npy",
           "text": tmp_path / "text.npy", "map_float": tmp_path / "map_float.npy",
           "zero_bytes": tmp_path / "zero_bytes.npy"}
  paths["zero_bytes"].write_bytes(b"")
  np.save(paths["sims"], sims)
  np.save(paths["wide"], np.zeros((6, 4), np.float32))
  with_nan = sims.copy()
  with_nan[3, 2] = np.nan
  np.save(paths["nan"], with_nan)
  np.save(paths["map_short"], np.arange(5))
  np.save(paths["map_range"], np.array([0, 1, 2, 3, 4, 6]))
  np.save(paths["map_float"], np.arange(6, dtype=np.float32))
  np.save(paths["bank5"], np.zeros((10, 5), np.float32))
  paths["text"].write_text("not an array")
  return paths


@pytest.mark.parametrize("argv, message", [
    (["{missing}"], "not found"),
    (["{text}"], "text.npy' is not a .npy file"),
    (["{zero_bytes}"], "SIMS file .* is empty \\(0 bytes\\)"),
    (["{sims}", "--method", "ncl", "--bank", "{zero_bytes}"], "--bank file .* is empty"),
    (["{sims}", "--gt", "{zero_bytes}"], "--gt file .* is empty"),
    (["{sims}", "--gt", "{text}"], "--gt file .* is not a .npy file"),
    (["{nan}"], "NaN or Inf \\(first in row 3\\)"),
    (["{wide}"], "not square"),
    (["{sims}", "--gt", "{map_short}"], "one entry per text row \\(6\\)"),
    (["{sims}", "--gt", "{map_range}"], "must lie in \\[0, 5\\]"),
    (["{sims}", "--gt", "{map_float}"], "integer video indices"),
    (["{sims}", "--method", "ncl", "--bank", "{bank5}"], "5 columns but SIMS has 6 videos"),
    (["{sims}", "--method", "ncl", "--v2t-bank", "{bank5}"], "5 columns but SIMS has 6 texts"),
    (["{sims}", "--method", "dsl", "--bank", "{sims}"], "dsl is transductive"),
    (["{sims}", "--temperature", "0"], "must be a positive number"),
    (["{sims}", "--temperature", "1e30"], "--temperature 1e\\+30 is too large .* tie; use a "
                                          "temperature in \\["),
    (["{sims}", "--method", "ncl", "--temperature", "1e-40"], "1e-40 is too small"),
    (["{sims}", "--method", "csls", "--temperature", "1e-45"], "1e-45 is too small"),
    (["{sims}", "--method", "is", "--temperature", "1e-30"], "1e-30 is too small"),
    (["{sims}", "--qb-beta", "nan"], "--qb-beta must be a positive number"),
    (["{sims}", "--method", "ncl", "--max-iterations", "0"], "--max-iterations must be an integer >= 1"),
    (["{sims}", "--method", "sinkhorn"], "invalid choice"),
    (["{sims}", "--method", "qbnorm", "--qb-k", "9"], "k must lie in"),
    (["{sims}", "--method", "csls", "--csls-k", "7"], "k must lie in \\[1, 6\\]"),
    (["{sims}", "--method", "is", "--is-beta", "-1"], "--is-beta must be a positive number"),
    (["{sims}", "--demo"], "exactly one of"),
    (["{sims}", "--json", "{sims}"], "already exists"),
])
def test_bad_inputs_raise_user_errors(files, tmp_path, argv, message):
  names = dict(files, missing=tmp_path / "missing.npy")
  before = files["sims"].read_bytes()
  with pytest.raises(UserError, match=message):
    posthoc.main([a.format(**names) for a in argv])
  assert files["sims"].read_bytes() == before  # never overwritten


def test_inductive_bank_and_json_to_stdout(files, rng, tmp_path, capsys):
  bank = tmp_path / "bank.npy"
  np.save(bank, rng.standard_normal((40, 6)).astype(np.float32))
  assert posthoc.main([str(files["sims"]), "--method", "qbnorm", "--bank", str(bank),
                       "--json", "-"]) == 0
  captured = capsys.readouterr()
  result = json.loads(captured.out)  # stdout holds only the JSON ...
  assert result["method"] == "qbnorm"
  assert "t2v: 6 queries x 6 candidates, inductive, bank:" in captured.err  # ... the table is here
  assert "40 x 6" in captured.err
  assert "v2t: 6 queries x 6 candidates, transductive" in captured.err


def test_multi_caption_map_and_group_max(tmp_path, rng, capsys):
  mapping = np.array([0, 0, 1, 2, 2, 2, 3])
  sims = rng.standard_normal((7, 4)).astype(np.float32)
  np.save(tmp_path / "s.npy", sims)
  np.save(tmp_path / "m.npy", mapping)
  out = tmp_path / "r.json"
  assert posthoc.main([str(tmp_path / "s.npy"), "--gt", str(tmp_path / "m.npy"),
                       "--v2t-protocol", "group_max", "--tie", "optimistic",
                       "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["t2v"] == metrics.t2v_metrics(sims, mapping, tie="optimistic")
  assert result["v2t"] == metrics.v2t_metrics(sims.T, mapping, protocol="group_max",
                                              tie="optimistic")
  assert "7 queries x 4 candidates" in capsys.readouterr().out


def test_demo_runs_without_files(capsys):
  assert posthoc.main(["--demo", "--method", "dsl"]) == 0
  table = capsys.readouterr().out
  assert "t2v: 400 queries x 400 candidates, transductive" in table


def test_multi_caption_ncl_meets_caption_count_marginals(tmp_path, rng, capsys):
  """With --gt, t2v targets each video's caption count and v2t 1/count per caption."""
  mapping = np.concatenate([np.arange(8), rng.integers(0, 8, 24)])
  sims = (rng.standard_normal((32, 8)) * 0.1 + 0.05 * rng.standard_normal(8)).astype(np.float32)
  np.save(tmp_path / "s.npy", sims)
  np.save(tmp_path / "m.npy", mapping)
  out = tmp_path / "r.json"
  assert posthoc.main([str(tmp_path / "s.npy"), "--gt", str(tmp_path / "m.npy"), "--method",
                       "ncl", "--tol", "1e-6", "--json", str(out)]) == 0
  errors = json.loads(out.read_text())["normalization_error"]
  assert errors["before"] > 0.1 and errors["after"] < 1e-4
  lines = capsys.readouterr().out.splitlines()
  v2t_ncl_row = lines[lines.index(next(l for l in lines if l.startswith("v2t   plain"))) + 1]
  assert v2t_ncl_row.split()[0] == "ncl"
  v2t_after = float(v2t_ncl_row.split()[-3])  # relative mean error of the NCL row
  assert v2t_after < 1e-4
