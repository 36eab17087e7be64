"""Reads the CLIP checkpoints users have into OpenAI's state-dict layout (numpy arrays).

Three source formats (recorded as ``source.format`` in a converted directory's config.json):

* ``openai_torchscript``: the ``.pt`` TorchScript archives OpenAI publishes. Always QuickGELU.
* ``open_clip``: a state dict in OpenAI's parameter names, which open_clip also uses for its ViT
  CLIP models: ``.safetensors`` (read with safetensors' numpy API, no PyTorch), ``.bin`` / ``.pt``
  (``torch.save``; a training checkpoint's ``state_dict`` wrapper and DDP's ``module.`` prefixes
  are removed), or an open_clip Hub snapshot directory (``open_clip_config.json`` beside
  ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``). The names do not show the
  MLP activation, so it comes from ``activation`` / ``open_clip_model`` or the snapshot's
  ``open_clip_config.json``; without any of them conversion stops and says how to give it.
* ``hf_transformers``: a Hugging Face transformers ``CLIPModel`` directory (``config.json`` +
  ``model.safetensors`` or ``pytorch_model.bin``, possibly sharded with an ``.index.json``), as
  ``save_pretrained`` writes it or a Hub snapshot holds it. The architecture options (heads,
  ``hidden_act``, ``layer_norm_eps``, ``eos_token_id``) come from config.json; the separate
  query/key/value projections are stacked into OpenAI's fused in-projection.

Only ``.pt`` / ``.bin`` files need PyTorch.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import warnings
from typing import Any, Mapping

import numpy as np
import safetensors
from safetensors import numpy as safetensors_numpy

from ncl_jax.errors import UserError
from ncl_jax.models import clip, convert

OPENAI_TORCHSCRIPT = "openai_torchscript"
OPEN_CLIP = "open_clip"
HF_TRANSFORMERS = "hf_transformers"
SOURCE_FORMATS = (OPENAI_TORCHSCRIPT, OPEN_CLIP, HF_TRANSFORMERS)
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_CONFIG = "config.json"
HF_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
ACTIVATION_HELP = ("pass --activation quick_gelu (OpenAI's weights, and open_clip weights whose "
                   "model name ends in -quickgelu: OpenAI, YFCC, MetaCLIP, DFN) or --activation "
                   "gelu (open_clip's other LAION and DataComp weights), or --open_clip_model "
                   "NAME with the name you create the model with in open_clip")


@dataclasses.dataclass
class Checkpoint:
  """A checkpoint read into OpenAI's layout.

  Attributes:
    state_dict: OpenAI parameter name → numpy array.
    options: per-tower config values shapes cannot show, ``{"vision": {...}, "text": {...}}``.
    source: provenance for config.json: format, path, activation and where it came from.
    tokenizer_dir: a directory beside the weights that may hold the tokenizer files, or None.
  """

  state_dict: dict[str, np.ndarray]
  options: dict[str, dict[str, Any]]
  source: dict[str, Any]
  tokenizer_dir: pathlib.Path | None = None


# -- reading files -------------------------------------------------------------------------------


def read_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  """All tensors of a ``.safetensors`` file as numpy arrays (bfloat16 via ml_dtypes); no torch."""
  try:
    return dict(safetensors_numpy.load_file(str(path)))
  except (safetensors.SafetensorError, OSError, ValueError) as err:
    raise UserError(f"{path} is not a readable safetensors file ({err})") from err


def _torch():
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError as err:
    raise UserError("reading PyTorch .pt/.bin checkpoints needs torch (pip install torch); "
                    ".safetensors checkpoints convert without it") from err
  return torch


def read_torch_file(path: pathlib.Path) -> tuple[Any, bool]:
  """Loads a PyTorch checkpoint without executing code in it.

  Returns:
    (content, is_torchscript): the TorchScript archive's state dict (OpenAI's published files),
    or whatever ``torch.load(weights_only=True)`` finds in a plain ``torch.save`` file.
  """
  torch = _torch()
  try:
    with warnings.catch_warnings():  # torch 2.13 deprecates jit.load; OpenAI's files need it
      warnings.simplefilter("ignore", DeprecationWarning)
      return torch.jit.load(str(path), map_location="cpu").state_dict(), True
  except RuntimeError:  # not TorchScript: a plain torch.save file, or not PyTorch at all
    pass
  try:
    return torch.load(str(path), map_location="cpu", weights_only=True), False
  except Exception as err:  # torch raises several unrelated types for foreign files
    raise UserError(f"{path} is neither a TorchScript archive nor a torch.save file "
                    f"({type(err).__name__}); pass a CLIP checkpoint") from err


def to_numpy_state_dict(content: Any, path) -> dict[str, np.ndarray]:
  """A state dict of numpy arrays from a loaded checkpoint: unwraps ``{"state_dict": ...}``
  (open_clip's training checkpoints) and strips a ``module.`` prefix every key has (DDP)."""
  if isinstance(content, Mapping) and isinstance(content.get("state_dict"), Mapping):
    content = content["state_dict"]
  if not isinstance(content, Mapping) or not content:
    raise UserError(f"{path} does not hold a state dict (name → tensor); save one with "
                    "torch.save(model.state_dict(), path)")
  arrays, not_tensors = {}, []
  for key, value in content.items():
    if isinstance(value, np.ndarray):
      arrays[key] = value
    elif hasattr(value, "detach") and hasattr(value, "float"):  # a torch.Tensor
      arrays[key] = value.detach().float().cpu().numpy()
    else:
      not_tensors.append(str(key))
  if not_tensors:
    raise UserError(f"{path} does not hold a state dict (name → tensor): "
                    f"{convert.name_listing(not_tensors, 12)} are not tensors")
  if all(k.startswith("module.") for k in arrays):
    arrays = {k[len("module."):]: v for k, v in arrays.items()}
  return arrays


def read_weights(path: pathlib.Path) -> tuple[dict[str, np.ndarray], bool]:
  """(state dict, is_torchscript) of one weights file, chosen by its suffix."""
  if not path.is_file():
    raise UserError(f"--src {path} does not exist or is not a file")
  if path.suffix == ".safetensors":
    return read_safetensors(path), False
  content, torchscript = read_torch_file(path)
  return to_numpy_state_dict(content, path), torchscript


def _read_sharded(index: pathlib.Path) -> dict[str, np.ndarray]:
  """Weights split over files by a Hugging Face ``*.index.json`` (its ``weight_map``)."""
  weight_map = json.loads(index.read_text()).get("weight_map", {})
  state: dict[str, np.ndarray] = {}
  for shard in sorted(set(weight_map.values())):
    state.update(read_weights(index.parent / shard)[0])
  return state


# -- activation of OpenAI-layout state dicts -------------------------------------------------------


def activation_from_open_clip_name(name: str) -> str:
  """open_clip's rule: models named ``...-quickgelu`` use QuickGELU, the other ViTs exact GELU."""
  if name.startswith("RN"):
    raise UserError(f"--open_clip_model {name} is a ResNet CLIP; only the ViT models (ViT-B-32, "
                    "ViT-B-16, ViT-L-14, ...) are supported")
  if name.endswith("-quickgelu"):
    return "quick_gelu"
  if name.startswith("ViT-"):
    return "gelu"
  raise UserError(f"--open_clip_model {name!r} is not an open_clip ViT CLIP model name (e.g. "
                  "ViT-B-32, ViT-B-16-quickgelu, ViT-L-14); pass --activation quick_gelu|gelu")


def resolve_activation(activation: str | None, open_clip_model: str | None,
                       snapshot_config: pathlib.Path | None) -> tuple[str | None, str | None]:
  """(activation, where it came from) for an OpenAI-layout state dict, (None, None) if unknown.

  Order: ``activation``; ``open_clip_model``; ``quick_gelu`` in an open_clip Hub snapshot's
  ``open_clip_config.json``. Both flags given must agree.
  """
  if activation is not None and activation not in clip.ACTIVATIONS:
    raise UserError(f"unknown --activation {activation!r}; supported: "
                    f"{', '.join(clip.ACTIVATIONS)}")
  from_name = activation_from_open_clip_name(open_clip_model) if open_clip_model else None
  if activation and from_name and activation != from_name:
    raise UserError(f"--activation {activation} contradicts --open_clip_model {open_clip_model} "
                    f"(which uses {from_name}); give one of them")
  if activation:
    return activation, "--activation"
  if from_name:
    return from_name, f"--open_clip_model {open_clip_model}"
  if snapshot_config is not None and snapshot_config.is_file():
    model_cfg = json.loads(snapshot_config.read_text()).get("model_cfg", {})
    return ("quick_gelu" if model_cfg.get("quick_gelu") else "gelu"), snapshot_config.name
  return None, None


# -- Hugging Face transformers -------------------------------------------------------------------

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for config.json files that omit a field.
HF_TEXT_DEFAULTS = dict(hidden_size=512, num_hidden_layers=12, num_attention_heads=8,
                        intermediate_size=2048, vocab_size=49408, max_position_embeddings=77,
                        hidden_act="quick_gelu", layer_norm_eps=1e-5, eos_token_id=49407)
HF_VISION_DEFAULTS = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                          intermediate_size=3072, image_size=224, patch_size=32,
                          hidden_act="quick_gelu", layer_norm_eps=1e-5, num_channels=3)
