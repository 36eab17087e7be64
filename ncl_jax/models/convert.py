"""CLIP checkpoints → Flax parameters, and the converted-checkpoint directory format.

A converted directory holds

* ``config.json``: ``format``, the architecture (``embed_dim``, ``vision``, ``text``: sizes
  inferred from tensor shapes, heads = width / 64 unless the source says otherwise, and the block
  options of :mod:`ncl_jax.models.clip`), and ``source`` (which checkpoint format it came from);
* ``params/``: an orbax checkpoint of the :class:`ncl_jax.models.clip.CLIP` parameters (float32);
* the tokenizer vocabulary: ``bpe_simple_vocab_16e6.txt.gz`` or ``vocab.json`` + ``merges.txt``.

This module works on a state dict of numpy arrays keyed by OpenAI's parameter names (open_clip
uses the same names), so it needs no PyTorch; :mod:`ncl_jax.models.clip_sources` reads the
checkpoint formats (OpenAI, open_clip, Hugging Face transformers) into that layout.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Mapping

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ncl_jax.errors import UserError
from ncl_jax.models import clip

FORMAT = "ncl_jax-clip-v2"
# v1 (OpenAI weights only) lacks the block options and the source; it reads with OpenAI's values.
LEGACY_FORMATS = ("ncl_jax-clip-v1",)
CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
# Scalars some OpenAI archives keep next to the weights (build_model drops them too), and the
# causal-mask buffer older open_clip versions saved.
IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size", "attn_mask")
# Tower options a checkpoint fixes without (mlp_ratio aside) changing parameter shapes.
BLOCK_OPTIONS = ("mlp_ratio", "activation", "layer_norm_eps")
TEXT_OPTIONS = BLOCK_OPTIONS + ("eos_id",)
OPENAI_OPTIONS = dict(mlp_ratio=clip.MLP_RATIO, activation="quick_gelu",
                      layer_norm_eps=clip.LN_EPSILON)


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
    (width, layers, heads, vocab_size, context_length), each with OpenAI's block options and
    the MLP ratio of the tensors.

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
  vision_layers = _count_blocks(shapes, "visual.transformer.resblocks.")
  text_layers = _count_blocks(shapes, "transformer.resblocks.")
  vision_options = dict(OPENAI_OPTIONS, mlp_ratio=_mlp_ratio(
      shapes, "visual.transformer.resblocks.", vision_layers, vision_width))
  text_options = dict(OPENAI_OPTIONS, eos_id=-1, mlp_ratio=_mlp_ratio(
      shapes, "transformer.resblocks.", text_layers, text_width))
  config = ml_collections.ConfigDict()
  config.embed_dim = int(shapes["text_projection"][1])
  config.vision = ml_collections.ConfigDict(dict(
      width=int(vision_width),
      layers=vision_layers,
      heads=max(int(vision_width) // 64, 1),
      patch_size=int(patch_size),
      image_size=int(patch_size * grid),
      **vision_options))
  config.text = ml_collections.ConfigDict(dict(
      width=int(text_width),
      layers=text_layers,
      heads=max(int(text_width) // 64, 1),
      vocab_size=int(shapes["token_embedding.weight"][0]),
      context_length=int(shapes["positional_embedding"][0]),
      **text_options))
  return config


def _mlp_ratio(shapes, prefix: str, layers: int, width: int) -> float:
  """MLP width / model width from the first block (4.0 in OpenAI's models, 4.92 in ViT-bigG)."""
  fc = shapes.get(f"{prefix}0.mlp.c_fc.weight") if layers else None
  return float(fc[0]) / float(width) if fc else clip.MLP_RATIO


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


def name_listing(names, limit: int = 20) -> str:
  """Sorted names, comma-separated, the first ``limit`` of them (error messages)."""
  names = sorted(names)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def convert_state_dict(state_dict: Mapping[str, np.ndarray], options: Mapping | None = None):
  """OpenAI-layout CLIP state dict (numpy arrays, any float dtype) → (config, Flax params).

  Args:
    state_dict: OpenAI's (= open_clip's) parameter names → arrays.
    options: per tower (``{"vision": {...}, "text": {...}}``) values that shapes cannot show
      (heads, activation, layer_norm_eps, eos_id); default OpenAI's.

  Returns:
    (config, params): the architecture and float32 parameters of :class:`~ncl_jax.models.clip.CLIP`.

  Raises:
    UserError: for a non-CLIP state dict, or listing unknown and missing keys.
  """
  state_dict = {k: v for k, v in state_dict.items() if k not in IGNORED_KEYS}
  if np.size(state_dict.get("logit_scale", ())) == 1:  # some exports store it as shape [1]
    state_dict["logit_scale"] = np.reshape(state_dict["logit_scale"], ())
  config = infer_config({k: tuple(np.shape(v)) for k, v in state_dict.items()})
  for tower, values in (options or {}).items():
    config[tower].update(values)
  check_options(config)
  mapping = parameter_mapping(config)
  expected = {name for name, _, _ in mapping}
  missing, unknown = expected - set(state_dict), set(state_dict) - expected
  if missing or unknown:
    parts = []
    if missing:
      parts.append(f"missing keys: {name_listing(missing)}")
    if unknown:
      parts.append(f"unknown keys: {name_listing(unknown)}")
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


def check_options(config: ml_collections.ConfigDict) -> None:
  """Raises UserError for block options the model cannot run (one line listing all)."""
  problems = []
  for tower in ("vision", "text"):
    sub = config[tower]
    if sub.activation not in clip.ACTIVATIONS:
      problems.append(f"{tower} activation {sub.activation!r} is not supported (supported: "
                      f"{', '.join(clip.ACTIVATIONS)})")
    if sub.width % sub.heads:
      problems.append(f"{tower} width {sub.width} is not divisible by {sub.heads} heads")
  if problems:
    raise UserError("cannot convert this CLIP checkpoint: " + "; ".join(problems))


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
    raise UserError("inconsistent tensor shapes in the CLIP checkpoint: " + name_listing(bad, 10))


def abstract_params(config: ml_collections.ConfigDict):
  """Shape/dtype structs of the CLIP parameters for ``config`` (no memory is allocated)."""
  model = clip.CLIP(config)
  images = jax.ShapeDtypeStruct((1, config.vision.image_size, config.vision.image_size, 3),
                                np.float32)
  tokens = jax.ShapeDtypeStruct((1, config.text.context_length), np.int32)
  return jax.eval_shape(model.init, jax.random.key(0), images, tokens)["params"]


def tower_value(tower: ml_collections.ConfigDict, key: str):
  """A tower field with its JSON type: strings and floats for the options, ints otherwise."""
  value = tower[key]
  if key == "activation":
    return str(value)
  if key in ("layer_norm_eps", "mlp_ratio"):
    return float(value)
  return int(value)


def config_to_json(config: ml_collections.ConfigDict, source: Mapping | None = None) -> dict:
  data = {"format": FORMAT, "embed_dim": int(config.embed_dim),
          "vision": {k: tower_value(config.vision, k) for k in config.vision},
          "text": {k: tower_value(config.text, k) for k in config.text}}
  if source is not None:
    data["source"] = dict(source)
  return data


def save_converted(out_dir, config, params, vocab_files=(), source: Mapping | None = None
                   ) -> None:
  """Writes config.json, the orbax params checkpoint and copies of the vocabulary files.

  The directory is assembled under a temporary name beside ``out_dir`` and renamed at the end,
  so a failure leaves nothing half-written.

  Args:
    out_dir: new (or empty) directory.
    config, params: from :func:`convert_state_dict`.
    vocab_files: tokenizer files to copy (see :func:`ncl_jax.tokenizer.vocab_files`).
    source: provenance recorded under ``source`` in config.json (format, path, activation).

  Raises:
    UserError: if ``out_dir`` exists and is not empty (nothing is overwritten).
  """
  out = pathlib.Path(out_dir).expanduser().resolve()
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f"--out {out} already exists and is not an empty directory; choose a new one")
  tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
  if tmp.exists():
    shutil.rmtree(tmp)  # our own leftover from a crashed conversion with this process id
  tmp.mkdir(parents=True)
  try:
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    checkpointer.close()
    for path in vocab_files:
      shutil.copyfile(path, tmp / pathlib.Path(path).name)
    (tmp / CONFIG_FILE).write_text(json.dumps(config_to_json(config, source), indent=2) + "\n")
    if out.exists():
      if any(out.iterdir()):
        raise UserError(f"--out {out} was filled while converting; nothing was overwritten")
      out.rmdir()
    os.rename(tmp, out)
  finally:
    if tmp.exists():
      shutil.rmtree(tmp)


