"""One fair comparison of the inference-time normalizers on the real MSR-VTT 1k-A matrices.

Run from the repository root::

  python benchmarks/fair_normalizers.py [--data ../shared/data/msrvtt_cap4video] [--json OUT]

Prints Markdown tables (the ones in docs/normalization.md): every method at hyper-parameters
chosen without the test queries (:mod:`ncl_jax.selection`), both directions, in two settings:

* **inductive, half split**: bank = the first 500 test captions (t2v) or videos (v2t), queries =
  the other 500, candidates = all 1000. The bank is chosen on the bank alone: by **balance**
  (label-free, as for a training bank scored against test videos, which has no labels) and, as
  a second column, by **recall** on the bank half's own labels. DSL has no bank: it normalizes
  over the 500 test queries (transductive) with its temperature chosen by recall on the bank half.
* **transductive**: bank = all 1000 test queries, selection by balance on them (their labels are
  never read). DSL has no label-free rule, so it runs at CAMoE's inference value ``T_dsl = 1``.

plus the methods at their published defaults and the sensitivity sweep (test R@1 vs each knob,
inductive split), which reads the test labels and is a diagnostic, never a selection.
Ties are pessimistic (:mod:`ncl_jax.metrics`); T = 0.01 (the model's logit scale 100).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ncl_jax import metrics  # noqa: E402  pylint: disable=g-import-not-at-top
from ncl_jax import normalize as nz  # noqa: E402  pylint: disable=g-import-not-at-top
from ncl_jax import selection  # noqa: E402  pylint: disable=g-import-not-at-top

TEMPERATURE = 0.01
MATRICES = {"titles": "msrvtt_titles_matrix.npy", "video": "msrvtt_video_matrix.npy"}
KNOBBED = ("qbnorm", "is", "csls", "dsl")
# Published defaults: QB-Norm beta 20, k 1; inverted softmax at the model's scale; CSLS k 10
# (Conneau et al.); DSL T 1 at inference (CAMoE).
DEFAULTS = {"qbnorm": {"beta": 20.0, "k": 1}, "is": {"beta": 1.0 / TEMPERATURE},
            "csls": {"k": 10}, "dsl": {"dsl_temperature": 1.0}, "ncl": {}, "none": {}}
# The knob each sweep varies (QB-Norm's k stays at its default 1 in the sweep).
SWEEPS = {"qbnorm": ("beta", {"k": 1}), "is": ("beta", {}), "csls": ("k", {}),
          "dsl": ("dsl_temperature", {})}


def r_at_1(queries, method: str, bank, options: dict, gt) -> float:
  """Test R@1 (percent) of ``queries`` normalized by ``method`` with ``bank``."""
  scores = nz.normalize(queries, method, None if method == "dsl" else bank,
                        temperature=TEMPERATURE, **options)
  return metrics.t2v_metrics(scores, gt)["R@1"]


def inductive(matrix: np.ndarray) -> dict:
  """Half split of one direction's [n_queries, n_candidates] matrix (diagonal ground truth)."""
  half = matrix.shape[0] // 2
  bank, queries, gt = matrix[:half], matrix[half:], np.arange(half, matrix.shape[0])
  bank_gt = np.arange(half)
  rows = {}
  for method in ("none", "ncl") + KNOBBED:
    row = {"default": r_at_1(queries, method, bank, DEFAULTS[method], gt)}
    if method in KNOBBED:
      for criterion in ("balance", "recall"):
        if method == "dsl" and criterion == "balance":
          continue
        chosen = selection.select_on_bank(
            method, bank, temperature=TEMPERATURE,
            bank_gt=bank_gt if criterion == "recall" else None)
        row[criterion] = {"values": chosen.values,
                          "R@1": r_at_1(queries, method, bank, chosen.values, gt)}
      knob, fixed = SWEEPS[method]
      row["sweep"] = {str(value): r_at_1(queries, method, bank, {knob: value, **fixed}, gt)
                      for value in selection.grid(method)[knob]}
    rows[method] = row
  return rows


def transductive(matrix: np.ndarray) -> dict:
  """All test queries as the bank; selection by balance on them (labels unread)."""
  rows = {}
  for method in ("none", "ncl") + KNOBBED:
    row = {"default": r_at_1(matrix, method, matrix, DEFAULTS[method], None)}
    if method in KNOBBED and method != "dsl":
      chosen = selection.select_on_bank(method, matrix, temperature=TEMPERATURE)
      row["balance"] = {"values": chosen.values,
                        "R@1": r_at_1(matrix, method, matrix, chosen.values, None)}
    rows[method] = row
  return rows


