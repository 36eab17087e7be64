"""MSVD with CLIP4Clip's recipe and NCL (about 40 captions per video).

Prepare the data and convert CLIP's weights first (docs/training.md), then::

  python -m ncl_jax.main --config=configs/msvd.py --workdir=runs/msvd_ncl
  python -m ncl_jax.main --config=configs/msvd.py:seqTransf --workdir=runs/msvd_ncl_seq

CLIP4Clip: global batch 128, 32 words, 12 frames, 5 epochs, lr 1e-4 (new) / 1e-7 (CLIP),
ViT-B/32. Every caption is a training example. Test text-to-video ranks every caption against
the 670 test videos; video-to-text uses ``config.eval.v2t_protocol`` ("strict" by default;
"group_max" is CLIP4Clip's lenient protocol).
"""

from ncl_jax import config_base


def get_config(variant=None):
  return config_base.get_dataset_config("msvd", variant)