# transformers' pre-2023 configs said eos_token_id 2; the model then pools at the largest id.
HF_LEGACY_EOS = 2


def _hf_tower(config: Mapping, tower: str, defaults: Mapping) -> dict:
  values = config.get(f"{tower}_config") or config.get(f"{tower}_config_dict") or {}
  return {**defaults, **{k: values[k] for k in defaults if values.get(k) is not None}}


def read_hf_config(path: pathlib.Path) -> tuple[dict, dict, int]:
  """(text, vision, projection_dim) of a transformers CLIPModel config.json."""
  config = json.loads(path.read_text())
  model_type = config.get("model_type")
  if model_type != "clip":
    raise UserError(f"{path} describes a {model_type!r} model, not a transformers CLIPModel "
                    "(model_type 'clip'); CLIPVisionModel/CLIPTextModel-only directories lack the "
                    "other tower")
  return (_hf_tower(config, "text", HF_TEXT_DEFAULTS),
          _hf_tower(config, "vision", HF_VISION_DEFAULTS), int(config.get("projection_dim", 512)))


def _hf_layer_pairs(hf_prefix: str, openai_prefix: str) -> list[tuple[str, str]]:
  """(transformers name, OpenAI name) of one encoder layer, q/k/v aside."""
  pairs = [("self_attn.out_proj", "attn.out_proj"), ("layer_norm1", "ln_1"),
           ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]
  return [(f"{hf_prefix}{h}.{p}", f"{openai_prefix}{o}.{p}")
          for h, o in pairs for p in ("weight", "bias")]


