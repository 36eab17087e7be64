"""Converts an OpenAI CLIP checkpoint into an ncl_jax CLIP directory.

    python tools/convert_clip.py --src ~/Downloads/ViT-B-32.pt --out ~/clip/ViT-B-32

``--src`` is one of the TorchScript ``.pt`` files OpenAI publishes or a plain
``torch.save(model.state_dict())`` file. The architecture is inferred from the tensor shapes.
``--out`` (new or empty) receives ``config.json``, the orbax checkpoint ``params/`` and the
tokenizer vocabulary; load it with ``ncl_jax.models.load_clip(OUT)``.
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import sys

from ncl_jax.errors import UserError, run_cli
from ncl_jax.models import convert


def default_vocab() -> pathlib.Path | None:
  """The vocabulary file inside an installed OpenAI ``clip`` package, if any (not imported)."""
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    return None
  path = pathlib.Path(list(spec.submodule_search_locations)[0]) / convert.VOCAB_FILE
  return path if path.is_file() else None


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="OpenAI CLIP checkpoint (.pt)")
  parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
  parser.add_argument("--vocab", default=None,
                      help=f"CLIP's {convert.VOCAB_FILE} (default: the one in the installed "
                      "clip package)")
  return parser.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  vocab = pathlib.Path(args.vocab).expanduser() if args.vocab else default_vocab()
  if vocab is None or not vocab.is_file():
    raise UserError(f"tokenizer vocabulary {vocab or convert.VOCAB_FILE} not found; pass --vocab "
                    "PATH (it ships with OpenAI's CLIP repository as clip/" + convert.VOCAB_FILE
                    + ", or install it with pip install --no-deps clip-anytorch)")
  out = pathlib.Path(args.out).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out {out} already exists and is not an empty directory; choose a new one")
  state_dict = convert.read_torch_checkpoint(args.src)
  config, params = convert.convert_state_dict(state_dict)
  convert.save_converted(out, config, params, vocab)
  v, t = config.vision, config.text
  print(f"converted {args.src} -> {out}: ViT {v.layers}x{v.width} patch {v.patch_size} at "
        f"{v.image_size}px, text {t.layers}x{t.width} context {t.context_length}, "
        f"embed {config.embed_dim}")
  return 0


if __name__ == "__main__":
  run_cli(main)
