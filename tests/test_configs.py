"""Every training config loads, locks, and carries the fields and recipe the trainer relies on."""

import math
import re

import ml_collections
import pytest

from ncl_jax import losses

import train_testutils as tu

REAL = ("msrvtt", "msvd", "activitynet", "didemo")


def _all_configs():
  for name in tu.CONFIG_FILES:
    yield name, None
  for name in REAL:
    yield name, "seqTransf"


@pytest.mark.parametrize("name,arg", list(_all_configs()))
def test_config_loads_and_locks(name, arg):
  config = tu.load_config(name, arg)
  assert isinstance(config, ml_collections.ConfigDict)
  config.lock()
  with pytest.raises(AttributeError):
    config.no_such_field = 1
  with pytest.raises(AttributeError):
    config.ncl.queue_sise = 1
  # Required fields, under these names.
  assert config.loss in losses.LOSS_NAMES
  assert isinstance(config.seed, int)
  assert isinstance(config.total_steps, int)
  assert isinstance(config.checkpoint_every_steps, int)
  assert config.global_batch_size % 4 == 0 and config.ncl.queue_size % 4 == 0
  assert config.eval.batch_size % 4 == 0
  # Model and data agree.
  assert config.model.input_mode == config.data.input_mode
  assert config.model.max_frames == config.data.max_frames
  assert config.model.text.context_length >= config.data.max_words
  config.to_dict()  # serialisable for the checkpoint's config guard


def test_synthetic_config_has_a_data_seed_and_runs_the_demo_quickly():
  config = tu.load_config("synthetic")
  assert isinstance(config.data.seed, int)
  assert config.data.name == "synthetic" and config.clip_dir == ""


@pytest.mark.parametrize("name", REAL)
def test_real_configs_carry_clip4clips_protocol(name):
  config = tu.load_config(name)
  assert config.global_batch_size == 128
  assert config.num_epochs == 5 and config.total_steps == 0
  opt = config.optimizer
  assert opt.lr == 1e-4 and math.isclose(opt.lr * opt.clip_lr_coef, 1e-7)
  assert opt.warmup_fraction == 0.1
  assert (opt.b1, opt.b2, opt.eps, opt.weight_decay, opt.grad_clip_norm) == (
      0.9, 0.98, 1e-6, 0.2, 1.0)
  words, frames = (64, 64) if name in ("activitynet", "didemo") else (32, 12)
  assert (config.data.max_words, config.data.max_frames) == (words, frames)
  assert config.model.max_frames == frames
  # ViT-B/32 on frames, pretrained CLIP weights, meanP by default.
  assert config.model.input_mode == "frames"
  assert (config.model.vision.patch_size, config.model.vision.width) == (32, 768)
  assert config.model.head == "meanP"
  assert tu.load_config(name, "seqTransf").model.head == "seqTransf"
  assert config.clip_dir
  with pytest.raises(ValueError, match="unknown head"):
    tu.load_config(name, "tightTransf")


@pytest.mark.parametrize("name", tu.CONFIG_FILES)
def test_docstring_has_the_run_command(name):
  text = (tu.CONFIG_DIR / f"{name}.py").read_text()
  docstring = text.split('"""')[1]
  assert re.search(rf"python -m ncl_jax\.main --config=configs/{name}\.py(:\w+)? --workdir=",
                   docstring)


def test_ncl_knobs_are_documented_in_the_base_config():
  text = (tu.REPO_ROOT / "ncl_jax" / "config_base.py").read_text()
  for knob in ("queue_size", "sinkhorn_temperature", "tol", "max_iterations", "gradient",
               "include_batch"):
    line = next(l for l in text.splitlines() if f"config.ncl.{knob} =" in l)
    index = text.splitlines().index(line)
    # a comment on the line itself or right above it explains the knob
    assert "#" in line or text.splitlines()[index - 1].strip().startswith("#"), knob


# OpenAI's published ViT sizes as clip.model.CLIP's arguments: embed, resolution, vision layers,
# width, patch, context, vocab, text width, heads, layers.
OPENAI_VITS = {"vitb32": (512, 224, 12, 768, 32, 77, 49408, 512, 8, 12),
               "vitb16": (512, 224, 12, 768, 16, 77, 49408, 512, 8, 12),
               "vitl14": (768, 224, 24, 1024, 14, 77, 49408, 768, 12, 12)}


@pytest.mark.parametrize("tower", sorted(OPENAI_VITS))
def test_tower_variants_fit_the_checkpoints_of_that_size(tower):
  """Each :vitXX variant has the sizes a converted checkpoint of that model infers (OpenAI's
  reference model built on torch's meta device: shapes only, no memory)."""
  import clip_reference as ref
  from ncl_jax.models import convert
  from suite_testutils import require_module
  torch = require_module("torch")

  with torch.device("meta"):
    model = ref.model_module().CLIP(*OPENAI_VITS[tower])
  inferred = convert.infer_config({k: tuple(v.shape) for k, v in model.state_dict().items()})
  for name in REAL + ("coco", "flickr30k"):
    config = tu.load_config(name, tower)
    for part in ("vision", "text"):
      for key, value in inferred[part].items():
        assert config.model[part][key] == value, (name, part, key)
    assert config.model.embed_dim == inferred.embed_dim
    assert (config.model.dtype, config.model.remat) == (
        ("float32", False) if tower == "vitb32" else ("bfloat16", True))
    assert config.global_batch_size == 128  # CLIP4Clip's batch and frames for every tower
  seq = tu.load_config("msrvtt", f"seqTransf,{tower}")
  assert seq.model.head == "seqTransf" and seq.model.head_heads == inferred.text.heads
  assert seq.clip_dir.endswith({"vitb32": "ViT-B-32", "vitb16": "ViT-B-16",
                                "vitl14": "ViT-L-14"}[tower])


@pytest.mark.parametrize("arg", ["vitl14,vitb16", "seqTransf,meanP", "vith14"])
def test_bad_variants_name_the_choices(arg):
  with pytest.raises(ValueError, match="give at most one head .* and one model"):
    tu.load_config("msrvtt", arg)
