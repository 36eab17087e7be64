"""tools/convert_clip.py on OpenAI's formats: TorchScript and plain state-dict files → load_clip
gives the reference's features; bad inputs give one-line errors that say what is wrong.
(open_clip and transformers sources: test_convert_clip_open_clip.py, test_convert_clip_hf.py.)"""

import importlib.util
import json
import pathlib
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

import clip_reference as ref
from suite_testutils import require_module
from ncl_jax.errors import UserError
from ncl_jax.models import load_clip, read_config
from ncl_jax.tokenizer import ClipTokenizer

torch = require_module("torch")
torch.set_num_threads(2)
REPO = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tools" / "convert_clip.py"
# embed, resolution, vision layers/width/patch, context, vocab, text width/layers
SMALL = (32, 32, 2, 64, 16, 10, 200, 64, 2)


def _converter():
  spec = importlib.util.spec_from_file_location("convert_clip_tool", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def small_model():
  return ref.random_clip(*SMALL, seed=7)


def _check_loaded_matches(out_dir, model, rng):
  config = read_config(out_dir)
  assert config.vision.patch_size == 16 and config.text.layers == 2
  image_diff, text_diff = ref.converted_feature_differences(out_dir, model, rng)
  assert image_diff <= 1e-4 and text_diff <= 1e-4, (image_diff, text_diff)


def test_torchscript_archive_converts(tmp_path, small_model, rng):
  """OpenAI publishes TorchScript archives; a traced model has the same layout."""
  images = torch.zeros(1, 3, 32, 32)
  tokens = torch.from_numpy(ref.random_tokens(rng, 1, 10, 200))
  with warnings.catch_warnings():  # tracer and deprecation notices about torch.jit itself
    warnings.simplefilter("ignore")
    traced = torch.jit.trace(small_model, (images, tokens))
  src = tmp_path / "ViT-tiny.pt"
  traced.save(str(src))
  out = tmp_path / "converted"
  assert _converter().main(["--src", str(src), "--out", str(out), "--vocab",
                            str(ref.vocab_path())]) == 0
  assert sorted(p.name for p in out.iterdir()) == ["bpe_simple_vocab_16e6.txt.gz", "config.json",
                                                   "params"]
  options = {"mlp_ratio": 4.0, "activation": "quick_gelu", "layer_norm_eps": 1e-5}
  stored = json.loads((out / "config.json").read_text())
  assert stored == {
      "format": "ncl_jax-clip-v2", "embed_dim": 32,
      "vision": {"width": 64, "layers": 2, "heads": 1, "patch_size": 16, "image_size": 32,
                 **options},
      "text": {"width": 64, "layers": 2, "heads": 1, "vocab_size": 200, "context_length": 10,
               **options, "eos_id": -1},
      "source": {"format": "openai_torchscript", "path": str(src.resolve()),
                 "activation": "quick_gelu", "activation_from": "OpenAI TorchScript archive"}}
  _check_loaded_matches(out, small_model, rng)
  # The copied vocabulary feeds the tokenizer directly from the converted directory.
  assert ClipTokenizer(out).encode_batch(["a dog"], context_length=5).tolist() == [
      [49406, 320, 1929, 49407, 0]]


def test_plain_state_dict_converts_and_float16_is_widened(tmp_path, small_model, rng):
  src = tmp_path / "state.pt"
  torch.save(small_model.state_dict(), src)
  # A plain state dict does not say its activation (open_clip's LAION models use GELU).
  with pytest.raises(UserError, match="cannot tell whether state.pt uses QuickGELU or GELU"):
    _converter().main(["--src", str(src), "--out", str(tmp_path / "a"), "--vocab",
                       str(ref.vocab_path())])
  _converter().main(["--src", str(src), "--out", str(tmp_path / "a"), "--vocab",
                     str(ref.vocab_path()), "--activation", "quick_gelu"])
  _check_loaded_matches(tmp_path / "a", small_model, rng)

  half = {k: v.half() for k, v in small_model.state_dict().items()}
  half["input_resolution"] = torch.tensor(32)  # extra scalars of OpenAI archives are skipped
  torch.save(half, tmp_path / "half.pt")
  _converter().main(["--src", str(tmp_path / "half.pt"), "--out", str(tmp_path / "b"),
                     "--vocab", str(ref.vocab_path()), "--activation", "quick_gelu"])
  _, params = load_clip(tmp_path / "b")
  kernel = params["visual"]["transformer"]["resblocks_1"]["mlp"]["c_fc"]["kernel"]
  assert kernel.dtype == jnp.float32
  np.testing.assert_array_equal(
      kernel, half["visual.transformer.resblocks.1.mlp.c_fc.weight"].float().numpy().T)


def _save(tmp_path, state, name="bad.pt"):
  path = tmp_path / name
  torch.save(state, path)
  return path


def _run_main(tmp_path, src, out_name="out"):
  return _converter().main(["--src", str(src), "--out", str(tmp_path / out_name), "--vocab",
                            str(ref.vocab_path()), "--activation", "quick_gelu"])


def test_unknown_and_missing_keys_are_listed(tmp_path, small_model):
  state = dict(small_model.state_dict())
  del state["visual.transformer.resblocks.0.ln_2.bias"]
  state["visual.extra_head.weight"] = torch.zeros(3)
  with pytest.raises(UserError) as err:
    _run_main(tmp_path, _save(tmp_path, state))
  message = str(err.value)
  assert "missing keys: visual.transformer.resblocks.0.ln_2.bias" in message
  assert "unknown keys: visual.extra_head.weight" in message
  assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content,message", [
    ("text", "neither a TorchScript archive nor a torch.save file"),
    ("linear", "not an OpenAI CLIP checkpoint"),
    ("resnet", "ResNet CLIP checkpoint"),
    ("list", "does not hold a state dict"),
])
def test_non_clip_files_give_clear_errors(tmp_path, content, message):
  if content == "text":
    src = tmp_path / "notes.pt"
    src.write_text("not a checkpoint\n")
  elif content == "linear":
    src = _save(tmp_path, torch.nn.Linear(3, 4).state_dict())
  elif content == "resnet":
    src = _save(tmp_path, {"visual.layer1.0.conv1.weight": torch.zeros(2, 2, 1, 1)})
  else:
    src = _save(tmp_path, [torch.zeros(2)])
  with pytest.raises(UserError, match=message):
    _run_main(tmp_path, src)


def test_refuses_a_non_empty_out_directory(tmp_path, small_model):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("user data")
  with pytest.raises(UserError, match="not an empty directory"):
    _run_main(tmp_path, _save(tmp_path, small_model.state_dict()))
  assert (out / "keep.txt").read_text() == "user data"


def test_command_line_errors_are_one_line(tmp_path):
  result = subprocess.run(
      [sys.executable, str(SCRIPT), "--src", str(tmp_path / "missing.pt"), "--out",
       str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, check=False)
  assert result.returncode == 2
  assert result.stderr.strip().count("\n") == 0
  assert "missing.pt does not exist" in result.stderr