def _values(values: dict) -> str:
  return ", ".join(f"{'T_dsl' if k == 'dsl_temperature' else k} {v:g}" for k, v in values.items())


def _selected(row: dict, criterion: str) -> tuple[str, str]:
  if criterion in row:
    return f"{row[criterion]['R@1']:.1f}", _values(row[criterion]["values"])
  return f"{row['default']:.1f}", "–"


def markdown(results: dict) -> str:
  lines = ["**Inductive, half split** (bank = first 500 captions / videos, queries = the other "
           "500; R@1, t2v / v2t):", "",
           "| matrix | method | selected by balance | values (t2v; v2t) | selected by recall "
           "on the bank's labels | values (t2v; v2t) | published default |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for name, per in results.items():
    t2v, v2t = per["inductive"]["t2v"], per["inductive"]["v2t"]
    for method in t2v:
      cells = []
      for criterion in ("balance", "recall"):
        (a, va), (b, vb) = _selected(t2v[method], criterion), _selected(v2t[method], criterion)
        if method == "dsl" and criterion == "balance":
          a = b = "n/a"
        cells += [f"{a} / {b}", f"{va}; {vb}" if va != "–" else "–"]
      default = f"{t2v[method]['default']:.1f} / {v2t[method]['default']:.1f}"
      label = method + (" (transductive over the queries)" if method == "dsl" else "")
      lines.append(f"| {name} | {label} | " + " | ".join(cells) + f" | {default} |")
  lines += ["", "**Transductive** (bank = all 1000 test queries; selection by balance on them, "
            "labels unread; R@1, t2v / v2t):", "",
            "| matrix | method | selected by balance | values (t2v; v2t) | published default |",
            "| --- | --- | --- | --- | --- |"]
  for name, per in results.items():
    t2v, v2t = per["transductive"]["t2v"], per["transductive"]["v2t"]
    for method in t2v:
      (a, va), (b, vb) = _selected(t2v[method], "balance"), _selected(v2t[method], "balance")
      values = f"{va}; {vb}" if va != "–" else ("T_dsl 1 (no label-free rule)"
                                                 if method == "dsl" else "–")
      default = f"{t2v[method]['default']:.1f} / {v2t[method]['default']:.1f}"
      lines.append(f"| {name} | {method} | {a} / {b} | {values} | {default} |")
  lines += ["", "**Sensitivity** (inductive half split, test R@1 t2v / v2t at each knob value; "
            "reads the test labels, a diagnostic only):", ""]
  for method, (knob, fixed) in SWEEPS.items():
    grid = selection.grid(method)[knob]
    title = f"{method} {'T_dsl' if knob == 'dsl_temperature' else knob}" + (
        f" ({_values(fixed)})" if fixed else "")
    lines.append(f"| {title} | " + " | ".join(f"{v:g}" for v in grid) + " |")
    lines.append("| --- " * (len(grid) + 1) + "|")
    for name, per in results.items():
      sweeps = [per["inductive"][d][method]["sweep"] for d in ("t2v", "v2t")]
      lines.append(f"| {name} | " + " | ".join(
          f"{sweeps[0][str(v)]:.1f} / {sweeps[1][str(v)]:.1f}" for v in grid) + " |")
    lines.append("")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msrvtt_cap4video"),
                      help="folder holding the two Cap4Video MSR-VTT 1k-A matrices")
  parser.add_argument("--json", help="also write the numbers here (not overwritten)")
  args = parser.parse_args()
  if args.json and os.path.exists(args.json):
    raise SystemExit(f"error: {args.json} exists; choose a new file name")
  start = time.time()
  results = {}
  for name, file in MATRICES.items():
    sims = np.load(os.path.join(args.data, file))
    results[name] = {
        "inductive": {"t2v": inductive(sims), "v2t": inductive(np.ascontiguousarray(sims.T))},
        "transductive": {"t2v": transductive(sims),
                         "v2t": transductive(np.ascontiguousarray(sims.T))}}
  print(markdown(results))
  print(f"\n({time.time() - start:.0f} s; load average {os.getloadavg()[0]:.1f})")
  if args.json:
    with open(args.json, "x", encoding="utf-8") as handle:
      json.dump(results, handle, indent=2)


if __name__ == "__main__":
  main()
