"""The text-video dual encoder NCL trains: CLIP towers plus a CLIP4Clip video head.

``DualEncoder(config)`` maps token ids to L2-normalised text embeddings and videos to
L2-normalised video embeddings, in one of two input modes:

* ``frames``: pixels [N, T, H, W, 3] (CLIP-normalised) → CLIP's ViT per frame → head;
* ``features``: precomputed per-frame features [N, T, feature_dim] → (a learned projection when
  feature_dim ≠ embed_dim) → head, for users who only have features and train the heads cheaply.

Parameter tree (top-level keys): ``text`` (the CLIP text tower), ``visual`` (the CLIP image tower,
frames mode only), ``feature_proj`` (features mode with feature_dim ≠ embed_dim), ``head``
(seqTransf only) and the scalar ``logit_scale``. The first three CLIP names match
:class:`ncl_jax.models.clip.CLIP`, so :func:`init_dual_encoder_from_clip` copies them over.
"""

from __future__ import annotations

import math
import re
from typing import Mapping
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections

from ncl_jax.errors import UserError
from ncl_jax.models import clip, heads

INPUT_MODES = ("frames", "features")
LABELS = ("clip", "new", "frozen")
# Per-tower options that a CLIP checkpoint fixes (they change no parameter shape except
# mlp_ratio); OpenAI's values.
OPENAI_BLOCK_OPTIONS = dict(mlp_ratio=clip.MLP_RATIO, activation="quick_gelu",
                            layer_norm_eps=clip.LN_EPSILON)