def _hf_renames(vision_layers: int, text_layers: int) -> list[tuple[str, str]]:
  """(transformers name, OpenAI name) of every tensor copied as is or transposed later."""
  pairs = [
      ("vision_model.embeddings.patch_embedding.weight", "visual.conv1.weight"),
      ("vision_model.embeddings.class_embedding", "visual.class_embedding"),
      ("vision_model.embeddings.position_embedding.weight", "visual.positional_embedding"),
      ("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
      ("text_model.embeddings.position_embedding.weight", "positional_embedding"),
      ("logit_scale", "logit_scale"),
  ]
  for hf_name, openai_name in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                               ("vision_model.post_layernorm", "visual.ln_post"),
                               ("text_model.final_layer_norm", "ln_final")):
    pairs += [(f"{hf_name}.{p}", f"{openai_name}.{p}") for p in ("weight", "bias")]
  for i in range(vision_layers):
    pairs += _hf_layer_pairs(f"vision_model.encoder.layers.{i}.",
                             f"visual.transformer.resblocks.{i}.")
  for i in range(text_layers):
    pairs += _hf_layer_pairs(f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}.")
  return pairs


def _hf_qkv(tower: str, layers: int, openai_prefix: str):
  """(OpenAI fused name, [q, k, v transformers names]) per layer and weight/bias."""
  for i in range(layers):
    for part in ("weight", "bias"):
      names = [f"{tower}.encoder.layers.{i}.self_attn.{x}_proj.{part}" for x in "qkv"]
      yield f"{openai_prefix}{i}.attn.in_proj_{part}", names


