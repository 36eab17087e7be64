"""MSR-VTT with CLIP4Clip's recipe and NCL (train on 9k, test on 1k-A).

Prepare the data and convert CLIP's weights first (docs/training.md), then::

  python -m ncl_jax.main --config=configs/msrvtt.py --workdir=runs/msrvtt_ncl
  python -m ncl_jax.main --config=configs/msrvtt.py:seqTransf --workdir=runs/msrvtt_ncl_seq
  python -m ncl_jax.main --config=configs/msrvtt.py --config.loss=infonce --workdir=runs/msrvtt_nce

CLIP4Clip: global batch 128 (4 GPUs), 32 words, 12 frames at 1 fps, 5 epochs, lr 1e-4 (new) /
1e-7 (CLIP), ViT-B/32. Every caption of the 9k training videos is a training example.
"""

from ncl_jax import config_base


def get_config(head=None):
  return config_base.get_dataset_config("msrvtt", head)
