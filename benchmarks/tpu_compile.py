"""Compiles the MSR-VTT train step for Cloud TPU slices and prints docs/tpu.md's table.

    python benchmarks/tpu_compile.py --cells b32_meanP_v5e-8,l14_meanP_v5e-8_m2   # compile
    python benchmarks/tpu_compile.py --table                                      # markdown

Each cell runs ``python -m ncl_jax.main --config=configs/msrvtt.py[:VARIANT] --compile_only
--topology=SLICE --compile_report=docs/tpu_reports/CELL.json`` in its own process, one at a time
(a real config's compile takes 6-20 minutes and 4-14 GB of host memory on a 2-core machine).
A cell whose report exists is skipped. ``--table`` reads every report in docs/tpu_reports/.
Needs libtpu (``pip install -e '.[tpu-compile]'``); no TPU.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORTS = ROOT / "docs" / "tpu_reports"
GIB = 2**30
# Cell name -> (config variant, slice, extra overrides). Names: tower_head_slice[_mM].
VARIANTS = {"b32": "", "b16": "vitb16", "l14": "vitl14"}
SLICES = ("v5e-8", "v4-8", "v5p-8", "v6e-8", "v5e-16")


def cell_command(cell: str, report: pathlib.Path) -> list[str]:
  """The compile command of a cell name such as ``l14_seqTransf_v5e-8_m2``."""
  parts = cell.split("_")
  tower, head, topology = parts[:3]
  variant = ",".join(v for v in (head if head != "meanP" else "", VARIANTS[tower]) if v)
  args = [sys.executable, "-m", "ncl_jax.main",
          f"--config=configs/msrvtt.py{':' + variant if variant else ''}", "--compile_only",
          f"--topology={topology}", f"--compile_report={report}"]
  if len(parts) > 3 and parts[3].startswith("m"):
    args.append(f"--config.microbatches={int(parts[3][1:])}")
  return args


def compile_cells(cells: list[str]) -> None:
  REPORTS.mkdir(exist_ok=True)
  env = dict(os.environ, PYTHONPATH=str(ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  for cell in cells:
    report = REPORTS / f"{cell}.json"
    if report.exists():
      print(f"{cell}: {report} exists, skipped")
      continue
    proc = subprocess.run(cell_command(cell, report), cwd=ROOT, env=env, check=False)
    print(f"{cell}: exit {proc.returncode}", flush=True)


def _row(name: str, r: dict) -> str:
  model = r["model"]
  tower = {32: "ViT-B/32", 16: "ViT-B/16", 14: "ViT-L/14"}.get(model["patch_size"], "?")
  precision = f"{'bf16' if model['dtype'] == 'bfloat16' else 'f32'}{'+remat' if model['remat'] else ''}"
  load = r["machine"]["load_average"][0]
  common = (f"| {tower} {model['head']} {precision} | {r['topology']} | "
            f"{r['per_device_batch']} | {r['microbatches']} | ")
  if "peak_bytes" not in r:
    return (common + f"needs {r['needed_bytes'] / GIB:.2f} of {r['available_bytes'] / GIB:.2f} "
            f"| — | — | **no** | {r['compile_seconds'] / 60:.1f} | {load:.1f} |")
  return (common + f"{r['peak_bytes'] / GIB:.2f} ({r['compiler_peak_bytes'] / GIB:.2f}) of "
          f"{r['hbm_bytes'] / GIB:.0f} | "
          f"{r['flops_per_step_per_device']:.3g} | {r['flops_per_example'] / 1e9:.0f} | "
          f"{'yes' if r['fits'] else '**no**'} | {r['compile_seconds'] / 60:.1f} | {load:.1f} |")


def table() -> str:
  lines = ["| variant | slice | videos/device | micro-batches | peak GiB per device (compiler's) of HBM | "
           "FLOPs/step/device | GFLOPs/example | fits | compile min | load |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for path in sorted(REPORTS.glob("*.json")):
    lines.append(_row(path.stem, json.loads(path.read_text())))
  return "\n".join(lines)


def missing_cells() -> list[str]:
  """Cells of the towers x heads x SLICES grid without a report (at any micro-batch count)."""
  measured = {"_".join(p.stem.split("_")[:3]) for p in REPORTS.glob("*.json")}
  return [f"{tower}_{head}_{topology}" for tower in VARIANTS for head in ("meanP", "seqTransf")
          for topology in SLICES if f"{tower}_{head}_{topology}" not in measured]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--cells", default="", help="comma-separated cells to compile")
  parser.add_argument("--table", action="store_true", help="print the markdown table")
  args = parser.parse_args()
  if args.cells:
    compile_cells([c for c in args.cells.split(",") if c])
  if args.table:
    print(table())
    print("\nnot measured: " + ", ".join(missing_cells()))


if __name__ == "__main__":
  main()
