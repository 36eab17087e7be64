"""tools/convert_clip.py on open_clip checkpoints, and conversion without PyTorch.

open_clip itself is not installed here: its package needs torchvision, whose PyPI wheels require
a different torch than the CPU 2.13 the tests use. Its ViT CLIP models keep OpenAI's parameter
names and module structure, with ``act_layer`` GELU unless the model name ends in
``-quickgelu``, so the references are OpenAI's model (clip_reference) with QuickGELU, or with
every block's activation swapped for torch.nn.GELU(), saved the ways open_clip saves
(safetensors files, ``torch.save`` training checkpoints with ``state_dict`` / ``module.``,
Hub snapshot directories with open_clip_config.json)."""

import copy
import importlib.util
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import clip_reference as ref
from suite_testutils import require_module
from ncl_jax.errors import UserError
from ncl_jax.models import clip_sources, convert, load_clip

torch = require_module("torch")
torch.set_num_threads(2)
REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "convert_clip.py"
# embed, resolution, vision layers/width/patch, context, vocab, text width/layers
SMALL = (32, 32, 2, 64, 16, 10, 200, 64, 2)
TOLERANCE = 1e-4


def converter():
  spec = importlib.util.spec_from_file_location("convert_clip_tool", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_converter(src, out, *flags):
  return converter().main(["--src", str(src), "--out", str(out), *map(str, flags)])


def with_gelu(model):
  """open_clip's structure for names without -quickgelu: exact GELU in every MLP."""
  model = copy.deepcopy(model)
  for module in model.modules():
    if hasattr(module, "mlp") and hasattr(module.mlp, "gelu"):
      module.mlp.gelu = torch.nn.GELU()
  return model


@pytest.fixture(scope="module")
def quick_model():
  return ref.random_clip(*SMALL, seed=11)


@pytest.fixture(scope="module")
def gelu_model(quick_model):
  return with_gelu(quick_model)


def numpy_state(model):
  return {k: np.array(v, order="C") for k, v in ref.state_dict_numpy(model).items()}


def check_features(out_dir, model, rng) -> tuple[float, float]:
  diffs = ref.converted_feature_differences(out_dir, model, rng)
  assert max(diffs) <= TOLERANCE, diffs
  return diffs


def source_of(out_dir) -> dict:
  return json.loads((pathlib.Path(out_dir) / "config.json").read_text())["source"]


def test_safetensors_with_the_open_clip_model_name(tmp_path, gelu_model, quick_model, rng):
  src = tmp_path / "open_clip_model.safetensors"
  save_file(numpy_state(gelu_model), str(src))
  run_converter(src, tmp_path / "gelu", "--open_clip_model", "ViT-B-32", "--vocab",
                ref.vocab_path())
  assert source_of(tmp_path / "gelu") == {
      "format": "open_clip", "path": str(src.resolve()), "activation": "gelu",
      "activation_from": "--open_clip_model ViT-B-32"}
  check_features(tmp_path / "gelu", gelu_model, rng)
  # The GELU and QuickGELU models differ far beyond the tolerance, so the check above would
  # catch a converter that ignored the name.
  with torch.no_grad():
    tokens = torch.from_numpy(ref.random_tokens(rng, 2, 10, 200))
    gap = (gelu_model.encode_text(tokens) - quick_model.encode_text(tokens)).abs().max().item()
  assert gap > 100 * TOLERANCE


def test_training_checkpoint_with_state_dict_wrapper_and_module_prefix(tmp_path, quick_model,
                                                                       rng):
  state = {f"module.{k}": v for k, v in quick_model.state_dict().items()}
  src = tmp_path / "epoch_32.pt"
  torch.save({"epoch": 32, "name": "run", "state_dict": state}, src)
  run_converter(src, tmp_path / "out", "--activation", "quick_gelu", "--vocab",
                ref.vocab_path())
  assert source_of(tmp_path / "out")["activation_from"] == "--activation"
  check_features(tmp_path / "out", quick_model, rng)


def test_hub_snapshot_directory_says_its_activation_and_carries_its_tokenizer(tmp_path,
                                                                              gelu_model):
  snapshot = tmp_path / "snapshot"
  snapshot.mkdir()
  save_file(numpy_state(gelu_model), str(snapshot / "open_clip_model.safetensors"))
  (snapshot / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": {"embed_dim": 32, "vision_cfg": {}, "text_cfg": {}}}))  # no quick_gelu: GELU
  ref.write_hf_tokenizer(snapshot)
  run_converter(snapshot, tmp_path / "out")
  assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
      "config.json", "merges.txt", "params", "vocab.json"]
  assert source_of(tmp_path / "out")["activation_from"] == "open_clip_config.json"
  # Same tensors and activation as the safetensors file converted with the model name.
  want_config, want_params = convert_reference(gelu_model, "gelu")
  model, params = load_clip(tmp_path / "out")
  assert model.config.vision.activation == model.config.text.activation == "gelu"
  jax.tree.map(np.testing.assert_array_equal, params, want_params)


def convert_reference(model, activation):
  options = {"vision": {"activation": activation}, "text": {"activation": activation}}
  return convert.convert_state_dict(ref.state_dict_numpy(model), options)


def test_conversion_needs_no_torch(tmp_path, quick_model):
  """safetensors inputs (open_clip and transformers) convert with torch unimportable."""
  save_file(numpy_state(quick_model), str(tmp_path / "oc.safetensors"))
  require_module("transformers")
  hf_model = ref.random_hf_clip(ref.HF_SMALL, "gelu", seed=2)
  ref.save_hf(hf_model, tmp_path / "hf")
  code = f"""
import importlib.abc, importlib.util, sys
class NoTorch(importlib.abc.MetaPathFinder):
  def find_spec(self, name, path=None, target=None):
    if name == "torch" or name.startswith("torch."):
      raise ImportError("torch is blocked in this test")
sys.meta_path.insert(0, NoTorch())
spec = importlib.util.spec_from_file_location("tool", {str(SCRIPT)!r})
tool = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tool)
vocab = {str(ref.vocab_path())!r}
tool.main(["--src", {str(tmp_path / "oc.safetensors")!r}, "--out", {str(tmp_path / "oc")!r},
           "--open_clip_model", "ViT-B-16-quickgelu", "--vocab", vocab])
tool.main(["--src", {str(tmp_path / "hf")!r}, "--out", {str(tmp_path / "hf_out")!r},
           "--vocab", vocab])
assert not any(m == "torch" or m.startswith("torch.") for m in sys.modules)
"""
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  _, want = convert_reference(quick_model, "quick_gelu")
  jax.tree.map(np.testing.assert_array_equal, load_clip(tmp_path / "oc")[1], want)
  checkpoint = clip_sources.read_checkpoint(tmp_path / "hf")
  want_config, want = convert.convert_state_dict(checkpoint.state_dict, checkpoint.options)
  model, params = load_clip(tmp_path / "hf_out")
  assert model.config.to_dict() == {**want_config.to_dict(), "dtype": "float32", "remat": False}
  jax.tree.map(np.testing.assert_array_equal, params, want)


@pytest.mark.parametrize("name,activation", [
    ("ViT-B-32", "gelu"), ("ViT-L-14", "gelu"), ("ViT-B-16-quickgelu", "quick_gelu"),
    ("ViT-H-14-378-quickgelu", "quick_gelu")])
def test_open_clip_naming_rule(name, activation):
  assert clip_sources.activation_from_open_clip_name(name) == activation


@pytest.mark.parametrize("flags,message", [
    ([], "cannot tell whether state.safetensors uses QuickGELU or GELU"),
    (["--activation", "relu"], "unknown --activation 'relu'; supported: quick_gelu, gelu"),
    (["--open_clip_model", "RN50"], "is a ResNet CLIP"),
    (["--open_clip_model", "convnext_base_w"], "not an open_clip ViT CLIP model name"),
    (["--open_clip_model", "ViT-B-32", "--activation", "quick_gelu"], "contradicts"),
])
def test_undeterminable_or_bad_activation_is_one_clear_line(tmp_path, quick_model, flags,
                                                             message):
  src = tmp_path / "state.safetensors"
  save_file(numpy_state(quick_model), str(src))
  with pytest.raises(UserError, match=message) as err:
    run_converter(src, tmp_path / "out", "--vocab", ref.vocab_path(), *flags)
  assert "\n" not in str(err.value)
  if not flags:  # says how to give it
    assert "--activation quick_gelu" in str(err.value) and "--open_clip_model" in str(err.value)
  assert not (tmp_path / "out").exists()


def test_open_clip_layouts_it_cannot_run_are_listed(tmp_path, quick_model):
  state = numpy_state(quick_model)
  state["visual.transformer.resblocks.0.ls_1.gamma"] = np.ones(64, np.float32)  # layer scale
  del state["ln_final.bias"]
  save_file(state, str(tmp_path / "ls.safetensors"))
  with pytest.raises(UserError) as err:
    run_converter(tmp_path / "ls.safetensors", tmp_path / "a", "--activation", "gelu",
                  "--vocab", ref.vocab_path())
  assert "missing keys: ln_final.bias" in str(err.value)
  assert "unknown keys: visual.transformer.resblocks.0.ls_1.gamma" in str(err.value)
  # A ResNet checkpoint is named as such before any activation question.
  save_file({"visual.layer1.0.conv1.weight": np.zeros((2, 2, 1, 1), np.float32)},
            str(tmp_path / "rn.safetensors"))
  with pytest.raises(UserError, match="ResNet CLIP checkpoint"):
    run_converter(tmp_path / "rn.safetensors", tmp_path / "b", "--vocab", ref.vocab_path())
  (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
  with pytest.raises(UserError, match="not a readable safetensors file"):
    run_converter(tmp_path / "junk.safetensors", tmp_path / "c", "--vocab", ref.vocab_path())
