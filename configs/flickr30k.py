"""Flickr30k image-text retrieval (Karpathy splits) with the CLIP image tower and NCL.

An image is a one-frame video (``ncl_jax.data.image_text``): CLIP ViT-B/32 with CLIP4Clip's
meanP head over that single frame, i.e. plain CLIP image embeddings. Prepare the data and
convert CLIP's weights first (docs/data.md, "Image-text retrieval"), then::

  python -m ncl_jax.main --config=configs/flickr30k.py --workdir=runs/f30k_ncl

Training uses the 29,000 Karpathy training images (all 5 captions each), model selection the
1,014-image val split, and the 1,000-image test split is reported. The optimiser is the video
configs' CLIP4Clip recipe, not tuned for images; no reference numbers were reproduced with it.
"""

from ncl_jax import config_base


def get_config(variant=None):
  return config_base.get_dataset_config("flickr30k", variant)
