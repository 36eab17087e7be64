"""OpenAI CLIP checkpoints → Flax parameters, and the converted-checkpoint directory format.

A converted directory holds

* ``config.json``: the architecture (``format``, ``embed_dim``, ``vision``, ``text``), inferred
  from tensor shapes the way OpenAI's ``build_model`` does (heads = width / 64);
* ``params/``: an orbax checkpoint of the :class:`ncl_jax.models.clip.CLIP` parameters (float32);
* ``bpe_simple_vocab_16e6.txt.gz``: the tokenizer vocabulary.

This module works on a state dict of numpy arrays keyed by OpenAI's parameter names, so it needs
no PyTorch; ``tools/convert_clip.py`` reads the ``.pt`` file with torch and calls it.
"""

from __future__ import annotations

import json
import pathlib
import re
import warnings
from typing import Mapping

import jax
import ml_collections
import numpy as np

from ncl_jax.errors import UserError
from ncl_jax.models import clip

FORMAT = "ncl_jax-clip-v1"
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Scalars some OpenAI archives keep next to the weights; build_model drops them too.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")


def read_torch_checkpoint(path) -> dict[str, np.ndarray]:
  """Reads an OpenAI CLIP checkpoint into numpy arrays (needs PyTorch).

  Accepts the TorchScript archives OpenAI publishes (``ViT-B-32.pt``, ...) and plain state dicts
  saved with ``torch.save(model.state_dict(), path)``. Nothing in the file is executed: plain
  files are read with ``weights_only=True``.

  Raises:
    UserError: if the file is missing, is not a PyTorch file, or holds no state dict.
  """
  path = pathlib.Path(path).expanduser()
  if not path.is_file():
    raise UserError(f"--src {path} does not exist or is not a file")
  try:
    import torch
  except ImportError as err:
    raise UserError("reading PyTorch checkpoints needs torch: pip install torch") from err
  try:
    with warnings.catch_warnings():  # torch 2.13 deprecates jit.load; OpenAI's files need it
      warnings.simplefilter("ignore", DeprecationWarning)
      state = torch.jit.load(str(path), map_location="cpu").state_dict()
  except RuntimeError:  # not TorchScript: a plain torch.save file, or not PyTorch at all
    try:
      state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several unrelated types for foreign files
      raise UserError(f"{path} is neither a TorchScript archive nor a torch.save file "
                      f"({type(err).__name__}); pass an OpenAI CLIP .pt checkpoint") from err
  if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
    raise UserError(f"{path} does not hold a state dict (name → tensor); save one with "
                    "torch.save(model.state_dict(), path)")
  return {k: v.detach().float().cpu().numpy() for k, v in state.items()}


def _count_blocks(keys, prefix: str) -> int:
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  indices = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
  if indices != set(range(len(indices))):
    raise UserError(f"checkpoint blocks under {prefix!r} are not numbered 0..n-1: "
                    f"{sorted(indices)}")
  return len(indices)


