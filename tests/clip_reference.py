"""OpenAI's reference CLIP (``clip-anytorch``), loaded without its torchvision-dependent init.

``import clip`` pulls in torchvision and pkg_resources; the model and tokenizer modules need
neither, so they are loaded from their files. Tests use them as the independent reference.
"""

import importlib.util
import pathlib

import numpy as np


def _package_dir() -> pathlib.Path:
  spec = importlib.util.find_spec("clip")
  if spec is None or not spec.submodule_search_locations:
    raise RuntimeError("the reference package is missing: "
                       "pip install --no-deps clip-anytorch==2.6.0")
  return pathlib.Path(list(spec.submodule_search_locations)[0])


def _load(name: str):
  spec = importlib.util.spec_from_file_location(f"_reference_clip_{name}",
                                                _package_dir() / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def model_module():
  return _load("model")


def tokenizer_module():
  return _load("simple_tokenizer")


def vocab_path() -> pathlib.Path:
  return _package_dir() / "bpe_simple_vocab_16e6.txt.gz"


def write_hf_tokenizer(directory) -> None:
  """vocab.json + merges.txt as transformers' CLIP repositories hold them, made from OpenAI's
  vocabulary file the way they were made (merges after a version header; ids in OpenAI's order:
  bytes, bytes with the end-of-word marker, merges, start and end tokens)."""
  import gzip
  import json

  directory = pathlib.Path(directory)
  with gzip.open(vocab_path(), "rt", encoding="utf-8") as f:
    merges = f.read().split("\n")[1:49152 - 256 - 2 + 1]
  (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n",
                                        encoding="utf-8")
  encoder = tokenizer_module().SimpleTokenizer(str(vocab_path())).encoder
  (directory / "vocab.json").write_text(json.dumps(encoder), encoding="utf-8")


def random_clip(embed_dim, image_resolution, vision_layers, vision_width, vision_patch_size,
                context_length, vocab_size, text_width, text_layers, seed=0):
  """A float32 reference CLIP with random weights; every tensor (LayerNorms and biases too) is
  perturbed so that a wrong mapping of any of them shows up in the outputs."""
  import torch

  torch.manual_seed(seed)
  model = model_module().CLIP(embed_dim, image_resolution, vision_layers, vision_width,
                              vision_patch_size, context_length, vocab_size, text_width,
                              text_width // 64, text_layers).float().eval()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name == "logit_scale":
        continue
      noise = torch.randn(param.shape, generator=generator) * 0.02
      if ".ln_" in name or name.startswith("ln_"):  # LayerNorm scales/biases: larger changes
        param.add_(noise * 5)
      else:
        param.add_(noise)
  return model


def state_dict_numpy(model) -> dict:
  return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def random_tokens(rng: np.random.Generator, n: int, context_length: int, vocab_size: int):
  """Token rows like CLIP's: start token, random ids, a unique largest end token, zero padding."""
  tokens = np.zeros((n, context_length), np.int64)
  for i in range(n):
    length = int(rng.integers(1, context_length - 1))
    tokens[i, 0] = vocab_size - 2
    tokens[i, 1:length + 1] = rng.integers(1, vocab_size - 2, size=length)
    tokens[i, length + 1] = vocab_size - 1
  return tokens


def converted_feature_differences(out_dir, model, rng) -> tuple[float, float]:
  """Max abs differences (image, text) between a converted checkpoint and the torch ``model``.

  Loads ``out_dir`` with ``ncl_jax.models.load_clip`` and encodes the same two random 32x32
  images (NHWC for Flax, NCHW for torch) and two random 10-token captions with both.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  from ncl_jax.models import load_clip  # pylint: disable=g-import-not-at-top
  flax_model, params = load_clip(out_dir)
  images = rng.standard_normal((2, 32, 32, 3)).astype(np.float32)
  tokens = random_tokens(rng, 2, 10, 200)
  encode = jax.jit(lambda p, x, t: (
      flax_model.apply({"params": p}, x, method=flax_model.encode_image),
      flax_model.apply({"params": p}, t, method=flax_model.encode_text)))
  image, text = encode(params, images, jnp.asarray(tokens, jnp.int32))
  with torch.no_grad():
    want_image = model.encode_image(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    want_text = model.encode_text(torch.from_numpy(tokens)).numpy()
  return (float(np.abs(np.asarray(image) - want_image).max()),
          float(np.abs(np.asarray(text) - want_text).max()))


# transformers' CLIPModel as the reference (tests/test_convert_clip_hf.py, and the torch-free
# conversion in tests/test_convert_clip_open_clip.py).

# Non-standard sizes: 3 vision heads of 32, an MLP ratio that is not 4, eos = the last id.
HF_SMALL = dict(
    text_config=dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                     num_attention_heads=2, vocab_size=300, max_position_embeddings=12,
                     eos_token_id=299, bos_token_id=298, pad_token_id=0, layer_norm_eps=1e-6),
    vision_config=dict(hidden_size=96, intermediate_size=200, num_hidden_layers=2,
                       num_attention_heads=3, image_size=24, patch_size=8),
    projection_dim=40)


def random_hf_clip(sizes: dict, hidden_act: str, seed: int = 0):
  """A float32 transformers CLIPModel, random as initialised, with the vectors its initialiser
  leaves constant (LayerNorm scales and biases, Linear biases) perturbed so that a wrong mapping
  of any of them shows in the outputs."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  config = transformers.CLIPConfig(
      text_config=dict(sizes["text_config"], hidden_act=hidden_act),
      vision_config=dict(sizes["vision_config"], hidden_act=hidden_act),
      projection_dim=sizes["projection_dim"])
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).float().eval()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if param.ndim == 1:
        param.add_(torch.randn(param.shape, generator=generator) * 0.1)
  return model


def save_hf(model, directory: pathlib.Path, weights: str = "safetensors") -> pathlib.Path:
  """save_pretrained (safetensors, or sharded), or the pytorch_model.bin older versions wrote."""
  import torch  # pylint: disable=g-import-not-at-top
  if weights == "bin":
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), directory / "pytorch_model.bin")
  else:
    model.save_pretrained(directory, max_shard_size="200KB" if weights == "sharded" else "50GB")
  return directory
