"""One fair comparison of the inference-time normalizers on the real MSR-VTT 1k-A matrices.

Run from the repository root::

  python benchmarks/fair_normalizers.py [--data ../shared/data/msrvtt_cap4video] [--json OUT]

Prints the Markdown tables of docs/normalization.md. Every split is **leak-free**: a bank's own
answers are never in the gallery it is scored against, as with training captions scored
against test videos. T = 0.01 (logit scale 100), pessimistic ties (:mod:`ncl_jax.metrics`).

* **Inductive, halves** (the headline): test = pairs 500-999 (500 captions x their 500
  videos); the t2v bank = captions 0-499 scored against the test videos, the v2t bank = videos
  0-499 scored against the test captions. Each method at its published defaults (strength
  ``alpha = 1``) and at options chosen by ``--select bank`` (label-free cross-validated balance
  on the bank, :func:`ncl_jax.selection.select_on_bank`).
* **Validation selection, thirds** (``--select val``): the first 999 pairs cut into thirds;
  each of the 6 role assignments makes one third the validation split, one the test split and
  one the bank (its captions scored against the validation and against the test videos, its
  videos against both caption sets: the bank's answers are in neither gallery). Options chosen
  by validation R@1 (:func:`ncl_jax.selection.select_on_queries`, as ``posthoc --select val``),
  then applied to the test third; the same assignments also give ``--select bank``'s record.
* **Transductive** (marked): the 1000 test queries are their own bank (they are used
  unlabelled, but every test query is seen at once: not a deployment setting).
* **Strength sweep** (halves, test labels read: a diagnostic, never a selection).

DSL has no bank: it normalizes over the test queries (transductive in every table).
DualIS needs a gallery-side bank (video x video / text x text similarities), which these files
do not have: it is measured on the synthetic set (benchmarks/bank_size.py).
"""

from __future__ import annotations

import argparse
import itertools
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
METHODS = ("none", "ncl", "qbnorm", "is", "csls", "nnn", "dn", "dsl")
# Published defaults (alpha 1 = each method as published): QB-Norm beta 20, k 1; inverted softmax
# at the model's scale; CSLS k 10 (Conneau et al.); NNN k 128, alpha 0.75; DN lambda 0.5; DSL
# T 1 at inference (CAMoE).
DEFAULTS = {"none": {}, "ncl": {}, "qbnorm": {"beta": 20.0, "k": 1},
            "is": {"beta": 1.0 / TEMPERATURE}, "csls": {"k": 10}, "nnn": {"k": 128, "alpha": 0.75},
            "dn": {"lambda": 0.5}, "dsl": {"dsl_temperature": 1.0}}
# The knob each strength sweep varies.
SWEEPS = {"ncl": "alpha", "qbnorm": "alpha", "is": "alpha", "csls": "alpha", "nnn": "alpha",
          "dn": "lambda", "dsl": "dsl_temperature"}


class Split:
  """One direction of a leak-free split: test queries x gallery, bank x gallery (diagonal gt)."""

  def __init__(self, queries: np.ndarray, bank: np.ndarray):
    self.queries = np.ascontiguousarray(queries, np.float32)
    self.bank = np.ascontiguousarray(bank, np.float32)


def leak_free(sims: np.ndarray, test: np.ndarray, bank: np.ndarray) -> dict[str, Split]:
  """t2v and v2t splits: pairs ``test`` are the test set, pairs ``bank`` the bank.

  t2v: test captions x test videos, bank = the bank's captions x the test videos.
  v2t: test videos x test captions, bank = the bank's videos x the test captions.
  """
  grid = np.ix_(test, test)
  return {"t2v": Split(sims[grid], sims[np.ix_(bank, test)]),
          "v2t": Split(sims[grid].T, sims[np.ix_(test, bank)].T)}


def r_at_1(split: Split, method: str, options: dict, bank=None) -> float:
  """Test R@1 (percent) of ``method`` with ``options`` (bank: the split's unless given)."""
  uses_bank = nz.normalizer(method).uses_bank
  scores = nz.normalize(split.queries, method,
                        (split.bank if bank is None else bank) if uses_bank else None,
                        temperature=TEMPERATURE, **options)
  return metrics.t2v_metrics(scores)["R@1"]