def infer_config(shapes: Mapping[str, tuple[int, ...]]) -> ml_collections.ConfigDict:
  """The CLIP architecture from the shapes of OpenAI's state-dict tensors.

  Args:
    shapes: parameter name → shape, e.g. ``{"visual.conv1.weight": (768, 3, 32, 32), ...}``.

  Returns:
    ConfigDict with embed_dim, vision (width, layers, heads, patch_size, image_size) and text
    (width, layers, heads, vocab_size, context_length).

  Raises:
    UserError: for a state dict that is not an OpenAI ViT CLIP model.
  """
  if any(k.startswith("visual.layer1.") or k.startswith("visual.attnpool.") for k in shapes):
    raise UserError("this is a ResNet CLIP checkpoint (RN50, RN101, ...); only the ViT models "
                    "(ViT-B/32, ViT-B/16, ViT-L/14, ...) are supported")
  required = ("visual.conv1.weight", "visual.positional_embedding", "visual.proj",
              "token_embedding.weight", "positional_embedding", "ln_final.weight",
              "text_projection")
  absent = [k for k in required if k not in shapes]
  if absent:
    raise UserError(f"not an OpenAI CLIP checkpoint: tensors {absent} are missing (found "
                    f"{len(shapes)} tensors, e.g. {sorted(shapes)[:5]})")
  vision_width, _, patch_size, _ = shapes["visual.conv1.weight"]
  n_positions = shapes["visual.positional_embedding"][0]
  grid = round((n_positions - 1) ** 0.5)
  if grid * grid + 1 != n_positions:
    raise UserError(f"visual.positional_embedding has {n_positions} rows, not a square grid + 1")
  text_width = shapes["ln_final.weight"][0]
  config = ml_collections.ConfigDict()
  config.embed_dim = int(shapes["text_projection"][1])
  config.vision = ml_collections.ConfigDict(dict(
      width=int(vision_width),
      layers=_count_blocks(shapes, "visual.transformer.resblocks."),
      heads=max(int(vision_width) // 64, 1),
      patch_size=int(patch_size),
      image_size=int(patch_size * grid)))
  config.text = ml_collections.ConfigDict(dict(
      width=int(text_width),
      layers=_count_blocks(shapes, "transformer.resblocks."),
      heads=max(int(text_width) // 64, 1),
      vocab_size=int(shapes["token_embedding.weight"][0]),
      context_length=int(shapes["positional_embedding"][0])))
  return config


def _block_mapping(torch_prefix: str, flax_path: tuple[str, ...]):
  """(torch name, flax path, transform) for one residual block; Linear weights get transposed."""
  pairs = []
  for torch_name, flax_name in (("attn.in_proj", ("attn", "in_proj")),
                                ("attn.out_proj", ("attn", "out_proj")),
                                ("mlp.c_fc", ("mlp", "c_fc")),
                                ("mlp.c_proj", ("mlp", "c_proj"))):
    weight = "attn.in_proj_weight" if torch_name == "attn.in_proj" else f"{torch_name}.weight"
    bias = "attn.in_proj_bias" if torch_name == "attn.in_proj" else f"{torch_name}.bias"
    pairs.append((torch_prefix + weight, flax_path + flax_name + ("kernel",), np.transpose))
    pairs.append((torch_prefix + bias, flax_path + flax_name + ("bias",), None))
  for ln in ("ln_1", "ln_2"):
    pairs.append((f"{torch_prefix}{ln}.weight", flax_path + (ln, "scale"), None))
    pairs.append((f"{torch_prefix}{ln}.bias", flax_path + (ln, "bias"), None))
  return pairs


def _layer_norm(torch_name: str, flax_path: tuple[str, ...]):
  return [(f"{torch_name}.weight", flax_path + ("scale",), None),
          (f"{torch_name}.bias", flax_path + ("bias",), None)]


def parameter_mapping(config: ml_collections.ConfigDict):
  """Every (OpenAI name, Flax path, transform or None) pair for a CLIP of this architecture."""
  # conv1.weight [W, 3, p, p] → [p, p, 3, W], the layout VisionTransformer flattens patches in.
  conv = lambda w: np.transpose(w, (2, 3, 1, 0))  # noqa: E731
  pairs = [
      ("visual.conv1.weight", ("visual", "patch_embedding"), conv),
      ("visual.class_embedding", ("visual", "class_embedding"), None),
      ("visual.positional_embedding", ("visual", "positional_embedding"), None),
      ("visual.proj", ("visual", "proj"), None),
      ("token_embedding.weight", ("text", "token_embedding", "embedding"), None),
      ("positional_embedding", ("text", "positional_embedding"), None),
      ("text_projection", ("text", "text_projection"), None),
      ("logit_scale", ("logit_scale",), None),
  ]
  pairs += _layer_norm("visual.ln_pre", ("visual", "ln_pre"))
  pairs += _layer_norm("visual.ln_post", ("visual", "ln_post"))
  pairs += _layer_norm("ln_final", ("text", "ln_final"))
  for i in range(config.vision.layers):
    pairs += _block_mapping(f"visual.transformer.resblocks.{i}.",
                            ("visual", "transformer", f"resblocks_{i}"))
  for i in range(config.text.layers):
    pairs += _block_mapping(f"transformer.resblocks.{i}.",
                            ("text", "transformer", f"resblocks_{i}"))
  return pairs


def _listing(names, limit: int = 20) -> str:
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def convert_state_dict(state_dict: Mapping[str, np.ndarray]):
  """OpenAI CLIP state dict (numpy arrays, any float dtype) → (config, Flax params, float32).

  Raises:
    UserError: for a non-CLIP state dict, or listing unknown and missing keys.
  """
  state_dict = {k: v for k, v in state_dict.items() if k not in IGNORED_KEYS}
  config = infer_config({k: tuple(np.shape(v)) for k, v in state_dict.items()})
  mapping = parameter_mapping(config)
  expected = {name for name, _, _ in mapping}
  missing, unknown = expected - set(state_dict), set(state_dict) - expected
  if missing or unknown:
    parts = []
    if missing:
      parts.append(f"missing keys: {_listing(missing)}")
    if unknown:
      parts.append(f"unknown keys: {_listing(unknown)}")
    raise UserError("the checkpoint does not match OpenAI's CLIP layout (" + "; ".join(parts) + ")")
  params: dict = {}
  for name, path, transform in mapping:
    value = np.asarray(state_dict[name], dtype=np.float32)
    if transform is not None:
      value = np.ascontiguousarray(transform(value))
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = value
  _check_shapes(config, params)
  return config, params


def _check_shapes(config, params) -> None:
  """Compares converted shapes with the Flax model's own (catches inconsistent tensors)."""
  expected = abstract_params(config)
  bad = []
  for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]:
    names = [k.key for k in path]
    got = params
    for name in names:
      got = got[name]
    if tuple(got.shape) != tuple(leaf.shape):
      bad.append(f"{'/'.join(names)}: {tuple(got.shape)} (expected {tuple(leaf.shape)})")
  if bad:
    raise UserError("inconsistent tensor shapes in the CLIP checkpoint: " + _listing(bad, 10))


def abstract_params(config: ml_collections.ConfigDict):
  """Shape/dtype structs of the CLIP parameters for ``config`` (no memory is allocated)."""
  model = clip.CLIP(config)
  images = jax.ShapeDtypeStruct((1, config.vision.image_size, config.vision.image_size, 3),
                                np.float32)
  tokens = jax.ShapeDtypeStruct((1, config.text.context_length), np.int32)
  return jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]