def hf_to_openai(state: Mapping[str, np.ndarray], vision_layers: int, text_layers: int,
                 where) -> dict[str, np.ndarray]:
  """Renames a transformers CLIPModel state dict to OpenAI's layout.

  torch.nn.MultiheadAttention's fused in-projection stacks the query, key and value weights
  along the output axis; transformers' projections are Linear layers (weight [out, in]) like
  OpenAI's, and its ``visual_projection`` / ``text_projection`` Linear weights are the
  transposes of OpenAI's ``visual.proj`` / ``text_projection`` matrices.

  Raises:
    UserError: one line listing missing and unknown tensor names (transformers' names).
  """
  renames = _hf_renames(vision_layers, text_layers)
  qkv = (list(_hf_qkv("vision_model", vision_layers, "visual.transformer.resblocks."))
         + list(_hf_qkv("text_model", text_layers, "transformer.resblocks.")))
  expected = ({h for h, _ in renames} | {n for _, names in qkv for n in names}
              | {"visual_projection.weight", "text_projection.weight"})
  present = {k for k in state if not k.endswith("position_ids")}  # buffers of older versions
  missing, unknown = expected - present, present - expected
  if missing or unknown:
    parts = ([f"missing tensors: {convert.name_listing(missing, 12)}"] if missing else []) + (
        [f"unknown tensors: {convert.name_listing(unknown, 12)}"] if unknown else [])
    raise UserError(f"{where} does not match transformers' CLIPModel layout for "
                    f"{vision_layers} vision / {text_layers} text layers (" + "; ".join(parts)
                    + ")")
  out = {openai_name: state[hf_name] for hf_name, openai_name in renames}
  for openai_name, names in qkv:
    out[openai_name] = np.concatenate([state[n] for n in names], axis=0)
  out["visual.proj"] = np.ascontiguousarray(np.asarray(state["visual_projection.weight"]).T)
  out["text_projection"] = np.ascontiguousarray(np.asarray(state["text_projection.weight"]).T)
  return out


def _hf_activation(tower: dict, name: str, where) -> str:
  act = tower["hidden_act"]
  if act not in clip.ACTIVATIONS:
    raise UserError(f"{where}: {name} hidden_act {act!r} is not supported (supported: "
                    f"{', '.join(clip.ACTIVATIONS)})")
  return act


