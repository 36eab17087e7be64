"""tools/convert_clip.py on Hugging Face transformers CLIPModel directories: random-weight
models saved with save_pretrained (no downloads) convert, and load_clip's features equal
transformers' get_image_features / get_text_features in float32."""

import importlib.util
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import clip_reference as ref
from clip_reference import HF_SMALL as SMALL, random_hf_clip, save_hf
from suite_testutils import require_module
from ncl_jax.errors import UserError
from ncl_jax.models import load_clip

torch = require_module("torch")
require_module("transformers")  # the reference CLIPModel (clip_reference.random_hf_clip)

torch.set_num_threads(2)
REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "convert_clip.py"
TOLERANCE = 1e-4

# ViT-B/32's widths, heads, patch, resolution, context and vocabulary; 2 blocks per tower keep
# it cheap. eos_token_id 2 is what transformers' configs said before 2023 (argmax pooling).
VIT_B32 = dict(
    text_config=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                     num_attention_heads=8, vocab_size=49408, max_position_embeddings=77,
                     eos_token_id=2, bos_token_id=0, pad_token_id=1),
    vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                       num_attention_heads=12, image_size=224, patch_size=32),
    projection_dim=512)


def converter():
  spec = importlib.util.spec_from_file_location("convert_clip_tool", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tokens_with_eos(rng, n: int, length: int, vocab: int, eos: int) -> np.ndarray:
  """Rows like a CLIP tokenizer's: random ids below eos, one eos, then zero padding."""
  tokens = np.zeros((n, length), np.int64)
  for i in range(n):
    used = int(rng.integers(2, length))
    tokens[i, :used - 1] = rng.integers(1, min(eos, vocab - 1), size=used - 1)
    tokens[i, used - 1] = eos
  return tokens


def hf_features(model, images_nhwc: np.ndarray, tokens: np.ndarray):
  with torch.no_grad():
    image = model.get_image_features(
        pixel_values=torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()))
    text = model.get_text_features(input_ids=torch.from_numpy(tokens))
  # transformers 5 returns the output object, 4.x the projected tensor.
  image, text = (getattr(x, "pooler_output", x) for x in (image, text))
  return image.numpy(), text.numpy()


def max_differences(out_dir, model, rng, tokens: np.ndarray):
  """(image, text) max abs differences between load_clip's and transformers' features on random
  images and ``tokens`` [N, L]."""
  flax_model, params = load_clip(out_dir)
  size = flax_model.config.vision.image_size
  images = rng.standard_normal((2, size, size, 3)).astype(np.float32)
  encode = jax.jit(lambda p, x, t: (
      flax_model.apply({"params": p}, x, method=flax_model.encode_image),
      flax_model.apply({"params": p}, t, method=flax_model.encode_text)))
  image, text = encode(params, images, jnp.asarray(tokens, jnp.int32))
  want_image, want_text = hf_features(model, images, tokens)
  assert np.abs(want_image).max() > 0.1 and np.abs(want_text).max() > 0.1
  return (float(np.abs(np.asarray(image) - want_image).max()),
          float(np.abs(np.asarray(text) - want_text).max()))


@pytest.mark.parametrize("hidden_act,weights", [("quick_gelu", "sharded"), ("gelu", "bin")])
def test_small_transformers_clip_converts(tmp_path, rng, hidden_act, weights):
  model = random_hf_clip(SMALL, hidden_act, seed=3)
  src = save_hf(model, tmp_path / "hf", weights)
  out = tmp_path / "converted"
  assert converter().main(["--src", str(src), "--out", str(out), "--vocab",
                           str(_openai_vocab())]) == 0
  stored = json.loads((out / "config.json").read_text())
  assert stored["source"]["format"] == "hf_transformers"
  assert stored["vision"] == dict(width=96, layers=2, heads=3, patch_size=8, image_size=24,
                                  mlp_ratio=200 / 96, activation=hidden_act,
                                  layer_norm_eps=1e-5)
  assert stored["text"] == dict(width=64, layers=2, heads=2, vocab_size=300, context_length=12,
                                mlp_ratio=2.5, activation=hidden_act, layer_norm_eps=1e-6,
                                eos_id=299)
  tokens = tokens_with_eos(rng, 3, 12, 300, eos=299)
  image_diff, text_diff = max_differences(out, model, rng, tokens)
  assert image_diff <= TOLERANCE and text_diff <= TOLERANCE, (image_diff, text_diff)


