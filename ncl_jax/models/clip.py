"""CLIP's transformers in Flax Linen: the ViT image tower, the causal text tower, the CLIP pair.

The modules follow OpenAI's reference implementation (``clip/model.py``) layer for layer, so
converted OpenAI weights give the same features: pre-LayerNorm residual blocks, attention with a
fused query/key/value projection, a class token and ``ln_post`` on the image side, a causal mask
and pooling at the end-of-text token on the text side, and bias-free output projections.

The same layers describe the CLIP models of Hugging Face transformers and open_clip; what differs
between checkpoints is a per-tower option (the ``vision`` / ``text`` config fields, defaults =
OpenAI's): ``activation`` ("quick_gelu", OpenAI's x * sigmoid(1.702 x), or "gelu", the exact
erf GELU most LAION/DataComp models use), ``layer_norm_eps`` (1e-5), ``mlp_ratio`` (MLP width /
model width, 4.0) and, for the text tower, ``eos_id`` (-1: pool at each row's largest token id,
as OpenAI; n >= 0: pool at the first token equal to n, as transformers does for configs whose
``eos_token_id`` is not the legacy 2).

Parameters are always created in float32; ``dtype`` only sets the compute dtype (bfloat16 on
accelerators). LayerNorm statistics and attention softmax run in float32 either way.

Freezing: ``frozen_layers = n >= 0`` stops gradients at the token/patch embeddings and after the
first ``n`` residual blocks, mirroring CLIP4Clip's ``freeze_layer_num`` (which freezes the
embeddings plus the first ``n`` blocks); -1 freezes nothing. The optimizer side of freezing lives
in :func:`ncl_jax.models.dual_encoder.param_labels`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

Dtype = Any

LN_EPSILON = 1e-5  # torch.nn.LayerNorm's default, used by every OpenAI CLIP model.
MLP_RATIO = 4.0


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's activation x * sigmoid(1.702 x) (not the exact GELU)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """x * Phi(x) with the erf form, as torch.nn.GELU() and transformers' "gelu" compute it."""
  return jax.nn.gelu(x, approximate=False)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": exact_gelu}