def config_to_json(config: ml_collections.ConfigDict) -> dict:
  return {"format": FORMAT, "embed_dim": int(config.embed_dim),
          "vision": {k: int(v) for k, v in config.vision.items()},
          "text": {k: int(v) for k, v in config.text.items()}}


def save_converted(out_dir, config, params, vocab_path=None) -> None:
  """Writes config.json, the orbax params checkpoint and a copy of the vocabulary to ``out_dir``.

  Raises:
    UserError: if ``out_dir`` exists and is not empty (nothing is overwritten).
  """
  import shutil

  import orbax.checkpoint as ocp

  out = pathlib.Path(out_dir).expanduser().resolve()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out {out} already exists and is not an empty directory; choose a new one")
  out.mkdir(parents=True, exist_ok=True)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(out / PARAMS_DIR, params)
  checkpointer.wait_until_finished()
  checkpointer.close()
  if vocab_path is not None:
    shutil.copyfile(vocab_path, out / VOCAB_FILE)
  (out / CONFIG_FILE).write_text(json.dumps(config_to_json(config), indent=2) + "\n")


def read_config(clip_dir) -> ml_collections.ConfigDict:
  """The architecture stored in a converted directory's config.json."""
  path = pathlib.Path(clip_dir).expanduser() / CONFIG_FILE
  if not path.is_file():
    raise UserError(f"{path} not found: {clip_dir} is not a converted CLIP directory (create one "
                    "with tools/convert_clip.py --src CHECKPOINT --out DIR)")
  data = json.loads(path.read_text())
  if data.get("format") != FORMAT:
    raise UserError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}")
  return ml_collections.ConfigDict({k: v for k, v in data.items() if k != "format"})


def load_clip(clip_dir, dtype: str = "float32", remat: bool = False):
  """Loads a converted CLIP directory.

  Args:
    clip_dir: a directory written by ``tools/convert_clip.py``.
    dtype: compute dtype of the returned model ("float32" or "bfloat16").
    remat: rematerialise transformer blocks.

  Returns:
    (model, params): a :class:`ncl_jax.models.clip.CLIP` (its ``config`` holds the architecture)
    and its float32 parameters, for ``model.apply({"params": params}, images,
    method=model.encode_image)`` and ``method=model.encode_text``.
  """
  import orbax.checkpoint as ocp

  config = read_config(clip_dir)
  config.dtype = dtype
  config.remat = remat
  target = abstract_params(config)
  path = (pathlib.Path(clip_dir).expanduser() / PARAMS_DIR).resolve()
  checkpointer = ocp.StandardCheckpointer()
  params = checkpointer.restore(path, target)
  checkpointer.close()
  return clip.CLIP(config), params


def config_from_clip(model_config: ml_collections.ConfigDict,
                     clip_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of a DualEncoder config with the CLIP checkpoint's architecture.

  Sets embed_dim, vision, text and (for seqTransf) head_heads = text heads, so that
  :func:`ncl_jax.models.init_dual_encoder_from_clip` can copy every tensor.
  """
  config = ml_collections.ConfigDict(model_config.to_dict())
  config.embed_dim = int(clip_config.embed_dim)
  for tower in ("vision", "text"):
    for key in config[tower]:
      config[tower][key] = int(clip_config[tower][key])
  config.head_heads = int(clip_config.text.heads)
  return config
