"""Converts an OpenAI, open_clip or Hugging Face transformers CLIP checkpoint for ncl_jax.

    python tools/convert_clip.py --src ~/Downloads/ViT-B-32.pt --out ~/clip/ViT-B-32
    python tools/convert_clip.py --src ~/hf/clip-vit-base-patch16 --out ~/clip/ViT-B-16
    python tools/convert_clip.py --src open_clip_model.safetensors --open_clip_model ViT-B-32 \
        --out ~/clip/ViT-B-32-laion2b

``--src`` is one of:

* an OpenAI TorchScript ``.pt`` file (QuickGELU);
* an open_clip checkpoint (``.safetensors``, ``.bin``, ``.pt``; a training checkpoint's
  ``state_dict`` wrapper and ``module.`` prefixes are fine) or open_clip Hub snapshot directory.
  Give the activation with ``--activation quick_gelu|gelu`` or ``--open_clip_model NAME``
  (names ending in ``-quickgelu`` use QuickGELU); a snapshot's open_clip_config.json also says it;
* a Hugging Face transformers CLIPModel directory (config.json + model.safetensors or
  pytorch_model.bin), which states its own architecture and activation.

The architecture is inferred from tensor shapes. ``.safetensors`` inputs need no PyTorch.
``--out`` (new or empty) receives ``config.json`` (recording the source format), the orbax
checkpoint ``params/`` and the tokenizer vocabulary; load it with
``ncl_jax.models.load_clip(OUT)`` or train from it with ``--config.clip_dir=OUT``.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from ncl_jax import tokenizer
from ncl_jax.errors import UserError, run_cli
from ncl_jax.models import clip, clip_sources, convert


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True,
                      help="OpenAI .pt, open_clip .safetensors/.bin/.pt or Hub snapshot "
                      "directory, or transformers CLIPModel directory")
  parser.add_argument("--out", required=True, help="output directory (must be new or empty)")
  parser.add_argument("--activation", default=None,
                      help=f"MLP activation of an open_clip / state-dict checkpoint: "
                      f"{' or '.join(clip.ACTIVATIONS)}")
  parser.add_argument("--open_clip_model", default=None, metavar="NAME",
                      help="open_clip model name of the weights (e.g. ViT-B-32, "
                      "ViT-B-16-quickgelu); sets the activation by open_clip's naming rule")
  parser.add_argument("--vocab", default=None,
                      help=f"tokenizer vocabulary: CLIP's {tokenizer.VOCAB_FILE} or a "
                      f"{tokenizer.HF_VOCAB_FILE} with {tokenizer.HF_MERGES_FILE} beside it "
                      "(default: the files beside the checkpoint, else the installed clip "
                      "package's)")
  return parser.parse_args(argv)


def find_vocab_files(explicit, checkpoint: clip_sources.Checkpoint) -> list[pathlib.Path]:
  """The tokenizer to copy: --vocab, else the checkpoint directory's, else clip's own file."""
  if explicit:
    return tokenizer.vocab_files(explicit)
  candidates = ([checkpoint.tokenizer_dir] if checkpoint.tokenizer_dir is not None else []) + [None]
  for candidate in candidates:
    try:
      return tokenizer.vocab_files(candidate)
    except UserError:
      continue
  raise UserError(f"no tokenizer vocabulary found; pass --vocab PATH ({tokenizer.VOCAB_FILE} "
                  f"from OpenAI's CLIP repository, or a {tokenizer.HF_VOCAB_FILE} + "
                  f"{tokenizer.HF_MERGES_FILE} pair), or pip install --no-deps clip-anytorch")


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  out = pathlib.Path(args.out).expanduser()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out {out} already exists and is not an empty directory; choose a new one")
  checkpoint = clip_sources.read_checkpoint(args.src, args.activation, args.open_clip_model)
  vocab = find_vocab_files(args.vocab, checkpoint)
  config, params = convert.convert_state_dict(checkpoint.state_dict, checkpoint.options)
  convert.save_converted(out, config, params, vocab, checkpoint.source)
  print(f"converted {checkpoint.source['format']} {args.src} -> {out}: "
        f"{clip_sources.describe(config)}")
  return 0


if __name__ == "__main__":
  run_cli(main)
