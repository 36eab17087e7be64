"""DualEncoder: shapes and normalisation, the CLIP4Clip heads against a PyTorch reference built
from OpenAI's blocks, CLIP initialisation, bfloat16, remat and freezing."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_reference as ref
from suite_testutils import require_module
from ncl_jax.errors import UserError
from ncl_jax.models import (DualEncoder, config_from_clip, default_model_config,
                            init_dual_encoder_from_clip, param_labels)
from ncl_jax.models import convert

torch = require_module("torch")
torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="module")
def fast_compiles():
  """These models are tiny: compile time dominates, so skip most XLA optimisation passes."""
  previous = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def init(model, seed, tokens, video, mask):
  return jax.jit(model.init)(jax.random.key(seed), tokens, video, mask)["params"]


def small_config(**overrides):
  """The synthetic demo's size: text width 64, 2 layers, vocab 1000, context 16."""
  config = default_model_config()
  config.input_mode = "features"
  config.feature_dim = 32
  config.embed_dim = 64
  config.text.update(width=64, layers=2, heads=2, vocab_size=1000, context_length=16)
  config.vision.update(width=64, layers=1, heads=2, patch_size=8, image_size=16)
  config.head_heads = 2
  config.head_layers = 2
  config.max_frames = 4
  config.update(overrides)
  return config


@pytest.fixture(scope="module")
def small_clip():
  """A random reference CLIP (3 text blocks: 'the first 2' is a real choice), converted."""
  model = ref.random_clip(embed_dim=128, image_resolution=16, vision_layers=1, vision_width=64,
                          vision_patch_size=8, context_length=16, vocab_size=1000, text_width=128,
                          text_layers=3, seed=3)
  clip_config, clip_params = convert.convert_state_dict(ref.state_dict_numpy(model))
  return model, clip_config, clip_params


def make_inputs(rng, config, n=3, t=4):
  tokens = jnp.asarray(ref.random_tokens(rng, n, config.text.context_length,
                                         config.text.vocab_size), jnp.int32)
  if config.input_mode == "frames":
    size = config.vision.image_size
    video = rng.standard_normal((n, t, size, size, 3)).astype(np.float32)
  else:
    video = rng.standard_normal((n, t, config.feature_dim)).astype(np.float32)
  mask = np.ones((n, t), bool)
  mask[0, 2:] = False  # a short video: two real frames, two padding frames
  return tokens, jnp.asarray(video), jnp.asarray(mask)


def test_small_text_tower_from_scratch_features_mode(rng):
  config = small_config()
  model = DualEncoder(config)
  tokens, video, mask = make_inputs(rng, config)
  params = init(model, 0, tokens, video, mask)
  assert set(params) == {"text", "feature_proj", "logit_scale"}
  assert params["feature_proj"]["kernel"].shape == (32, 64)
  text, vid, scale = jax.jit(model.apply)({"params": params}, tokens, video, mask)
  assert text.shape == (3, 64) and vid.shape == (3, 64)
  assert text.dtype == jnp.float32 and vid.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(vid, axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(scale, 1 / 0.07, rtol=1e-6)
  # Padding frames do not change the video embedding.
  noisy = video.at[0, 2:].set(100.0)
  encode_video = jax.jit(lambda p, v, m: model.apply({"params": p}, v, m,
                                                     method=model.encode_video))
  np.testing.assert_allclose(encode_video(params, noisy, mask), vid, atol=1e-6)


def test_zero_padded_frames_give_finite_gradients(rng):
  # Padded frames are all-zero; with a zero-initialised projection bias they stay zero after
  # feature_proj, so l2_normalize sees exact zero vectors and must not return NaN gradients.
  config = small_config()
  model = DualEncoder(config)
  tokens, video, mask = make_inputs(rng, config)
  video = video.at[0, 2:].set(0.0)
  params = init(model, 0, tokens, video, mask)

  def loss(p):
    text, vid, _ = model.apply({"params": p}, tokens, video, mask)
    return jnp.sum(text @ vid.T)

  grads = jax.grad(loss)(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["feature_proj"]["kernel"]).sum()) > 0


