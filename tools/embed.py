"""Embeds one split of a data set, or a caption file, with a trained model and writes NumPy files.

    python tools/embed.py --bundle BUNDLE --split test --out DIR [--data_dir DIR]
    python tools/embed.py --workdir RUN --split test --out DIR
    python tools/embed.py --bundle BUNDLE --captions CAPTIONS.txt --out TEXT_EMB.npy

With ``--captions`` (one caption per line, e.g. all training captions or a query log: a bank
for ``python -m ncl_jax.gallery biases``) it writes the new file ``TEXT_EMB.npy``
[n_lines, E] float32, row i from line i. The file is read twice (a line count, then the
captions in batches) and the output is written through a memory map, so memory stays bounded
for any number of lines; a progress line goes to stderr every ``--progress_seconds``. A
synthetic-set bundle takes its words (``c0_1 a17 w3``); a bundle without a tokenizer takes lines
of whitespace-separated token ids.

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

from ncl_jax import npy_files
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
  parser.add_argument("--captions", help="CAPTIONS.txt: embed its lines instead of a split")
  parser.add_argument("--out", required=True,
                      help="new output folder (a new .npy file with --captions)")
  parser.add_argument("--progress_seconds", type=float, default=30.0,
                      help="--captions: seconds between progress lines (default 30)")
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


def count_lines(path: pathlib.Path) -> int:
  """Lines in a text file (a last line without a newline counts), read in 16 MiB blocks."""
  count, last = 0, b"\n"
  with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(1 << 24), b""):
      count += block.count(b"\n")
      last = block[-1:]
  return count + (last != b"\n")


def caption_batches(path: pathlib.Path, rows: int):
  """Lists of up to ``rows`` captions (lines without their newline), in file order."""
  batch = []
  with open(path, encoding="utf-8") as handle:
    for line in handle:
      batch.append(line.rstrip("\r\n"))
      if len(batch) == rows:
        yield batch
        batch = []
  if batch:
    yield batch


def _token_ids(lines, path, first_line: int, max_words: int):
  """Token id rows for a bundle without a tokenizer: each line holds integer ids."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  tokens = np.zeros((len(lines), max_words), np.int32)
  for row, line in enumerate(lines):
    try:
      ids = [int(t) for t in line.split()]
    except ValueError:
      raise UserError(f"{path} line {first_line + row + 1} is not token ids, and this bundle has "
                      "no tokenizer vocabulary; give whitespace-separated integers") from None
    if len(ids) > max_words:
      raise UserError(f"{path} line {first_line + row + 1} has {len(ids)} token ids; at most "
                      f"{max_words} fit")
    tokens[row, :len(ids)] = ids
  return tokens


def embed_captions(bundle, captions: pathlib.Path, out: pathlib.Path, batch_size: int,
                   progress_seconds: float = 30.0) -> int:
  """Embeds every line of ``captions`` into the new file ``out`` [n_lines, E]; returns n_lines.

  Memory holds one block of captions at a time; the output goes through a memory map into a
  temporary file that is renamed to ``out`` only when complete.
  """
  import time  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  if not captions.is_file():
    raise UserError(f"--captions file {captions} not found")
  n_lines = count_lines(captions)
  if n_lines == 0:
    raise UserError(f"--captions file {captions} is empty; give one caption per line")
  rows = batch_size * 16  # captions read per block; the encoder still sees batch_size at a time
  start = last_report = time.monotonic()

  def write(path):
    nonlocal last_report
    emb = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32,
                                    shape=(n_lines, bundle.embed_dim))
    done = 0
    for lines in caption_batches(captions, rows):
      texts = (lines if bundle.tokenizer is not None
               else _token_ids(lines, captions, done, bundle.max_words))
      emb[done:done + len(lines)] = bundle.embed_texts(texts, batch_size)
      done += len(lines)
      now = time.monotonic()
      if now - last_report >= progress_seconds or done == n_lines:
        rate = done / max(now - start, 1e-9)
        print(f"embedded {done}/{n_lines} captions ({rate:.0f}/s, "
              f"{(n_lines - done) / rate:.0f} s left)", file=sys.stderr, flush=True)
        last_report = now
    emb.flush()
    del emb

  npy_files.save_new(out, write)
  return n_lines


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = pathlib.Path(args.out).expanduser()
  if out.exists():
    raise UserError(f"--out {out} already exists; choose a new name (nothing is overwritten)")
  if args.batch_size < 1:
    raise UserError("--batch_size must be positive")
  if args.captions and out.suffix != ".npy":
    raise UserError(f"with --captions, --out names a new .npy file, got {str(out)!r}")
  import numpy as np  # pylint: disable=g-import-not-at-top
  from ncl_jax import inference  # pylint: disable=g-import-not-at-top
  from ncl_jax.data import get_dataset  # pylint: disable=g-import-not-at-top

  if args.bundle:
    bundle = inference.load_bundle(args.bundle, backend=args.backend)
  else:
    bundle = inference.bundle_from_run(args.workdir)
  if args.captions:
    n = embed_captions(bundle, pathlib.Path(args.captions).expanduser(), out, args.batch_size,
                       args.progress_seconds)
    print(f"wrote {n} caption embeddings to {out}", flush=True)
    return 0
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
