"""MSR-VTT with CLIP4Clip's recipe and NCL (train on 9k, test on 1k-A).

Prepare the data and convert CLIP's weights first (README, "Training"), then::

  python -m ncl_jax.main --config=configs/msrvtt.py --workdir=runs/msrvtt_ncl
  python -m ncl_jax.main --config=configs/msrvtt.py:seqTransf --workdir=runs/msrvtt_ncl_seq
  python -m ncl_jax.main --config=configs/msrvtt.py --config.loss=infonce --workdir=runs/msrvtt_nce

CLIP4Clip: global batch 128 (4 GPUs), 32 words, 12 frames at 1 fps, 5 epochs, lr 1e-4 (new) /
1e-7 (CLIP), ViT-B/32. Every caption of the 9k training videos is a training example.
"""

import importlib.util
import pathlib


def _base():
  spec = importlib.util.spec_from_file_location(
      "ncl_jax_configs_base", pathlib.Path(__file__).resolve().with_name("base.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(head=None):
  return _base().get_dataset_config("msrvtt", head)
