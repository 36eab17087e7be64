"""CLIP4Clip's video heads over per-frame embeddings: ``meanP`` and ``seqTransf``.

Both take frame embeddings [N, T, E] and a frame mask [N, T] (False for padding frames of short
videos). CLIP4Clip then L2-normalises each frame, takes the masked mean over frames and
normalises again; :func:`pool_frames` does those three steps. ``seqTransf`` first runs a small
transformer over the frames (frame-position embeddings, keys masked by the frame mask) and adds
the input back as a residual. CLIP4Clip's other heads (``seqLSTM``, ``tightTransf``) are not
implemented.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from ncl_jax.models import clip

HEADS = ("meanP", "seqTransf")


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / ||x|| along ``axis`` (float32); an all-zero vector stays zero instead of NaN.

  The floor sits under the square root: sqrt's derivative is infinite at 0, so clamping the
  norm after the sqrt would still give NaN gradients for zero vectors (padded frames).
  """
  x = x.astype(jnp.float32)
  sum_sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sum_sq, 1e-24))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x [N, T, E] over the frames where mask [N, T] is True → [N, E].

  A video with no valid frame gets the zero vector (CLIP4Clip divides by max(count, 1) too).
  """
  weights = mask.astype(x.dtype)[..., None]
  count = jnp.maximum(jnp.sum(weights, axis=1), 1.0)
  return jnp.sum(x * weights, axis=1) / count


def pool_frames(frames: jax.Array, frame_mask: jax.Array) -> jax.Array:
  """CLIP4Clip's pooling: normalise frames [N, T, E], masked mean, normalise → [N, E] float32."""
  return l2_normalize(masked_mean(l2_normalize(frames), frame_mask))


class SeqTransf(nn.Module):
  """CLIP4Clip's ``seqTransf`` head: frames + position embeddings → transformer → + frames.

  Attributes:
    width: embedding size E of the frame embeddings.
    layers: transformer blocks (CLIP4Clip: 4, initialised from CLIP's first text blocks).
    heads: attention heads (CLIP4Clip: the text tower's head count).
    max_frames: rows of the frame-position table (CLIP4Clip initialises it from CLIP's text
      positional embedding).
    dtype, remat: compute dtype and block rematerialisation.
    mlp_ratio, activation, layer_norm_eps: block options; the text tower's, whose blocks
      CLIP4Clip copies into the head.

  Parameters: ``frame_position_embeddings/embedding`` [max_frames, E] and ``transformer``.
  """

  width: int
  layers: int
  heads: int
  max_frames: int
  dtype: clip.Dtype = jnp.float32
  remat: bool = False
  mlp_ratio: float = clip.MLP_RATIO
  activation: str = "quick_gelu"
  layer_norm_eps: float = clip.LN_EPSILON

  @nn.compact
  def __call__(self, frames: jax.Array, frame_mask: jax.Array) -> jax.Array:
    """frames [N, T, E] (T <= max_frames), frame_mask [N, T] bool → [N, T, E] in ``dtype``."""
    n_frames = frames.shape[1]
    if n_frames > self.max_frames:
      raise ValueError(f"{n_frames} frames exceed the head's max_frames {self.max_frames}")
    positions = nn.Embed(self.max_frames, self.width, dtype=self.dtype, param_dtype=jnp.float32,
                         embedding_init=nn.initializers.normal(0.01),
                         name="frame_position_embeddings")(jnp.arange(n_frames))
    frames = frames.astype(self.dtype)
    x = frames + positions[None]
    # Padding frames are ignored as keys; their own outputs are dropped later by the pooling mask.
    x = clip.Transformer(self.width, self.layers, self.heads, False, self.dtype, self.remat,
                         mlp_ratio=self.mlp_ratio, activation=self.activation,
                         layer_norm_eps=self.layer_norm_eps,
                         name="transformer")(x, frame_mask.astype(bool))
    return x + frames
