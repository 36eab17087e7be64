"""tools/export.py and tools/embed.py on a tiny synthetic run: the bundle round trip, --verify,
the exported functions, refusals, and embeddings fed to ncl_jax.posthoc."""

import functools
import importlib.util
import json
import pathlib
import shlex
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import bundle_testutils
import train_testutils
from ncl_jax import export, inference, posthoc, runs
from ncl_jax.data import normalize_frames
from ncl_jax.models.dual_encoder import DualEncoder

TOOLS = pathlib.Path(__file__).resolve().parents[1] / "tools"


def _tool(name):
  spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _run_cli(module, argv):
  """Runs a tool's main under run_cli; returns its exit code."""
  from ncl_jax.errors import run_cli
  with pytest.raises(SystemExit) as exit_info:
    run_cli(lambda: module.main(argv))
  return exit_info.value.code


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return bundle_testutils.tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory):
  return bundle_testutils.tiny_bundle(tmp_path_factory)


def test_export_verify_reproduces_results(run_dir, tmp_path, capsys):
  tool = _tool("export")
  out = tmp_path / "bundle"
  with train_testutils.fast_compile():
    assert _run_cli(tool, ["--workdir", str(run_dir), "--out", str(out), "--verify"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  report = json.loads(lines[-1])
  results = json.loads((run_dir / "results.json").read_text())
  assert report["verified"] is True
  # results.json holds its floats at 10 decimals.
  assert report["t2v"] == pytest.approx(results["eval"]["plain"]["t2v"], abs=1e-9)
  assert report["v2t"] == pytest.approx(results["eval"]["plain"]["v2t"], abs=1e-9)
  assert report["ncl_matches_results"] is True
  assert report["step"] == results["selected_step"] and report["split"] == results["split"]
  assert max(report["max_abs_diff"].values()) <= 1e-5

  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["jax_version"] == jax.__version__
  assert set(manifest["exported"]["platforms"]) == {"cpu", "cuda", "tpu"}
  assert "not archival" in manifest["note"]
  assert manifest["tokenizer"] == "synthetic_vocab.txt"  # the synthetic set's words
  config = train_testutils.tiny_config("ncl")
  # The bank is the queue at the selected step: min(queue size, steps x global batch) rows of
  # unit-norm embeddings in each direction.
  rows = min(config.ncl.queue_size, results["selected_step"] * config.global_batch_size)
  with np.load(out / "bank.npz") as bank:
    for name in ("text_bank", "video_bank"):
      assert bank[name].shape == (rows, config.model.embed_dim)
      np.testing.assert_allclose(np.linalg.norm(bank[name], axis=1), 1.0, atol=1e-5)
  assert manifest["bank_size"] == {"text": rows, "video": rows}


def test_verify_fails_when_results_differ(run_dir, bundle_dir, tmp_path, capsys):
  changed = tmp_path / "run"
  shutil.copytree(run_dir, changed)
  results = json.loads((changed / "results.json").read_text())
  results["eval"]["plain"]["t2v"]["R@1"] += 1.0
  (changed / "results.json").write_text(json.dumps(results))
  with train_testutils.fast_compile():
    report = export.verify_bundle(changed, bundle_dir)
  assert report["verified"] is False
  assert report["t2v"]["R@1"] == pytest.approx(results["eval"]["plain"]["t2v"]["R@1"] - 1.0,
                                              abs=1e-9)


def test_refusals_are_one_clear_error(run_dir, bundle_dir, tmp_path, capsys):
  tool = _tool("export")
  assert _run_cli(tool, ["--workdir", str(run_dir), "--out", str(bundle_dir)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: --out") and "already exists" in err and "\n" not in err
  assert _run_cli(tool, ["--workdir", str(tmp_path / "nope"), "--out", str(tmp_path / "b")]) == 2
  err = capsys.readouterr().err.strip()
  assert "is not a training run" in err and "\n" not in err
  assert not (tmp_path / "b").exists()
  assert _run_cli(tool, ["--workdir", str(run_dir), "--out", str(tmp_path / "c"),
                         "--step", "3"]) == 2
  assert "no checkpoint of step 3" in capsys.readouterr().err


def test_a_damaged_checkpoint_is_named_with_how_to_choose_another(run_dir, tmp_path, capsys):
  damaged_run = tmp_path / "run"
  shutil.copytree(run_dir, damaged_run)
  step = json.loads((run_dir / "results.json").read_text())["selected_step"]
  (damaged_run / "checkpoints" / str(step) / "state" / "_METADATA").write_bytes(b"")
  assert _run_cli(_tool("export"), ["--workdir", str(damaged_run), "--out",
                                    str(tmp_path / "b")]) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and "Traceback" not in err
  assert err.startswith(f"error: checkpoint {damaged_run / 'checkpoints' / str(step)} is "
                        "damaged: state/_METADATA is empty; choose another with --step N")
  assert not (tmp_path / "b").exists()


def test_exported_functions_match_the_model_for_any_batch(bundle_dir):
  exported = inference.load_bundle(bundle_dir, backend="exported")
  flax_bundle = inference.load_bundle(bundle_dir)
  rng = np.random.default_rng(1)
  tokens = rng.integers(1, 100, size=(7, exported.max_words)).astype(np.int32)
  tokens[:, -1] = 119   # end token (largest id) where the text tower pools
  videos = rng.normal(size=(5,) + exported.video_shape).astype(np.float32)
  mask = np.arange(exported.max_frames)[None] < rng.integers(1, exported.max_frames + 1, (5, 1))
  model = DualEncoder(flax_bundle.config.model)
  variables = {"params": flax_bundle.params}
  with train_testutils.fast_compile():
    want_text = np.asarray(jax.jit(functools.partial(
        model.apply, method=DualEncoder.encode_text))(variables, tokens))
    want_video = np.asarray(jax.jit(functools.partial(
        model.apply, method=DualEncoder.encode_video))(variables, videos, mask))
    for bundle in (exported, flax_bundle):
      # Batches of 4: one full batch and one zero-padded batch.
      np.testing.assert_allclose(bundle.embed_texts(tokens, 4), want_text, atol=1e-5)
      np.testing.assert_allclose(bundle.embed_videos(videos, mask, 4), want_video, atol=1e-5)
  # The serialized functions are batch-polymorphic: any batch size runs without padding.
  text_fn = jax.export.deserialize(bytearray((bundle_dir / runs.TEXT_FN_FILE).read_bytes()))
  np.testing.assert_allclose(np.asarray(text_fn.call(exported.params, tokens[:2])),
                             want_text[:2], atol=1e-5)


def test_frames_mode_seqtransf_export_normalizes_uint8_pixels():
  config = ml_collections.ConfigDict(dict(
      model=train_testutils.tiny_config().model.to_dict(),
      data=dict(max_words=8, max_frames=2, image_size=8)))
  model_config = config.model
  model_config.input_mode = "frames"
  model_config.max_frames = 2
  model_config.vision.update(dict(width=16, layers=1, heads=2, patch_size=4, image_size=8))
  # seqTransf's frame transformer must also export with a symbolic batch size.
  model_config.update(dict(head="seqTransf", head_layers=1, head_heads=2))
  model = DualEncoder(model_config)
  pixels = np.random.default_rng(2).integers(0, 256, size=(3, 2, 8, 8, 3)).astype(np.uint8)
  mask = np.array([[True, True], [True, False], [True, True]])
  with train_testutils.fast_compile():
    params = jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32),
                                 jnp.zeros((1, 2, 8, 8, 3)), jnp.ones((1, 2), bool))["params"]
    _, video_fn = export.exported_functions(config, params, platforms=("cpu",))
    got = np.asarray(video_fn.call(params, pixels, mask))
    want = jax.jit(functools.partial(model.apply, method=DualEncoder.encode_video))(
        {"params": params}, normalize_frames(pixels), mask)
  np.testing.assert_allclose(got, np.asarray(want), atol=1e-5)


def test_embed_feeds_posthoc_with_the_runs_numbers(run_dir, bundle_dir, tmp_path, capsys):
  tool = _tool("embed")
  out = tmp_path / "emb"
  assert _run_cli(tool, ["--bundle", str(bundle_dir), "--split", "test", "--out",
                         str(out), "--batch_size", "16"]) == 0
  command = capsys.readouterr().out.strip().splitlines()[-1].strip()
  info = json.loads((out / "info.json").read_text())
  results = json.loads((run_dir / "results.json").read_text())
  assert (info["num_texts"], info["num_videos"]) == (results["num_texts"], results["num_videos"])
  text, video = np.load(out / "text_emb.npy"), np.load(out / "video_emb.npy")
  np.testing.assert_allclose(np.load(out / "sims.npy"), text @ video.T, atol=1e-6)
  # The printed posthoc command (NCL with the bundled banks) reproduces the run's NCL numbers;
  # without normalization, its plain numbers.
  assert command == info["posthoc"]
  ncl_args = shlex.split(command)
  assert ncl_args[:3] == ["python", "-m", "ncl_jax.posthoc"]
  plain_args = [str(out / "sims.npy"), "--method", "none", "--gt",
                str(out / "caption_to_video.npy")]
  for mode, argv in (("ncl", ncl_args[3:]), ("plain", plain_args)):
    assert posthoc.main(argv + ["--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    for direction in ("t2v", "v2t"):
      for key, value in results["eval"][mode][direction].items():
        assert report[direction][key] == pytest.approx(value, abs=1e-9), (mode, direction, key)
  # The same files from the workdir directly; an existing --out is refused.
  assert _run_cli(tool, ["--workdir", str(run_dir), "--out", str(tmp_path / "emb2")]) == 0
  np.testing.assert_allclose(np.load(tmp_path / "emb2" / "text_emb.npy"), text, atol=1e-6)
  assert _run_cli(tool, ["--bundle", str(bundle_dir), "--out", str(out)]) == 2


def _without_tokenizer(bundle_dir, out):
  shutil.copytree(bundle_dir, out)
  manifest = json.loads((out / "manifest.json").read_text())
  manifest["tokenizer"] = None
  (out / "manifest.json").write_text(json.dumps(manifest))
  return out


def test_embed_captions_streams_a_caption_file_into_one_npy(bundle_dir, tmp_path, capsys):
  from ncl_jax import inference
  tool = _tool("embed")
  # A bundle without a tokenizer reads token ids (the demo's bundle has the synthetic words).
  bundle_dir = _without_tokenizer(bundle_dir, tmp_path / "ids_bundle")
  bundle = inference.load_bundle(bundle_dir)
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 100, size=(37, bundle.max_words))
  lengths = rng.integers(1, bundle.max_words + 1, 37)
  lines = [" ".join(map(str, row[:n])) for row, n in zip(tokens, lengths)]
  captions = tmp_path / "captions.txt"
  captions.write_text("\n".join(lines))  # no newline after the last line
  out = tmp_path / "bank.npy"
  # batch_size 4 reads blocks of 64 lines: 37 lines make one short block with a short batch.
  assert _run_cli(tool, ["--bundle", str(bundle_dir), "--captions", str(captions), "--out",
                         str(out), "--batch_size", "4", "--progress_seconds", "0"]) == 0
  assert "embedded 37/37 captions" in capsys.readouterr().err
  padded = np.zeros_like(tokens)
  for row, n in enumerate(lengths):
    padded[row, :n] = tokens[row, :n]
  np.testing.assert_allclose(np.load(out), bundle.embed_texts(padded), atol=1e-6)
  assert _run_cli(tool, ["--bundle", str(bundle_dir), "--captions", str(captions), "--out",
                         str(out)]) == 2  # never overwritten
  empty = tmp_path / "empty.txt"
  empty.write_text("")
  assert _run_cli(tool, ["--bundle", str(bundle_dir), "--captions", str(empty), "--out",
                         str(tmp_path / "e.npy")]) == 2
  assert "is empty" in capsys.readouterr().err
  bad = tmp_path / "bad.txt"
  bad.write_text("1 2 3\na dog runs\n")
  assert _run_cli(tool, ["--bundle", str(bundle_dir), "--captions", str(bad), "--out",
                         str(tmp_path / "b.npy")]) == 2
  assert "line 2 is not token ids" in capsys.readouterr().err
  assert not list(tmp_path.glob(".*partial*")) and not (tmp_path / "b.npy").exists()