def select_bank(method: str, split: Split) -> dict:
  """``--select bank``: label-free cross-validated balance on the bank (none for DSL)."""
  if not nz.normalizer(method).balance:
    return {}
  return selection.select_on_bank(method, split.bank, temperature=TEMPERATURE).values


def select_val(method: str, val: Split) -> dict:
  """``--select val``: validation R@1 with the guard (as posthoc)."""
  return selection.select_on_queries(method, val.queries, val.bank, temperature=TEMPERATURE,
                                     ranks=metrics.t2v_ranks).values


def method_rows(split: Split, sweep: bool) -> dict:
  """Per method: test R@1 at the defaults, with ``--select bank`` (and the strength sweep)."""
  rows = {}
  for method in METHODS:
    row = {"default": r_at_1(split, method, DEFAULTS[method])}
    if method != "none" and nz.normalizer(method).balance:
      chosen = select_bank(method, split)
      row["bank"] = {"values": chosen, "R@1": r_at_1(split, method, chosen)}
    if sweep and method in SWEEPS:
      knob = SWEEPS[method]
      row["sweep"] = {str(v): r_at_1(split, method, {**DEFAULTS[method], knob: v})
                      for v in selection.grid(method)[knob]}
    rows[method] = row
  return rows


def headline(sims: np.ndarray) -> dict:
  """Halves: per direction and method, default and bank-selected test R@1, and the sweeps."""
  splits = leak_free(sims, np.arange(500, 1000), np.arange(500))
  return {direction: method_rows(split, sweep=True) for direction, split in splits.items()}


def thirds(sims: np.ndarray) -> list[dict]:
  """The 6 role assignments of three 333-pair thirds: test R@1 per method and rule."""
  parts = [np.arange(333 * i, 333 * (i + 1)) for i in range(3)]
  records = []
  for val_part, test_part, bank_part in itertools.permutations(range(3)):
    val = leak_free(sims, parts[val_part], parts[bank_part])
    test = leak_free(sims, parts[test_part], parts[bank_part])
    record = {"roles": {"val": val_part, "test": test_part, "bank": bank_part}}
    for direction in ("t2v", "v2t"):
      cells = {"plain": r_at_1(test[direction], "none", {})}
      for method in METHODS[1:]:
        by_val = select_val(method, val[direction])
        cell = {"default": r_at_1(test[direction], method, DEFAULTS[method]),
                "val": r_at_1(test[direction], method, by_val), "val_values": by_val}
        if nz.normalizer(method).balance:
          by_bank = select_bank(method, test[direction])
          cell.update(bank=r_at_1(test[direction], method, by_bank), bank_values=by_bank)
        cells[method] = cell
      record[direction] = cells
    records.append(record)
  return records


def transductive(sims: np.ndarray) -> dict:
  """All 1000 test queries as the bank; defaults and balance selection (labels unread)."""
  return {direction: method_rows(Split(matrix, matrix), sweep=False)
          for direction, matrix in (("t2v", sims), ("v2t", np.ascontiguousarray(sims.T)))}


def _values(values: dict) -> str:
  names = {"dsl_temperature": "T_dsl", "alpha": "α", "lambda": "λ"}
  return ", ".join(f"{names.get(k, k)} {v:g}" for k, v in values.items()) or "–"


def _label(method: str) -> str:
  return method + (" (transductive)" if nz.normalizer(method).transductive_only else "")