def test_meanp_matches_numpy(rng):
  config = small_config(feature_dim=64)  # equal sizes: no projection, the head sees raw features
  model = DualEncoder(config)
  tokens, video, mask = make_inputs(rng, config)
  params = init(model, 0, tokens, video, mask)
  assert "feature_proj" not in params
  got = model.apply({"params": params}, video, mask, method=model.encode_video)
  x = np.asarray(video, np.float64)
  x = x / np.linalg.norm(x, axis=-1, keepdims=True)
  m = np.asarray(mask, np.float64)[..., None]
  pooled = (x * m).sum(1) / m.sum(1)
  want = pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)
  np.testing.assert_allclose(got, want, atol=1e-6)


def _torch_seq_transf(clip_model, frames, mask, head_layers):
  """CLIP4Clip's seqTransf + pooling written with OpenAI's torch blocks (the reference)."""
  width = clip_model.transformer.width
  heads = width // 64
  blocks = []
  for i in range(head_layers):
    block = ref.model_module().ResidualAttentionBlock(width, heads)
    block.load_state_dict(clip_model.transformer.resblocks[i].state_dict())
    blocks.append(block.eval())
  x = torch.from_numpy(np.array(frames))
  m = torch.from_numpy(np.array(mask)).float()
  t = x.shape[1]
  # CLIP4Clip: additive -1e6 on padding keys, repeated per head, sequence-first layout.
  additive = ((1.0 - m[:, None, :]) * -1000000.0).expand(-1, t, -1).repeat_interleave(heads, 0)
  with torch.no_grad():
    y = (x + clip_model.positional_embedding[:t][None]).permute(1, 0, 2)
    for block in blocks:
      block.attn_mask = additive
      y = block(y)
    y = y.permute(1, 0, 2) + x
    y = y / y.norm(dim=-1, keepdim=True)
    y = (y * m[..., None]).sum(1) / m.sum(1, keepdim=True)
    y = y / y.norm(dim=-1, keepdim=True)
  return y.numpy()


def test_seqtransf_from_clip_matches_clip4clip_reference(rng, small_clip):
  clip_model, clip_config, clip_params = small_clip
  config = config_from_clip(small_config(head="seqTransf", feature_dim=128), clip_config)
  assert config.head_heads == 2 and config.embed_dim == 128
  model = DualEncoder(config)
  tokens, video, mask = make_inputs(rng, config)
  params = init(model, 1, tokens, video, mask)
  params = init_dual_encoder_from_clip(params, clip_params, config, clip_config)
  assert len(params["head"]["transformer"]) == 2
  text, vid, scale = jax.jit(model.apply)({"params": params}, tokens, video, mask)

  want_video = _torch_seq_transf(clip_model, np.asarray(video), np.asarray(mask), 2)
  np.testing.assert_allclose(vid, want_video, atol=1e-5)
  with torch.no_grad():
    want_text = clip_model.encode_text(torch.from_numpy(np.asarray(tokens, np.int64))).numpy()
  want_text /= np.linalg.norm(want_text, axis=1, keepdims=True)
  np.testing.assert_allclose(text, want_text, atol=1e-5)
  np.testing.assert_allclose(scale, math.exp(clip_model.logit_scale.item()), rtol=1e-6)


def test_frames_mode_is_meanp_over_clip_image_features(rng, small_clip):
  clip_model, clip_config, clip_params = small_clip
  config = config_from_clip(small_config(input_mode="frames"), clip_config)
  model = DualEncoder(config)
  tokens, video, mask = make_inputs(rng, config, n=2, t=3)
  params = init(model, 0, tokens, video, mask)
  params = init_dual_encoder_from_clip(params, clip_params, config)
  got = jax.jit(lambda p, v, m: model.apply({"params": p}, v, m, method=model.encode_video))(
      params, video, mask)
  frames = np.array(video).reshape(6, 16, 16, 3).transpose(0, 3, 1, 2).copy()
  with torch.no_grad():
    feats = clip_model.encode_image(torch.from_numpy(frames)).numpy().reshape(2, 3, -1)
  feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
  m = np.asarray(mask, np.float32)[..., None]
  pooled = (feats * m).sum(1) / m.sum(1)
  np.testing.assert_allclose(got, pooled / np.linalg.norm(pooled, axis=-1, keepdims=True),
                             atol=1e-5)


def test_init_from_clip_reports_mismatches(rng, small_clip):
  _, _, clip_params = small_clip
  config = small_config(head="seqTransf")  # width 64 towers: nothing fits the 128-wide CLIP
  model = DualEncoder(config)
  tokens, video, mask = make_inputs(rng, config)
  params = init(model, 0, tokens, video, mask)
  with pytest.raises(UserError,
                     match=r"text/ln_final/bias: model \(64,\) vs CLIP \(128,\).*and \d+ more"):
    init_dual_encoder_from_clip(params, clip_params, config)


