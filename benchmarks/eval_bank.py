"""Evaluation-bank ablation (config.eval.bank): the training queue vs the re-encoded pairs.

NCL-normalized inference with the training queue as it stands against the same training pairs
re-encoded with the evaluated parameters:

    python -m ncl_jax.main --config=configs/synthetic.py --workdir=/tmp/bank_seed0 --config.data.seed=0
    python benchmarks/eval_bank.py /tmp/bank_seed0 [/tmp/bank_seed1 ...] [--bank_size N] [--out F]

Each argument is a finished run. The bank changes neither training nor the checkpoint selection
(as long as ``eval.select_metric`` is a plain metric, the default), so one run per data set is
enough: the script restores the run's selected checkpoint and evaluates its test split with
each bank. The "queue" row reproduces the run's ``results.json``; the "reencoded" row is what
the same run with ``--config.eval.bank=reencoded`` reports. ``--bank_size N`` adds a row for a
re-encoded bank of N training pairs (``--config.eval.bank_size=N``).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics

import ml_collections

from ncl_jax import checkpointing
from ncl_jax import evaluate
from ncl_jax import runs
from ncl_jax import train

DIRECTIONS = ("t2v", "v2t")


def evaluate_banks(workdir: pathlib.Path, bank_size: int = 0) -> dict[str, dict]:
  """Test results of the run's selected checkpoint with each bank of ``evaluate.BANKS`` (and a
  re-encoded bank of ``bank_size`` pairs, under the key ``"reencoded_<bank_size>"``)."""
  config = ml_collections.ConfigDict(json.loads((workdir / runs.CONFIG_FILE).read_text()))
  finished = json.loads((workdir / runs.RESULTS_FILE).read_text())
  if config.eval.bank != "queue" or not config.eval.select_metric.startswith("plain/"):
    raise SystemExit(f"{workdir}: train with eval.bank='queue' and a plain select_metric")
  run = train.Run(config)
  with checkpointing.Checkpointer(workdir, config=config.to_dict()) as ckpt:
    state, _ = ckpt.restore(finished["selected_step"], run.abstract_state)
  out = {}
  variants = [(bank, bank, 0) for bank in evaluate.BANKS]
  if bank_size:
    variants.append((f"reencoded_{bank_size}", "reencoded", bank_size))
  for key, bank, size in variants:
    config.eval.bank, config.eval.bank_size = bank, size
    results = run.evaluate(state, finished["split"])
    out[key] = {"R@1": {mode: {d: results[mode][d]["R@1"] for d in DIRECTIONS}
                         for mode in ("plain", "ncl")},
                 "normalization_error": results["normalization_error"],
                 "bank_size": results["bank_size"]}
  queue_r1 = {d: finished["eval"]["ncl"][d]["R@1"] for d in DIRECTIONS}
  if queue_r1 != out["queue"]["R@1"]["ncl"]:
    raise SystemExit(f"{workdir}: the queue bank gives {out['queue']['R@1']['ncl']}, but "
                     f"results.json holds {queue_r1}")
  return out


def _mean_sd(values):
  return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 \
      else f"{values[0]:.1f}"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("workdirs", nargs="+", type=pathlib.Path)
  parser.add_argument("--bank_size", type=int, default=0,
                      help="also a re-encoded bank of this many training pairs")
  parser.add_argument("--out", type=pathlib.Path, help="also write the numbers as JSON here")
  args = parser.parse_args()
  if args.out is not None and args.out.exists():
    raise SystemExit(f"{args.out} exists; choose another --out")
  per_run = {str(d): evaluate_banks(d, args.bank_size) for d in args.workdirs}
  print("R@1 per run (mean ± standard deviation); normalization error: mean relative error")
  print("| inference | text -> video R@1 | video -> text R@1 | normalization error |")
  print("|---|---|---|---|")
  rows = [("plain", "queue", "plain"), ("NCL, queue bank", "queue", "ncl"),
          ("NCL, re-encoded bank", "reencoded", "ncl")]
  if args.bank_size:
    rows.append((f"NCL, re-encoded bank of {args.bank_size}", f"reencoded_{args.bank_size}",
                 "ncl"))
  for label, bank, mode in rows:
    cells = []
    for d in DIRECTIONS:
      values = [r[bank]["R@1"][mode][d] for r in per_run.values()]
      cells.append(", ".join(f"{v:.1f}" for v in values) + f" ({_mean_sd(values)})")
    errors = [r[bank]["normalization_error"][mode] for r in per_run.values()]
    error = f"{statistics.mean(errors):.3f}" + (
        f" ± {statistics.stdev(errors):.3f}" if len(errors) > 1 else "")
    print(f"| {label} | {cells[0]} | {cells[1]} | {error} |")
  if args.out is not None:
    args.out.write_text(json.dumps(per_run, indent=2) + "\n")


if __name__ == "__main__":
  main()