def test_vit_b32_sized_transformers_clip_converts_with_its_tokenizer(tmp_path, rng):
  model = random_hf_clip(VIT_B32, "gelu", seed=5)
  src = save_hf(model, tmp_path / "hf")
  ref.write_hf_tokenizer(src)
  out = tmp_path / "converted"
  converter().main(["--src", str(src), "--out", str(out)])
  assert sorted(p.name for p in out.iterdir()) == ["config.json", "merges.txt", "params",
                                                   "vocab.json"]
  assert json.loads((out / "config.json").read_text())["text"]["eos_id"] == -1  # legacy 2
  # Rows from the converted directory's tokenizer (end token 49407, zero padding): transformers
  # pools them at the largest id, as the converted model does.
  from ncl_jax.tokenizer import ClipTokenizer
  tokens = ClipTokenizer(out).encode_batch(["a dog plays the piano", "two cats"], 77)
  image_diff, text_diff = max_differences(out, model, rng, tokens.astype(np.int64))
  assert image_diff <= TOLERANCE and text_diff <= TOLERANCE, (image_diff, text_diff)


def _openai_vocab():
  return ref.vocab_path()


def test_bad_transformers_directories_list_what_is_wrong(tmp_path):
  model = random_hf_clip(SMALL, "quick_gelu")
  src = save_hf(model, tmp_path / "hf", "bin")
  state = torch.load(src / "pytorch_model.bin", weights_only=True)
  del state["text_model.encoder.layers.1.self_attn.k_proj.bias"]
  state["text_model.encoder.layers.0.adapter.weight"] = torch.zeros(2)
  torch.save(state, src / "pytorch_model.bin")
  with pytest.raises(UserError) as err:
    converter().main(["--src", str(src), "--out", str(tmp_path / "a"), "--vocab",
                      str(_openai_vocab())])
  message = str(err.value)
  assert "\n" not in message
  assert "missing tensors: text_model.encoder.layers.1.self_attn.k_proj.bias" in message
  assert "unknown tensors: text_model.encoder.layers.0.adapter.weight" in message

  config = json.loads((src / "config.json").read_text())
  config["vision_config"]["hidden_act"] = "relu"
  config["text_config"]["hidden_size"] = 128
  (src / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="text_config.vocab_size / hidden_size says"):
    converter().main(["--src", str(src), "--out", str(tmp_path / "b")])
  config["text_config"]["hidden_size"] = 64
  (src / "config.json").write_text(json.dumps(config))
  torch.save(model.state_dict(), src / "pytorch_model.bin")
  with pytest.raises(UserError, match="vision_config hidden_act 'relu' is not supported"):
    converter().main(["--src", str(src), "--out", str(tmp_path / "c")])
  config["vision_config"]["hidden_act"] = "quick_gelu"
  (src / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="applies to open_clip checkpoints"):
    converter().main(["--src", str(src), "--out", str(tmp_path / "d"), "--open_clip_model",
                      "ViT-B-32"])
  assert not any((tmp_path / name).exists() for name in "abcd")
  # The weights file itself also converts (config.json beside it), but not without it.
  converter().main(["--src", str(src / "pytorch_model.bin"), "--out", str(tmp_path / "e"),
                    "--vocab", str(_openai_vocab())])
  assert json.loads((tmp_path / "e" / "config.json").read_text())["source"]["format"] == (
      "hf_transformers")
  (tmp_path / "lonely").mkdir()
  (src / "pytorch_model.bin").rename(tmp_path / "lonely" / "weights.bin")
  with pytest.raises(UserError, match="config.json is not beside it"):
    converter().main(["--src", str(tmp_path / "lonely" / "weights.bin"), "--out",
                      str(tmp_path / "f")])
