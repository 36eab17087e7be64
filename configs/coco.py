"""MS-COCO image-text retrieval (Karpathy splits) with the CLIP image tower and NCL.

NCL's paper names retrieval beyond video as future work; this config tries it. An image is a
one-frame video (``ncl_jax.data.image_text``), so the model is CLIP ViT-B/32 with CLIP4Clip's
meanP head over that single frame, i.e. plain CLIP image embeddings. Prepare the data and
convert CLIP's weights first (docs/data.md, "Image-text retrieval"), then::

  python -m ncl_jax.main --config=configs/coco.py --workdir=runs/coco_ncl
  python -m ncl_jax.main --config=configs/coco.py --config.loss=infonce --workdir=runs/coco_nce

Training uses Karpathy's train + restval (113,287 images, every caption an example), model
selection the 5k val split, and the 5k test split (first 5 captions per image) is reported.
The optimiser is the video configs' CLIP4Clip recipe, not tuned for images; no reference numbers
were reproduced with it.
"""

from ncl_jax import config_base


def get_config(variant=None):
  config = config_base.get_dataset_config("coco", variant)
  config.data.train_split = "train+restval"
  return config
