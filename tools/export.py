"""Writes an inference bundle from a training run, optionally verifying it.

    python tools/export.py --workdir runs/msvd_ncl --out bundles/msvd_ncl [--verify]

The bundle (layout in ``ncl_jax/export.py``) holds the selected checkpoint's encoder parameters
(orbax), the run's config, the tokenizer vocabulary (real data sets), the NCL bias bank (the
training query queues of both directions) and ``jax.export`` serializations of the text and video
embedding functions with the JAX version that made them. The serialized functions are for
deployment, not archival; ``params/`` + ``config.json`` are the durable copy. Load it with
``ncl_jax.inference.load_bundle(BUNDLE)``. ``--out`` must not exist: nothing is overwritten.

``--verify`` re-embeds the run's evaluation split through the exported functions, recomputes the
metrics and prints one JSON line ``{"verified": true|false, "t2v": {...}, "v2t": {...}, ...}``:
verified when the plain metrics equal the run's results.json and the embeddings match the
training code path to <= 1e-5. The exit code is 1 when verification fails.
"""

from __future__ import annotations

import argparse
import json
import sys

from ncl_jax.errors import UserError, run_cli


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(f"{message} (see --help)")


def parse_args(argv):
  parser = _Parser(prog="python tools/export.py", description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="the training run's --workdir")
  parser.add_argument("--out", required=True, help="the new bundle folder (must not exist)")
  parser.add_argument("--step", type=int, default=None,
                      help="checkpoint step (default: the run's selected, best-on-validation "
                           "step; the newest for an unfinished run)")
  parser.add_argument("--platforms", default="cpu,cuda,tpu",
                      help="comma-separated platforms the exported functions are lowered for")
  parser.add_argument("--verify", action="store_true",
                      help="re-embed the evaluation split through the exported functions and "
                           "compare with results.json")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  from ncl_jax import export  # pylint: disable=g-import-not-at-top  (slow: imports JAX)
  platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip())
  manifest = export.export_bundle(args.workdir, args.out, step=args.step, platforms=platforms)
  print(f"wrote {args.out}: step {manifest['step']} of {manifest['workdir']}, bank "
        f"{manifest['bank_size']['text']} texts / {manifest['bank_size']['video']} videos, "
        f"functions for {', '.join(manifest['exported']['platforms'])} "
        f"(JAX {manifest['jax_version']})", file=sys.stderr if args.verify else sys.stdout,
        flush=True)
  if not args.verify:
    return 0
  report = export.verify_bundle(args.workdir, args.out)
  print(json.dumps(report), flush=True)
  return 0 if report["verified"] else 1


if __name__ == "__main__":
  run_cli(main)
