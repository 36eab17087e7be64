"""Flax CLIP encoders, CLIP4Clip video heads, and CLIP weight import from OpenAI, open_clip and
Hugging Face transformers checkpoints (the tokenizer is ``ncl_jax.tokenizer``)."""

from ncl_jax.models.clip import CLIP
from ncl_jax.models.convert import config_from_clip, load_clip, read_config
from ncl_jax.models.dual_encoder import (
    DualEncoder,
    default_model_config,
    init_dual_encoder_from_clip,
    param_labels,
)
from ncl_jax.models.heads import l2_normalize, masked_mean, pool_frames

__all__ = [
    "CLIP",
    "DualEncoder",
    "config_from_clip",
    "default_model_config",
    "init_dual_encoder_from_clip",
    "l2_normalize",
    "load_clip",
    "masked_mean",
    "param_labels",
    "pool_frames",
    "read_config",
]
