"""MSR-VTT with CLIP4Clip's recipe and NCL (train on 9k, test on 1k-A).

Prepare the data and convert CLIP's weights first (docs/training.md), then::

  python -m ncl_jax.main --config=configs/msrvtt.py --workdir=runs/msrvtt_ncl
  python -m ncl_jax.main --config=configs/msrvtt.py:seqTransf --workdir=runs/msrvtt_ncl_seq
  python -m ncl_jax.main --config=configs/msrvtt.py --config.loss=infonce --workdir=runs/msrvtt_nce
  python -m ncl_jax.main --config=configs/msrvtt.py:vitb16 --workdir=runs/msrvtt_ncl_b16
  python -m ncl_jax.main --config=configs/msrvtt.py:seqTransf,vitl14 --workdir=runs/msrvtt_l14

``:vitb16`` / ``:vitl14`` (any data set's config takes them, with or without a head) switch to
ViT-B/16 or ViT-L/14 weights from ~/ncl_jax_data/clip/ViT-B-16 or ViT-L-14, in bfloat16 with
rematerialised blocks, at CLIP4Clip's batch and frames (docs/models.md, "Bigger towers").

CLIP4Clip: global batch 128 (4 GPUs), 32 words, 12 frames at 1 fps, 5 epochs, lr 1e-4 (new) /
1e-7 (CLIP), ViT-B/32. Every caption of the 9k training videos is a training example.
"""

from ncl_jax import config_base


def get_config(variant=None):
  return config_base.get_dataset_config("msrvtt", variant)
