"""Embeds one split of a data set with a trained model and writes NumPy files.

    python tools/embed.py --bundle BUNDLE --split test --out DIR [--data_dir DIR]
    python tools/embed.py --workdir RUN --split test --out DIR

Reads the data set the run was trained on (its ``config.data``; ``--data_dir`` points at another
prepared copy) and writes to the new folder ``DIR`` (never overwritten):

* ``text_emb.npy`` [n_texts, E] and ``video_emb.npy`` [n_videos, E], L2-normalised float32;
* ``caption_to_video.npy`` [n_texts] int32, the video of each caption; ``video_ids.txt``;
* ``sims.npy`` [n_texts, n_videos], the cosine similarities;
* ``bank_t2v.npy`` [n_bank_texts, n_videos] and ``bank_v2t.npy`` [n_bank_videos, n_texts]:
  the training query queues against this split (the inductive banks of NCL normalization);
* ``info.json``: split, counts, the model's temperature, and the ``python -m ncl_jax.posthoc``
  command that evaluates these files (also printed at the end).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shlex
import sys

from ncl_jax.errors import UserError, run_cli


class _Parser(argparse.ArgumentParser):
  def error(self, message):
    raise UserError(f"{message} (see --help)")


def parse_args(argv):
  parser = _Parser(prog="python tools/embed.py", description=__doc__.split("\n\n")[0])
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--bundle", help="a bundle written by tools/export.py")
  source.add_argument("--workdir", help="a training run (its selected checkpoint)")
  parser.add_argument("--split", default="test", help="the split to embed (default: test)")
  parser.add_argument("--out", required=True, help="new output folder")
  parser.add_argument("--data_dir", help="prepared data folder (default: the run's)")
  parser.add_argument("--batch_size", type=int, default=64, help="items per encoder call")
  parser.add_argument("--backend", choices=("flax", "exported"), default="flax",
                      help="with --bundle: run the rebuilt model or the exported functions")
  return parser.parse_args(argv)


def posthoc_command(out: pathlib.Path, temperature: float, method: str = "ncl") -> str:
  """The ``python -m ncl_jax.posthoc`` command line for the files in ``out``."""
  parts = ["python", "-m", "ncl_jax.posthoc", str(out / "sims.npy"), "--method", method,
           "--gt", str(out / "caption_to_video.npy"), "--temperature", repr(float(temperature))]
  if method == "ncl":
    parts += ["--bank", str(out / "bank_t2v.npy"), "--v2t-bank", str(out / "bank_v2t.npy")]
  return " ".join(shlex.quote(p) for p in parts)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = pathlib.Path(args.out).expanduser()
  if out.exists():
    raise UserError(f"--out {out} already exists; choose a new folder (nothing is overwritten)")
  if args.batch_size < 1:
    raise UserError("--batch_size must be positive")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ncl_jax import inference  # pylint: disable=g-import-not-at-top
  from ncl_jax.data import get_dataset  # pylint: disable=g-import-not-at-top

  if args.bundle:
    bundle = inference.load_bundle(args.bundle, backend=args.backend)
  else:
    bundle = inference.bundle_from_run(args.workdir)
  data_config = bundle.config.data
  if args.data_dir:
    data_config.data_dir = args.data_dir
  dataset = get_dataset(data_config, bundle.tokenizer)
  eval_data = dataset.eval_data(args.split)
  text, video = inference.embed_split(bundle, eval_data, args.batch_size)

  out.mkdir(parents=True)
  np.save(out / "text_emb.npy", text)
  np.save(out / "video_emb.npy", video)
  np.save(out / "caption_to_video.npy", eval_data.caption_to_video.astype(np.int32))
  np.save(out / "sims.npy", text @ video.T)
  np.save(out / "bank_t2v.npy", bundle.text_bank @ video.T)
  np.save(out / "bank_v2t.npy", bundle.video_bank @ text.T)
  ids = eval_data.video_ids or [str(i) for i in range(eval_data.num_videos)]
  (out / "video_ids.txt").write_text("".join(f"{v}\n" for v in ids))
  command = posthoc_command(out, bundle.temperature)
  info = {"split": args.split, "dataset": data_config.name, "num_texts": int(len(text)),
          "num_videos": int(len(video)), "embed_dim": int(text.shape[1]),
          "temperature": bundle.temperature,
          "bank_size": {"t2v": int(len(bundle.text_bank)), "v2t": int(len(bundle.video_bank))},
          "source": args.bundle or args.workdir, "posthoc": command}
  (out / "info.json").write_text(json.dumps(info, indent=2) + "\n")
  print(f"wrote {len(text)} caption and {len(video)} video embeddings of {data_config.name} "
        f"{args.split} to {out}\nevaluate them with:\n  {command}", flush=True)
  return 0


if __name__ == "__main__":
  run_cli(main)
