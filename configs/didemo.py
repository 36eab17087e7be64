"""DiDeMo paragraph-to-video retrieval with CLIP4Clip's recipe and NCL.

Prepare the data and convert CLIP's weights first (docs/training.md), then::

  python -m ncl_jax.main --config=configs/didemo.py --workdir=runs/didemo_ncl

CLIP4Clip: global batch 128 (8 GPUs), 64 words, 64 frames, 5 epochs, lr 1e-4 (new) / 1e-7
(CLIP), ViT-B/32; the descriptions of a video form one paragraph.
"""

from ncl_jax import config_base


def get_config(variant=None):
  config = config_base.get_dataset_config("didemo", variant)
  config.eval.batch_size = 64
  return config