def activation_fn(name: str):
  """The activation called ``name`` in a tower config."""
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; supported: {', '.join(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def layer_norm(name: str, dtype: Dtype, epsilon: float = LN_EPSILON) -> nn.LayerNorm:
  # Flax's LayerNorm upcasts to float32 for the statistics even when dtype is bfloat16.
  return nn.LayerNorm(epsilon=epsilon, dtype=dtype, param_dtype=jnp.float32, name=name)


class MultiHeadAttention(nn.Module):
  """Self-attention with a fused [W, 3W] in-projection, as torch.nn.MultiheadAttention stores it.

  Attributes:
    width: model width W.
    heads: number of heads; W must be divisible by it.
    causal: attend only to earlier positions (the text tower).
    dtype: compute dtype.
  """

  width: int
  heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    """Args: x [N, L, W]; key_mask [N, L] bool (False: key ignored) or None. Returns [N, L, W]."""
    n, length, width = x.shape
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by {self.heads} heads")
    head_dim = width // self.heads
    qkv = nn.Dense(3 * width, dtype=self.dtype, param_dtype=jnp.float32, name="in_proj")(x)
    qkv = qkv.reshape(n, length, 3, self.heads, head_dim)
    query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    mask = None if key_mask is None else key_mask[:, None, None, :]
    # The XLA implementation computes logits and softmax in float32 for bfloat16 inputs.
    out = jax.nn.dot_product_attention(query, key, value, mask=mask, is_causal=self.causal)
    out = out.reshape(n, length, width)
    return nn.Dense(width, dtype=self.dtype, param_dtype=jnp.float32, name="out_proj")(out)


def mlp_width(width: int, mlp_ratio: float) -> int:
  """Hidden width of the MLP; ratios come from integer widths, so rounding recovers them."""
  return int(round(width * mlp_ratio))


class Mlp(nn.Module):
  width: int
  dtype: Dtype = jnp.float32
  mlp_ratio: float = MLP_RATIO
  activation: str = "quick_gelu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    hidden = mlp_width(self.width, self.mlp_ratio)
    x = nn.Dense(hidden, dtype=self.dtype, param_dtype=jnp.float32, name="c_fc")(x)
    x = activation_fn(self.activation)(x)
    return nn.Dense(self.width, dtype=self.dtype, param_dtype=jnp.float32, name="c_proj")(x)


class ResidualAttentionBlock(nn.Module):
  """x + attn(ln_1(x)), then x + mlp(ln_2(x)). Input and output [N, L, W]."""

  width: int
  heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  mlp_ratio: float = MLP_RATIO
  activation: str = "quick_gelu"
  layer_norm_eps: float = LN_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    y = layer_norm("ln_1", self.dtype, self.layer_norm_eps)(x)
    x = x + MultiHeadAttention(self.width, self.heads, self.causal, self.dtype, name="attn")(
        y, key_mask)
    y = layer_norm("ln_2", self.dtype, self.layer_norm_eps)(x)
    return x + Mlp(self.width, self.dtype, self.mlp_ratio, self.activation, name="mlp")(y)


class Transformer(nn.Module):
  """A stack of residual blocks named ``resblocks_0`` .. ``resblocks_{layers-1}``.

  Attributes:
    width, layers, heads, causal, dtype: as the blocks.
    remat: recompute each block's activations in the backward pass (``nn.remat``).
    frozen_layers: stop gradients after the first ``frozen_layers`` blocks (0 or -1: none).
    mlp_ratio, activation, layer_norm_eps: the blocks' options (see the module docstring).
  """

  width: int
  layers: int
  heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  remat: bool = False
  frozen_layers: int = -1
  mlp_ratio: float = MLP_RATIO
  activation: str = "quick_gelu"
  layer_norm_eps: float = LN_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array, key_mask: jax.Array | None = None) -> jax.Array:
    block = nn.remat(ResidualAttentionBlock) if self.remat else ResidualAttentionBlock
    for i in range(self.layers):
      x = block(self.width, self.heads, self.causal, self.dtype, self.mlp_ratio, self.activation,
                self.layer_norm_eps, name=f"resblocks_{i}")(x, key_mask)
      if i < self.frozen_layers:
        x = jax.lax.stop_gradient(x)
    return x


class VisionTransformer(nn.Module):
  """CLIP's image tower: images [N, H, W, 3] (CLIP-normalised, H = W = image_size) → [N, E].

  The patch embedding is a bias-free convolution with stride = kernel = patch_size; it is
  computed as a matmul over flattened patches, which is the same operation and fast on every
  backend. Its kernel is stored as [patch, patch, 3, width] (Flax's convolution layout).
  """

  width: int
  layers: int
  heads: int
  patch_size: int
  image_size: int
  output_dim: int
  dtype: Dtype = jnp.float32
  remat: bool = False
  frozen_layers: int = -1
  mlp_ratio: float = MLP_RATIO
  activation: str = "quick_gelu"
  layer_norm_eps: float = LN_EPSILON

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    n, height, width_px, channels = images.shape
    if height != self.image_size or width_px != self.image_size or channels != 3:
      raise ValueError(f"images must be [N, {self.image_size}, {self.image_size}, 3], got "
                       f"{images.shape}")
    p = self.patch_size
    if self.image_size % p:
      raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {p}")
    grid = self.image_size // p
    scale = self.width**-0.5
    kernel = self.param("patch_embedding", nn.initializers.normal(scale), (p, p, 3, self.width))
    class_embedding = self.param("class_embedding", nn.initializers.normal(scale), (self.width,))
    positions = self.param("positional_embedding", nn.initializers.normal(scale),
                           (grid * grid + 1, self.width))
    proj = self.param("proj", nn.initializers.normal(scale), (self.width, self.output_dim))

    x = images.astype(self.dtype)
    # [N, g, p, g, p, 3] -> [N, g, g, p, p, 3]: patches flattened in (row, column, channel) order.
    x = x.reshape(n, grid, p, grid, p, 3).transpose(0, 1, 3, 2, 4, 5)
    x = x.reshape(n, grid * grid, p * p * 3)
    x = x @ kernel.reshape(p * p * 3, self.width).astype(self.dtype)
    cls = jnp.broadcast_to(class_embedding.astype(self.dtype), (n, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + positions.astype(self.dtype)
    x = layer_norm("ln_pre", self.dtype, self.layer_norm_eps)(x)
    if self.frozen_layers >= 0:
      x = jax.lax.stop_gradient(x)
    x = Transformer(self.width, self.layers, self.heads, False, self.dtype, self.remat,
                    self.frozen_layers, self.mlp_ratio, self.activation, self.layer_norm_eps,
                    name="transformer")(x)
    x = layer_norm("ln_post", self.dtype, self.layer_norm_eps)(x[:, 0])
    return x @ proj.astype(self.dtype)


class TextTransformer(nn.Module):
  """CLIP's text tower. Tokens [N, L] int32 (L <= context_length) → [N, output_dim].

  Features are read at the end-of-text token: with ``eos_id = -1`` at each row's largest token
  id, which is the end-of-text token for CLIP's vocabulary (it has the highest id) and for any
  vocabulary that puts its end token last; with ``eos_id >= 0`` at the first token equal to it.
  """

  width: int
  layers: int
  heads: int
  vocab_size: int
  context_length: int
  output_dim: int
  dtype: Dtype = jnp.float32
  remat: bool = False
  frozen_layers: int = -1
  mlp_ratio: float = MLP_RATIO
  activation: str = "quick_gelu"
  layer_norm_eps: float = LN_EPSILON
  eos_id: int = -1

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    n, length = tokens.shape
    if length > self.context_length:
      raise ValueError(f"token rows have length {length} > context_length {self.context_length}")
    embed = nn.Embed(self.vocab_size, self.width, embedding_init=nn.initializers.normal(0.02),
                     dtype=self.dtype, param_dtype=jnp.float32, name="token_embedding")
    positions = self.param("positional_embedding", nn.initializers.normal(0.01),
                           (self.context_length, self.width))
    text_projection = self.param("text_projection", nn.initializers.normal(self.width**-0.5),
                                 (self.width, self.output_dim))
    x = embed(tokens) + positions[:length].astype(self.dtype)
    if self.frozen_layers >= 0:
      x = jax.lax.stop_gradient(x)
    x = Transformer(self.width, self.layers, self.heads, True, self.dtype, self.remat,
                    self.frozen_layers, self.mlp_ratio, self.activation, self.layer_norm_eps,
                    name="transformer")(x)
    x = layer_norm("ln_final", self.dtype, self.layer_norm_eps)(x)
    # argmax returns the first maximum: the first end token in either mode.
    end = jnp.argmax(tokens if self.eos_id < 0 else tokens == self.eos_id, axis=-1)
    x = x[jnp.arange(n), end]
    return x @ text_projection.astype(self.dtype)


def compute_dtype(name: str) -> Dtype:
  """Maps a config string ("float32" | "bfloat16") to a dtype."""
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if name not in dtypes:
    raise ValueError(f"dtype must be one of {sorted(dtypes)}, got {name!r}")
  return dtypes[name]


def block_options(tower: ml_collections.ConfigDict) -> dict:
  """A tower config's block options, with OpenAI's values where a (pre-v2) config lacks them."""
  return dict(mlp_ratio=float(tower.get("mlp_ratio", MLP_RATIO)),
              activation=str(tower.get("activation", "quick_gelu")),
              layer_norm_eps=float(tower.get("layer_norm_eps", LN_EPSILON)))


def vision_tower(config: ml_collections.ConfigDict, frozen_layers: int = -1,
                 name: str = "visual") -> VisionTransformer:
  """The image tower described by ``config.vision``, ``config.embed_dim``, dtype and remat."""
  v = config.vision
  return VisionTransformer(v.width, v.layers, v.heads, v.patch_size, v.image_size,
                           config.embed_dim, compute_dtype(config.get("dtype", "float32")),
                           bool(config.get("remat", False)), frozen_layers, name=name,
                           **block_options(v))


def text_tower(config: ml_collections.ConfigDict, frozen_layers: int = -1,
               name: str = "text") -> TextTransformer:
  """The text tower described by ``config.text``, ``config.embed_dim``, dtype and remat."""
  t = config.text
  return TextTransformer(t.width, t.layers, t.heads, t.vocab_size, t.context_length,
                         config.embed_dim, compute_dtype(config.get("dtype", "float32")),
                         bool(config.get("remat", False)), frozen_layers, name=name,
                         eos_id=int(t.get("eos_id", -1)), **block_options(t))


class CLIP(nn.Module):
  """OpenAI's CLIP (ViT image tower, text tower, logit scale) with converted weights.

  Attributes:
    config: ``embed_dim``, ``vision`` (width, layers, heads, patch_size, image_size), ``text``
      (width, layers, heads, vocab_size, context_length), each tower optionally with
      ``mlp_ratio``, ``activation``, ``layer_norm_eps`` (and text ``eos_id``), and optionally
      ``dtype`` and ``remat``.
      :func:`ncl_jax.models.convert.load_clip` builds it from a converted checkpoint.

  Parameters: ``visual``, ``text`` and the scalar ``logit_scale`` (the log of the inverse
  temperature, ln(1/0.07) at initialisation as in OpenAI's code).
  """

  config: ml_collections.ConfigDict

  def setup(self):
    self.visual = vision_tower(self.config)
    self.text = text_tower(self.config)
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(jnp.log(1 / 0.07)), ())

  def encode_image(self, images: jax.Array) -> jax.Array:
    """[N, H, W, 3] CLIP-normalised images → [N, embed_dim] projected, unnormalised features."""
    return self.visual(images)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """[N, L] int32 token ids → [N, embed_dim] projected, unnormalised features."""
    return self.text(tokens)

  def __call__(self, images: jax.Array, tokens: jax.Array):
    """Returns (image features, text features, exp(logit_scale)); features unnormalised."""
    return self.encode_image(images), self.encode_text(tokens), jnp.exp(self.logit_scale)