def _check_hf_sizes(config_path, text: dict, vision: dict, projection_dim: int,
                    state: Mapping[str, np.ndarray]) -> None:
  """config.json's sizes must be the tensors' (a config from another model would mislead)."""
  def shape(name):
    return tuple(np.shape(state[name])) if name in state else None

  checks = [
      ("vision_config.hidden_size / patch_size",
       (vision["hidden_size"], vision["num_channels"], vision["patch_size"], vision["patch_size"]),
       shape("vision_model.embeddings.patch_embedding.weight")),
      ("vision_config.image_size", ((vision["image_size"] // vision["patch_size"]) ** 2 + 1,
                                    vision["hidden_size"]),
       shape("vision_model.embeddings.position_embedding.weight")),
      ("vision_config.intermediate_size", (vision["intermediate_size"], vision["hidden_size"]),
       shape("vision_model.encoder.layers.0.mlp.fc1.weight")),
      ("text_config.vocab_size / hidden_size", (text["vocab_size"], text["hidden_size"]),
       shape("text_model.embeddings.token_embedding.weight")),
      ("text_config.max_position_embeddings", (text["max_position_embeddings"],
                                               text["hidden_size"]),
       shape("text_model.embeddings.position_embedding.weight")),
      ("text_config.intermediate_size", (text["intermediate_size"], text["hidden_size"]),
       shape("text_model.encoder.layers.0.mlp.fc1.weight")),
      ("projection_dim", (projection_dim, vision["hidden_size"]),
       shape("visual_projection.weight")),
      ("projection_dim", (projection_dim, text["hidden_size"]), shape("text_projection.weight")),
  ]
  bad = [f"{field} says {want}, tensor has {got}" for field, want, got in checks
         if got is not None and tuple(want) != got]
  if bad:
    raise UserError(f"{config_path} does not describe its weights: " + "; ".join(bad))


def _hf_weights_file(directory: pathlib.Path) -> pathlib.Path:
  for name in HF_WEIGHTS:
    for candidate in (directory / name, directory / f"{name}.index.json"):
      if candidate.is_file():
        return candidate
  raise UserError(f"{directory} has {HF_CONFIG} but no weights: expected one of "
                  f"{', '.join(HF_WEIGHTS)} (or their .index.json for sharded weights)")


def read_hf_directory(directory: pathlib.Path, weights: pathlib.Path | None = None,
                      state: Mapping[str, np.ndarray] | None = None) -> Checkpoint:
  """A transformers CLIPModel directory in OpenAI's layout.

  Args:
    directory: holds config.json (and the weights unless ``weights`` is given).
    weights: the weights file, default the directory's.
    state: its tensors, when the caller has read them already.
  """
  config_path = directory / HF_CONFIG
  text, vision, projection_dim = read_hf_config(config_path)
  weights = weights or _hf_weights_file(directory)
  if state is None:
    state = (_read_sharded(weights) if weights.name.endswith(".index.json")
             else read_weights(weights)[0])
  _check_hf_sizes(config_path, text, vision, projection_dim, state)
  state = hf_to_openai(state, vision["num_hidden_layers"], text["num_hidden_layers"], weights)
  eos = text["eos_token_id"]
  if not isinstance(eos, int):
    raise UserError(f"{config_path}: text_config.eos_token_id {eos!r} is not one token id")
  options = {
      "vision": dict(heads=int(vision["num_attention_heads"]),
                     activation=_hf_activation(vision, "vision_config", config_path),
                     layer_norm_eps=float(vision["layer_norm_eps"])),
      "text": dict(heads=int(text["num_attention_heads"]),
                   activation=_hf_activation(text, "text_config", config_path),
                   layer_norm_eps=float(text["layer_norm_eps"]),
                   eos_id=-1 if eos == HF_LEGACY_EOS else int(eos)),
  }
  source = dict(format=HF_TRANSFORMERS, path=str(weights.resolve()),
                activation=f"vision {options['vision']['activation']}, text "
                f"{options['text']['activation']}", activation_from=HF_CONFIG)
  return Checkpoint(state, options, source, tokenizer_dir=directory)


# -- dispatch ------------------------------------------------------------------------------------


def _looks_hf(state: Mapping[str, np.ndarray]) -> bool:
  return any(k.startswith(("vision_model.", "text_model.")) for k in state)


def _open_clip_snapshot_weights(directory: pathlib.Path) -> pathlib.Path:
  for name in OPEN_CLIP_WEIGHTS:
    if (directory / name).is_file():
      return directory / name
  raise UserError(f"{directory} has {OPEN_CLIP_CONFIG} but none of {', '.join(OPEN_CLIP_WEIGHTS)}")


def read_checkpoint(src, activation: str | None = None,
                    open_clip_model: str | None = None) -> Checkpoint:
  """Reads any supported CLIP checkpoint into OpenAI's layout.

  Args:
    src: an OpenAI ``.pt``; an open_clip ``.safetensors`` / ``.bin`` / ``.pt`` file or Hub
      snapshot directory; a transformers CLIPModel directory or weights file inside one.
    activation: "quick_gelu" or "gelu" for OpenAI-layout state dicts (overrides the default of
      TorchScript archives, QuickGELU).
    open_clip_model: the open_clip model name the weights belong to (its activation rule).

  Raises:
    UserError: unreadable or non-CLIP input, or an undeterminable activation (saying how to
      give it).
  """
  path = pathlib.Path(src).expanduser()
  if path.is_dir():
    if (path / HF_CONFIG).is_file() and not (path / OPEN_CLIP_CONFIG).is_file():
      return _reject_flags(read_hf_directory(path), activation, open_clip_model)
    if not (path / OPEN_CLIP_CONFIG).is_file():
      raise UserError(f"--src {path} is a directory without {HF_CONFIG} (transformers) or "
                      f"{OPEN_CLIP_CONFIG} (open_clip Hub snapshot); pass the checkpoint file")
    weights = _open_clip_snapshot_weights(path)
  else:
    weights = path
  if not weights.is_file():
    raise UserError(f"--src {weights} does not exist or is not a file")
  if weights.suffix not in (".safetensors",) + TORCH_SUFFIXES:
    raise UserError(f"--src {weights}: unknown checkpoint type {weights.suffix!r}; expected "
                    ".safetensors, .pt, .pth or .bin, or a transformers/open_clip directory")
  state, torchscript = read_weights(weights)
  if _looks_hf(state):
    if not (weights.parent / HF_CONFIG).is_file():
      raise UserError(f"{weights} holds transformers CLIPModel weights but {HF_CONFIG} is not "
                      "beside it; pass the model directory (config.json + weights)")
    return _reject_flags(read_hf_directory(weights.parent, weights, state), activation,
                         open_clip_model)
  # The layout first: a ResNet or non-CLIP file is reported as such, not as a missing flag.
  convert.infer_config({k: tuple(np.shape(v)) for k, v in state.items()})
  snapshot_config = weights.parent / OPEN_CLIP_CONFIG
  chosen, reason = resolve_activation(activation, open_clip_model,
                                      snapshot_config if snapshot_config.is_file() else None)
  if chosen is None and torchscript:
    chosen, reason = "quick_gelu", "OpenAI TorchScript archive"
  if chosen is None:
    raise UserError(f"cannot tell whether {weights.name} uses QuickGELU or GELU (a wrong "
                    f"activation silently costs accuracy): {ACTIVATION_HELP}")
  options = {"vision": {"activation": chosen}, "text": {"activation": chosen}}
  source = dict(format=OPENAI_TORCHSCRIPT if torchscript else OPEN_CLIP,
                path=str(weights.resolve()), activation=chosen, activation_from=reason)
  tokenizer_dir = weights.parent if snapshot_config.is_file() else None
  return Checkpoint(state, options, source, tokenizer_dir)


def _reject_flags(checkpoint: Checkpoint, activation, open_clip_model) -> Checkpoint:
  """transformers directories state their activation; a flag that contradicts it is a mistake."""
  if open_clip_model:
    raise UserError("--open_clip_model applies to open_clip checkpoints; this is a transformers "
                    "CLIPModel directory, whose config.json gives the activation")
  if activation:
    act = {checkpoint.options[t]["activation"] for t in ("vision", "text")}
    if act != {activation}:
      raise UserError(f"--activation {activation} contradicts the transformers config.json "
                      f"(hidden_act {' / '.join(sorted(act))}); drop the flag")
  return checkpoint


def describe(config) -> str:
  """One line summarising a converted architecture."""
  v, t = config.vision, config.text
  return (f"ViT {v.layers}x{v.width} ({v.heads} heads) patch {v.patch_size} at {v.image_size}px, "
          f"text {t.layers}x{t.width} ({t.heads} heads) context {t.context_length}, embed "
          f"{config.embed_dim}, activation {v.activation}/{t.activation}")


__all__ = ["Checkpoint", "SOURCE_FORMATS", "read_checkpoint", "read_safetensors",
           "resolve_activation", "hf_to_openai", "describe"]