def default_model_config() -> ml_collections.ConfigDict:
  """ViT-B/32 CLIP with a meanP head over 12 frames, float32, nothing frozen.

  Fields:
    input_mode: "frames" (pixels) or "features" (precomputed per-frame features).
    feature_dim: per-frame feature size in features mode.
    embed_dim: joint embedding size E (CLIP's projection size).
    vision: width, layers, heads, patch_size, image_size of the ViT (frames mode), and the
      block options mlp_ratio, activation ("quick_gelu" or "gelu"), layer_norm_eps.
    text: width, layers, heads, vocab_size, context_length of the text transformer, the same
      block options and eos_id (-1: pool at the largest token id; see ncl_jax.models.clip).
      Training from a CLIP checkpoint (``clip_dir``) takes the block options from it.
    head: "meanP" or "seqTransf".
    head_layers, head_heads: seqTransf's transformer depth and heads (CLIP4Clip: 4 and the text
      tower's heads, as its blocks are copied from the text tower).
    max_frames: frames per video T (seqTransf's frame-position table has this many rows).
    dtype: compute dtype, "float32" or "bfloat16"; parameters stay float32.
    remat: rematerialise every transformer block in the backward pass.
    freeze_text_layers, freeze_vision_layers: -1 trains everything; n >= 0 freezes the tower's
      embeddings and its first n blocks, like CLIP4Clip's ``--freeze_layer_num n`` (whose
      default, 0, freezes the embeddings only).
    init_logit_scale: initial log inverse temperature, ln(1/0.07) as CLIP from scratch; loading
      CLIP weights replaces it with CLIP's learned value.
  """
  config = ml_collections.ConfigDict()
  config.input_mode = "frames"
  config.feature_dim = 512
  config.embed_dim = 512
  config.vision = ml_collections.ConfigDict(
      dict(width=768, layers=12, heads=12, patch_size=32, image_size=224, **OPENAI_BLOCK_OPTIONS))
  config.text = ml_collections.ConfigDict(
      dict(width=512, layers=12, heads=8, vocab_size=49408, context_length=77,
           **OPENAI_BLOCK_OPTIONS, eos_id=-1))
  config.head = "meanP"
  config.head_layers = 4
  config.head_heads = 8
  config.max_frames = 12
  config.dtype = "float32"
  config.remat = False
  config.freeze_text_layers = -1
  config.freeze_vision_layers = -1
  config.init_logit_scale = math.log(1 / 0.07)
  return config


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for option values the model does not support."""
  if config.input_mode not in INPUT_MODES:
    raise UserError(f"model.input_mode must be one of {INPUT_MODES}, got {config.input_mode!r}")
  if config.head not in heads.HEADS:
    raise UserError(f"model.head must be one of {heads.HEADS} (CLIP4Clip's seqLSTM and "
                    f"tightTransf are not implemented), got {config.head!r}")
  if config.dtype not in ("float32", "bfloat16"):
    raise UserError(f"model.dtype must be 'float32' or 'bfloat16', got {config.dtype!r}")
  if config.head == "seqTransf" and config.embed_dim % config.head_heads:
    raise UserError(f"model.embed_dim {config.embed_dim} must be divisible by model.head_heads "
                    f"{config.head_heads}")
  for tower in ("vision", "text"):
    sub = config[tower]
    if sub.width % sub.heads:
      raise UserError(f"model.{tower}.width {sub.width} must be divisible by model.{tower}.heads "
                      f"{sub.heads}")
    activation = sub.get("activation", "quick_gelu")
    if activation not in clip.ACTIVATIONS:
      raise UserError(f"model.{tower}.activation must be one of {', '.join(clip.ACTIVATIONS)}, "
                      f"got {activation!r}")


class DualEncoder(nn.Module):
  """Text tower + video tower (CLIP ViT per frame or precomputed features) + CLIP4Clip head.

  Attributes:
    config: a :func:`default_model_config`-shaped ConfigDict.
  """

  config: ml_collections.ConfigDict

  def setup(self):
    c = self.config
    validate_config(c)
    self.text = clip.text_tower(c, int(c.freeze_text_layers))
    if c.input_mode == "frames":
      self.visual = clip.vision_tower(c, int(c.freeze_vision_layers))
    elif c.feature_dim != c.embed_dim:
      self.feature_proj = nn.Dense(c.embed_dim, dtype=clip.compute_dtype(c.dtype),
                                   param_dtype=jnp.float32)
    if c.head == "seqTransf":
      self.head = heads.SeqTransf(c.embed_dim, c.head_layers, c.head_heads, c.max_frames,
                                  clip.compute_dtype(c.dtype), bool(c.remat),
                                  **clip.block_options(c.text))
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.init_logit_scale), ())

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """tokens [N, L] int32 → [N, embed_dim] float32, L2-normalised."""
    return heads.l2_normalize(self.text(tokens))

  def frame_embeddings(self, video: jax.Array) -> jax.Array:
    """video [N, T, H, W, 3] frames or [N, T, feature_dim] features → [N, T, E] (unnormalised)."""
    c = self.config
    if c.input_mode == "frames":
      if video.ndim != 5:
        raise ValueError(f"frames mode expects video [N, T, H, W, 3], got shape {video.shape}")
      n, t = video.shape[:2]
      return self.visual(video.reshape(n * t, *video.shape[2:])).reshape(n, t, -1)
    if video.ndim != 3 or video.shape[-1] != c.feature_dim:
      raise ValueError(f"features mode expects video [N, T, {c.feature_dim}], got {video.shape}")
    if c.feature_dim != c.embed_dim:
      return self.feature_proj(video)
    return video.astype(clip.compute_dtype(c.dtype))

  def encode_video(self, video: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """video (see :meth:`frame_embeddings`), frame_mask [N, T] bool → [N, E] float32, unit norm."""
    frames = self.frame_embeddings(video)
    if self.config.head == "seqTransf":
      frames = self.head(frames, frame_mask)
    return heads.pool_frames(frames, frame_mask)

  def __call__(self, tokens: jax.Array, video: jax.Array, frame_mask: jax.Array):
    """Returns (text_emb [N, E], video_emb [M, E], exp(logit_scale)); embeddings normalised."""
    return (self.encode_text(tokens), self.encode_video(video, frame_mask),
            jnp.exp(self.logit_scale))


def _path_names(path) -> tuple[str, ...]:
  return tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)


def _tree_get(tree, names):
  for name in names:
    tree = tree[name]
  return tree


def _block_index(names: tuple[str, ...]) -> int | None:
  for name in names:
    match = re.fullmatch(r"resblocks_(\d+)", name)
    if match:
      return int(match.group(1))
  return None


def _is_frozen(names: tuple[str, ...], config: ml_collections.ConfigDict) -> bool:
  """CLIP4Clip's rule: embeddings and the first n blocks freeze; the output layers never do."""
  tower = names[0]
  if tower == "text":
    frozen = int(config.freeze_text_layers)
    embeddings = ("token_embedding", "positional_embedding")
  elif tower == "visual":
    frozen = int(config.freeze_vision_layers)
    embeddings = ("patch_embedding", "class_embedding", "positional_embedding", "ln_pre")
  else:
    return False
  if frozen < 0:
    return False
  if names[1] in embeddings:
    return True
  block = _block_index(names)
  return block is not None and block < frozen


def param_labels(params, config: ml_collections.ConfigDict, pretrained: bool = True):
  """Labels every parameter "clip", "new" or "frozen" (e.g. for ``optax.multi_transform``).

  Args:
    params: a DualEncoder's parameter tree (the contents of ``variables["params"]``).
    config: its model config (the freeze_* fields decide what is frozen).
    pretrained: whether the CLIP towers and logit scale carry pretrained CLIP weights. With
      False (training from scratch) they are labelled "new" as well.

  Returns:
    A tree of the same structure with a string label per leaf: "frozen" for frozen tower
    parameters, "clip" for the other CLIP tower parameters and the logit scale (CLIP4Clip trains
    them with a smaller learning rate), "new" for the head and the feature projection (including
    seqTransf, whose initial values come from CLIP's text tower but which CLIP4Clip trains with
    the base learning rate).
  """

  def label(path, _):
    names = _path_names(path)
    if _is_frozen(names, config):
      return "frozen"
    if names[0] in ("text", "visual", "logit_scale") and pretrained:
      return "clip"
    return "new"

  return jax.tree_util.tree_map_with_path(label, params)