def read_config(clip_dir) -> ml_collections.ConfigDict:
  """The architecture stored in a converted directory's config.json."""
  path = pathlib.Path(clip_dir).expanduser() / CONFIG_FILE
  if not path.is_file():
    raise UserError(f"{path} not found: {clip_dir} is not a converted CLIP directory (create one "
                    "with tools/convert_clip.py --src CHECKPOINT --out DIR)")
  data = json.loads(path.read_text())
  if data.get("format") not in (FORMAT,) + LEGACY_FORMATS:
    raise UserError(f"{path} has format {data.get('format')!r}, expected {FORMAT!r}; convert "
                    "the checkpoint again with this version's tools/convert_clip.py")
  return ml_collections.ConfigDict(dict(
      embed_dim=data["embed_dim"], vision={**OPENAI_OPTIONS, **data["vision"]},
      text={**OPENAI_OPTIONS, "eos_id": -1, **data["text"]}))


def read_source(clip_dir) -> dict:
  """The ``source`` record of a converted directory ({} for directories made before v2)."""
  path = pathlib.Path(clip_dir).expanduser() / CONFIG_FILE
  return dict(json.loads(path.read_text()).get("source", {})) if path.is_file() else {}


def adopt_checkpoint_options(model_config: ml_collections.ConfigDict,
                             clip_config: ml_collections.ConfigDict) -> list[str]:
  """Sets a DualEncoder config's block options (activation, layer-norm epsilon, MLP ratio, text
  eos_id) to the checkpoint's, in place: they belong to the weights, not to the experiment.

  Returns:
    ``"text.activation=gelu"``-style descriptions of what changed.
  """
  changed = []
  for tower, keys in (("vision", BLOCK_OPTIONS), ("text", TEXT_OPTIONS)):
    for key in keys:
      value = tower_value(clip_config[tower], key)
      if model_config[tower].get(key) != value:
        model_config[tower][key] = value
        changed.append(f"{tower}.{key}={value}")
  return changed


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
      config[tower][key] = tower_value(clip_config[tower], key)
  config.head_heads = int(clip_config.text.heads)
  return config