def _headline_table(results: dict) -> list[str]:
  lines = ["**Inductive, leak-free halves** (test = pairs 500–999; bank = captions / videos "
           "0–499 scored against the test videos / captions; test R@1, t2v / v2t, and the "
           "change against plain):", "",
           "| matrix | method | published defaults (α = 1) | Δ | `--select bank` | Δ | chosen "
           "(t2v; v2t) |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for name, per in results.items():
    t2v, v2t = per["halves"]["t2v"], per["halves"]["v2t"]
    base = (t2v["none"]["default"], v2t["none"]["default"])
    for method in METHODS:
      a, b = t2v[method]["default"], v2t[method]["default"]
      cells = [f"{a:.1f} / {b:.1f}", f"{a - base[0]:+.1f} / {b - base[1]:+.1f}"]
      if "bank" in t2v[method]:
        c, d = t2v[method]["bank"]["R@1"], v2t[method]["bank"]["R@1"]
        cells += [f"{c:.1f} / {d:.1f}", f"{c - base[0]:+.1f} / {d - base[1]:+.1f}",
                  f"{_values(t2v[method]['bank']['values'])}; "
                  f"{_values(v2t[method]['bank']['values'])}"]
      else:
        cells += ["–", "–", "–"]
      lines.append(f"| {name} | {_label(method)} | " + " | ".join(cells) + " |")
  return lines


def _thirds_table(results: dict) -> list[str]:
  lines = ["**Selection on a validation split, leak-free thirds** (6 role assignments per "
           "matrix; test R@1 minus plain, each cell t2v mean / worst ; v2t mean / worst over the 6):", "",
           "| matrix | method | published defaults mean / worst | `--select val` mean / worst | "
           "`--select bank` mean / worst | `--select bank` below plain (t2v, v2t cells of 12) |",
           "| --- | --- | --- | --- | --- | --- |"]
  for name, per in results.items():
    for method in METHODS[1:]:
      cells = []
      for rule in ("default", "val", "bank"):
        deltas = {d: [r[d][method][rule] - r[d]["plain"] for r in per["thirds"]
                      if rule in r[d][method]] for d in ("t2v", "v2t")}
        if not deltas["t2v"]:
          cells.append("–")
          continue
        cells.append(" / ".join(f"{np.mean(deltas[d]):+.1f} / {min(deltas[d]):+.1f}"
                                for d in ("t2v",)) + " ; " +
                     " / ".join(f"{np.mean(deltas[d]):+.1f} / {min(deltas[d]):+.1f}"
                                for d in ("v2t",)))
      losses = sum(r[d][method]["bank"] < r[d]["plain"] for r in per["thirds"]
                   for d in ("t2v", "v2t") if "bank" in r[d][method])
      cells.append(str(losses) if nz.normalizer(method).balance else "–")
      lines.append(f"| {name} | {_label(method)} | " + " | ".join(cells) + " |")
  return lines


def _transductive_table(results: dict) -> list[str]:
  lines = ["**Transductive** (bank = all 1000 test queries, used unlabelled; not a deployment "
           "setting; R@1, t2v / v2t):", "",
           "| matrix | method | published defaults | `--select bank` | chosen (t2v; v2t) |",
           "| --- | --- | --- | --- | --- |"]
  for name, per in results.items():
    t2v, v2t = per["transductive"]["t2v"], per["transductive"]["v2t"]
    for method in METHODS:
      cells = [f"{t2v[method]['default']:.1f} / {v2t[method]['default']:.1f}"]
      if "bank" in t2v[method]:
        cells += [f"{t2v[method]['bank']['R@1']:.1f} / {v2t[method]['bank']['R@1']:.1f}",
                  f"{_values(t2v[method]['bank']['values'])}; "
                  f"{_values(v2t[method]['bank']['values'])}"]
      else:
        cells += ["–", "–"]
      lines.append(f"| {name} | {method} | " + " | ".join(cells) + " |")
  return lines


def _sweep_tables(results: dict) -> list[str]:
  lines = ["**Strength sweep** (leak-free halves, test R@1 t2v / v2t, other knobs at their "
           "defaults; reads the test labels, a diagnostic only):", ""]
  for method, knob in SWEEPS.items():
    grid = selection.grid(method)[knob]
    lines.append(f"| {method} {_values({knob: 0}).split()[0]} | " +
                 " | ".join(f"{v:g}" for v in grid) + " |")
    lines.append("| --- " * (len(grid) + 1) + "|")
    for name, per in results.items():
      sweeps = [per["halves"][d][method]["sweep"] for d in ("t2v", "v2t")]
      lines.append(f"| {name} | " + " | ".join(
          f"{sweeps[0][str(v)]:.1f} / {sweeps[1][str(v)]:.1f}" for v in grid) + " |")
    lines.append("")
  return lines


def markdown(results: dict) -> str:
  return "\n".join(_headline_table(results) + [""] + _thirds_table(results) + [""] +
                   _transductive_table(results) + [""] + _sweep_tables(results))


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
    results[name] = {"halves": headline(sims), "thirds": thirds(sims),
                     "transductive": transductive(sims)}
  print(markdown(results))
  print(f"\n({time.time() - start:.0f} s; load average {os.getloadavg()[0]:.1f})")
  if args.json:
    with open(args.json, "x", encoding="utf-8") as handle:
      json.dump(results, handle, indent=2, default=float)


if __name__ == "__main__":
  main()