def _copy_checked(target, source, where: str, problems: list[str]):
  """Returns ``source`` cast to target's dtypes; records name/shape mismatches in ``problems``."""
  t_flat = traverse_util.flatten_dict(target, sep="/")
  s_flat = traverse_util.flatten_dict(source, sep="/")
  found = []
  for name in sorted(set(t_flat) & set(s_flat)):
    if tuple(t_flat[name].shape) != tuple(s_flat[name].shape):
      found.append(f"{where}/{name}: model {tuple(t_flat[name].shape)} vs CLIP "
                   f"{tuple(s_flat[name].shape)}")
  for name in sorted(set(t_flat) - set(s_flat)):
    found.append(f"{where}/{name}: missing in CLIP")
  for name in sorted(set(s_flat) - set(t_flat)):
    found.append(f"{where}/{name}: not in the model")
  if found:
    problems.extend(found)
    return target
  copied = {name: jnp.asarray(s_flat[name], t_flat[name].dtype) for name in t_flat}
  return traverse_util.unflatten_dict(copied, sep="/")


def init_dual_encoder_from_clip(params, clip_params, config: ml_collections.ConfigDict,
                                clip_config: ml_collections.ConfigDict | None = None):
  """Puts pretrained CLIP weights into a DualEncoder's parameters, as CLIP4Clip initialises.

  Copies the text tower, the image tower (frames mode) and the logit scale. For ``seqTransf``
  it also copies CLIP4Clip's initialisation of the head: the first ``max_frames`` rows of CLIP's
  text positional embedding become the frame-position embeddings and the text tower's first
  ``head_layers`` blocks become the head's blocks. The feature projection stays as initialised.

  Args:
    params: DualEncoder parameters (from ``model.init``) for ``config``.
    clip_params: parameters of :class:`ncl_jax.models.clip.CLIP` (e.g. from ``load_clip``).
    config: the DualEncoder's model config; its sizes must match the CLIP checkpoint
      (:func:`ncl_jax.models.convert.config_from_clip` copies them).
    clip_config: the checkpoint's architecture (``model.config`` of ``load_clip``). Optional
      but recommended: head counts do not show in parameter shapes, so only this argument lets
      a wrong ``heads`` be caught.

  Returns:
    A new parameter tree; the inputs are not modified.

  Raises:
    UserError: listing every parameter whose shape or name does not match.
  """
  if not isinstance(clip_params, Mapping) or "text" not in clip_params:
    raise UserError("clip_params must be CLIP's parameter tree, e.g. the second value of "
                    f"`model, params = load_clip(DIR)`; got {type(clip_params).__name__}")
  params = dict(params)
  problems: list[str] = []
  if clip_config is not None:
    for tower in ("vision", "text") if config.input_mode == "frames" else ("text",):
      for key, value in clip_config[tower].items():
        if config[tower].get(key) != value:
          problems.append(f"model.{tower}.{key} is {config[tower][key]} but the CLIP checkpoint "
                          f"has {value}")
  towers = ["text"] + (["visual"] if config.input_mode == "frames" else [])
  for tower in towers:
    params[tower] = _copy_checked(params[tower], clip_params[tower], tower, problems)
  params["logit_scale"] = jnp.asarray(clip_params["logit_scale"], jnp.float32)
  if config.head == "seqTransf":
    head = dict(params["head"])
    text = clip_params["text"]
    n_frames = config.max_frames
    positions = text["positional_embedding"]
    if positions.shape[0] < n_frames:
      problems.append(f"max_frames {n_frames} exceeds CLIP's context length {positions.shape[0]}")
    else:
      head["frame_position_embeddings"] = _copy_checked(
          head["frame_position_embeddings"], {"embedding": positions[:n_frames]},
          "head/frame_position_embeddings", problems)
    n_text_blocks = sum(1 for k in text["transformer"] if k.startswith("resblocks_"))
    if n_text_blocks < config.head_layers:
      problems.append(f"head_layers {config.head_layers} exceeds CLIP's {n_text_blocks} text "
                      "blocks")
    elif config.head_heads != config.text.heads:
      problems.append(f"head_heads {config.head_heads} must equal the text tower's heads "
                      f"{config.text.heads} to reuse its blocks")
    else:
      blocks = {f"resblocks_{i}": text["transformer"][f"resblocks_{i}"]
                for i in range(config.head_layers)}
      head["transformer"] = _copy_checked(head["transformer"], blocks, "head/transformer", problems)
    params["head"] = head
  if problems:
    shown = "; ".join(problems[:12]) + (f"; and {len(problems) - 12} more" if len(problems) > 12
                                        else "")
    raise UserError(f"CLIP weights do not fit the model config: {shown}. Copy the architecture "
                    "with ncl_jax.models.config_from_clip(model_config, clip_model.config).")
  return params