def test_init_from_clip_checks_heads_against_the_clip_config(rng, small_clip):
  """Head counts leave parameter shapes unchanged: only the architecture can reveal them."""
  _, clip_config, clip_params = small_clip
  config = config_from_clip(small_config(feature_dim=128), clip_config)
  config.text.heads = 4
  params = init(DualEncoder(config), 0, *make_inputs(rng, config))
  assert init_dual_encoder_from_clip(params, clip_params, config)["text"] is not None
  with pytest.raises(UserError, match="model.text.heads is 4 but the CLIP checkpoint has 2"):
    init_dual_encoder_from_clip(params, clip_params, config, clip_config)


def test_bfloat16_compute_keeps_float32_params(rng):
  config = small_config(head="seqTransf", input_mode="frames")
  tokens, video, mask = make_inputs(rng, config)
  params = init(DualEncoder(config), 0, tokens, video, mask)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  full = jax.jit(DualEncoder(config).apply)({"params": params}, tokens, video, mask)
  config.dtype = "bfloat16"
  half = jax.jit(DualEncoder(config).apply)({"params": params}, tokens, video, mask)
  for a, b in zip(full[:2], half[:2]):
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(a, b, atol=3e-2)
    assert np.abs(a - b).max() > 0  # bfloat16 really was used


def _loss(model, params, tokens, video, mask):
  text, vid, scale = model.apply({"params": params}, tokens, video, mask)
  logits = scale * text @ vid.T
  return -jnp.mean(jnp.diag(jax.nn.log_softmax(logits, axis=1)))


def _grads(model, params, tokens, video, mask):
  return jax.jit(jax.grad(lambda p: _loss(model, p, tokens, video, mask)))(params)


def test_remat_gives_the_same_gradients(rng):
  config = small_config(head="seqTransf")  # remat in the text tower and the head
  tokens, video, mask = make_inputs(rng, config)
  params = init(DualEncoder(config), 0, tokens, video, mask)
  plain = _grads(DualEncoder(config), params, tokens, video, mask)
  config.remat = True
  remat = _grads(DualEncoder(config), params, tokens, video, mask)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_freezing_labels_and_gradients(rng):
  config = small_config(input_mode="frames", head="seqTransf", freeze_text_layers=1,
                        freeze_vision_layers=0)
  model = DualEncoder(config)
  tokens, video, mask = make_inputs(rng, config)
  params = init(model, 0, tokens, video, mask)
  labels = param_labels(params, config)
  frozen = {"/".join(k.key for k in path)
            for path, label in jax.tree_util.tree_flatten_with_path(labels)[0] if label == "frozen"}
  text_block0 = {n for n in frozen if n.startswith("text/transformer/resblocks_0/")}
  assert len(text_block0) == 12  # 2 LayerNorms x 2 + 4 Dense layers x 2
  assert frozen == text_block0 | {
      "text/token_embedding/embedding", "text/positional_embedding", "visual/patch_embedding",
      "visual/class_embedding", "visual/positional_embedding", "visual/ln_pre/scale",
      "visual/ln_pre/bias"}
  assert labels["logit_scale"] == "clip" and labels["text"]["ln_final"]["scale"] == "clip"
  assert labels["visual"]["transformer"]["resblocks_0"]["ln_1"]["bias"] == "clip"
  assert set(jax.tree.leaves(labels["head"])) == {"new"}
  assert set(jax.tree.leaves(param_labels(params, config, pretrained=False))) == {"new", "frozen"}

  grads = _grads(model, params, tokens, video, mask)
  for (path, g), label in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                              jax.tree.leaves(labels)):
    if label == "frozen":
      assert not np.any(g), path
  assert np.any(grads["text"]["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"])
  assert np.any(grads["visual"]["transformer"]["resblocks_0"]["attn"]["in_proj"]["kernel"])


@pytest.mark.parametrize("field,value,message", [
    ("head", "seqLSTM", "not implemented"),
    ("input_mode", "audio", "input_mode"),
    ("dtype", "float16", "dtype"),
])
def test_bad_config_values_raise_user_errors(rng, field, value, message):
  config = small_config(**{field: value})
  tokens, video, _ = make_inputs(rng, small_config())
  with pytest.raises(UserError, match=message):
    DualEncoder(config).init(jax.random.key(0), tokens, video, jnp.ones(video.shape[:2], bool))
