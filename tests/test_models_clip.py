"""Flax CLIP vs OpenAI's PyTorch reference on random weights: features agree to 1e-4 in float32."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_reference as ref
from suite_testutils import require_module
from ncl_jax.models import CLIP, convert

torch = require_module("torch")
torch.set_num_threads(2)

SHAPES = {
    # embed, resolution, vision layers, vision width, patch, context, vocab, text width, text layers
    "vit_b32": (512, 224, 12, 768, 32, 77, 49408, 512, 12),
    # Non-standard sizes: 3 vision heads, 2 text heads, embed_dim unlike either width.
    "small_custom": (48, 40, 3, 192, 8, 12, 300, 128, 2),
}


def _reference_features(model, images, tokens):
  with torch.no_grad():
    image = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    text = model.encode_text(torch.from_numpy(tokens)).numpy()
  return image, text


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_features_match_openai_reference(shape, rng):
  embed, resolution, v_layers, v_width, patch, context, vocab, t_width, t_layers = SHAPES[shape]
  model = ref.random_clip(embed, resolution, v_layers, v_width, patch, context, vocab, t_width,
                          t_layers, seed=len(shape))
  config, params = convert.convert_state_dict(ref.state_dict_numpy(model))
  openai_options = dict(mlp_ratio=4.0, activation="quick_gelu", layer_norm_eps=1e-5)
  assert config.to_dict() == {
      "embed_dim": embed,
      "vision": dict(width=v_width, layers=v_layers, heads=v_width // 64, patch_size=patch,
                     image_size=resolution, **openai_options),
      "text": dict(width=t_width, layers=t_layers, heads=t_width // 64, vocab_size=vocab,
                   context_length=context, **openai_options, eos_id=-1)}
  images = rng.standard_normal((2, resolution, resolution, 3)).astype(np.float32)
  tokens = ref.random_tokens(rng, 2, context, vocab)
  want_image, want_text = _reference_features(model, images, tokens)

  flax_model = CLIP(config)
  image = jax.jit(lambda p, x: flax_model.apply({"params": p}, x,
                                                method=flax_model.encode_image))(params, images)
  text = jax.jit(lambda p, t: flax_model.apply({"params": p}, t, method=flax_model.encode_text))(
      params, jnp.asarray(tokens, jnp.int32))
  assert image.shape == (2, embed) and text.shape == (2, embed)
  assert np.abs(want_image).max() > 0.1 and np.abs(want_text).max() > 0.1
  np.testing.assert_allclose(image, want_image, rtol=0, atol=1e-4)
  np.testing.assert_allclose(text, want_text, rtol=0, atol=1e-4)
  np.testing.assert_allclose(params["logit_scale"], model.logit_scale.item(), rtol=1e-7)


def test_text_features_ignore_padding_and_use_the_end_token(rng):
  """Shorter token rows (CLIP4Clip's max_words < 77) give OpenAI's result on the same rows."""
  model = ref.random_clip(*SHAPES["small_custom"], seed=5)
  config, params = convert.convert_state_dict(ref.state_dict_numpy(model))
  tokens = ref.random_tokens(rng, 3, 8, 300)
  _, want = _reference_features(model, np.zeros((1, 40, 40, 3), np.float32), tokens)
  flax_model = CLIP(config)
  got = jax.jit(lambda p, t: flax_model.apply({"params": p}, t, method=flax_model.encode_text))(
      params, jnp.asarray(tokens, jnp.int32))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
