"""The training job end to end: CLI, logs, results, evaluation protocol and error paths."""

import json
import os
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

from ncl_jax import errors
from ncl_jax import logging_utils
from ncl_jax import train

import train_testutils as tu

METRIC_KEYS = {"R@1", "R@5", "R@10", "MdR", "MnR"}


def _cli(args, env_extra=None, timeout=300):
  env = dict(os.environ)
  env.pop("JAX_NUM_CPU_DEVICES", None)
  env.update(env_extra or {})
  return subprocess.run([sys.executable, "-m", "ncl_jax.main", *args], cwd=tu.REPO_ROOT,
                        env=env, capture_output=True, text=True, timeout=timeout)


def _check_results_schema(results, steps):
  assert results["step"] == steps
  assert np.isfinite(results["loss"])
  for mode in ("plain", "ncl"):
    for direction in ("t2v", "v2t"):
      metrics = results["eval"][mode][direction]
      assert set(metrics) == METRIC_KEYS
      assert 0 <= metrics["R@1"] <= metrics["R@5"] <= metrics["R@10"] <= 100
      assert metrics["MdR"] >= 1 and metrics["MnR"] >= 1
    assert results["normalization_error"][mode] >= 0


# The 4-device CLI run below also guards learning. Its settings: the tiny demo with 32-d
# features and embeddings, 1,000 training videos, 90 steps of batch 32 (about 3 epochs) at
# lr 5e-3, 100 test videos (chance R@1: 1%). Measured with init and data seeds (0, 0), (1, 1),
# (2, 2) (this test uses 42 and 0): test R@1 plain t2v 8, 13, 20 and v2t 9, 15, 15, untrained
# 0-3 in either direction; mean relative normalization error plain 0.60-0.62, NCL-normalized
# 0.28-0.37, a ratio of 0.46-0.59. This test's own run: R@1 15 and 16, ratio 0.51.
LEARNING_OVERRIDES = dict(
    total_steps=90, eval_every_steps=30, global_batch_size=32, ncl__queue_size=64,
    optimizer__lr=5e-3, data__num_train_videos=1000, data__num_test_videos=100,
    data__feature_dim=32, model__feature_dim=32, model__embed_dim=32, model__text__width=32)
# Thresholds, each with a safety margin against the measurements above:
MIN_TRAINED_R1 = 4.0           # plain R@1 in %, both directions: 4x chance, half the lowest (8)
MIN_GAIN_OVER_UNTRAINED = 4.0  # R@1 points over the untrained model: half the lowest gain (8)
MAX_NCL_ERROR_RATIO = 0.8      # NCL-normalized / plain normalization error (highest: 0.59)


def _untrained_test_results(config):
  """The run's own evaluation before training: same config and seed, step 0 parameters."""
  with tu.fast_compile():
    run = train.Run(config)
    return run.evaluate(run.initial_state(), "test")


@pytest.mark.slow
def test_cli_trains_and_evaluates_on_four_devices(tmp_path):
  workdir = tmp_path / "run"
  proc = _cli(["--config=configs/synthetic.py", f"--workdir={workdir}",
               *tu.cli_overrides(**LEARNING_OVERRIDES)],
              env_extra={"JAX_NUM_CPU_DEVICES": "4", "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "4 device(s)" in proc.stdout
  # Speed and ETA are numbers, not the placeholder of the first line.
  assert re.search(r"\d+\.\d\d steps/s  ETA \d+:\d\d:\d\d", proc.stdout), proc.stdout[-2000:]

  results = json.loads((workdir / "results.json").read_text())
  # Learning first, so that a failure names the real cause rather than some bookkeeping.
  # It learned: well above chance and above its own untrained evaluation, in both directions.
  untrained = _untrained_test_results(tu.tiny_config("ncl", **LEARNING_OVERRIDES))
  for direction in ("t2v", "v2t"):
    trained_r1 = results["eval"]["plain"][direction]["R@1"]
    assert trained_r1 >= MIN_TRAINED_R1, (direction, trained_r1)
    assert trained_r1 >= untrained["plain"][direction]["R@1"] + MIN_GAIN_OVER_UNTRAINED
  # NCL-normalized inference balances the candidates: a much lower relative error.
  error = results["normalization_error"]
  assert error["ncl"] <= MAX_NCL_ERROR_RATIO * error["plain"], error

  _check_results_schema(results, steps=90)
  assert results["split"] == "test" and results["selected_on"] == "val"
  assert results["num_texts"] == results["num_videos"] == 100
  assert results["num_devices"] == 4
  assert results["bank"] == "queue" and results["bank_size"] == {"t2v": 64, "v2t": 64}
  # Model selection on the validation split: evaluated every 30 steps.
  assert results["selected_step"] in (30, 60, 90)

  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "loss" in l]
  assert [l["step"] for l in train_lines] == list(range(1, 91))  # every step of a short run
  assert train_lines[-1]["loss"] == pytest.approx(results["loss"])
  val_lines = [l for l in lines if "val/plain/t2v/R@1" in l]
  assert [l["step"] for l in val_lines] == [30, 60, 90]
  # The selected step has the best validation score. With 20 validation videos R@1 moves in
  # 5-point steps and ties are common; orbax picks the latest of tied steps, so the test
  # compares the chosen step's score, not its index.
  val_r1 = {l["step"]: l["val/plain/t2v/R@1"] for l in val_lines}
  assert val_r1[results["selected_step"]] == max(val_r1.values()), val_r1
  assert any(l.get("test/plain/t2v/R@1") == pytest.approx(results["eval"]["plain"]["t2v"]["R@1"])
             for l in lines)

  assert list((workdir / "tb").glob("events.out.tfevents.*"))
  pngs = sorted(p.name for p in workdir.glob("*.png"))
  step = results["selected_step"]
  assert pngs == [f"normalization_test_step{step}_{d}.png" for d in ("t2v", "v2t")]


def test_results_json_rounds_its_floats(tmp_path):
  path = tmp_path / "results.json"
  payload = {"R@1": 100.0 * 0.676, "runs": [{"loss": 1 / 3}], "step": 7}
  train._write_json(str(path), payload)  # pylint: disable=protected-access
  text = path.read_text()
  assert '"R@1": 67.6,' in text and '"loss": 0.3333333333' in text and '"step": 7' in text
  assert json.loads(text)["runs"][0]["loss"] == pytest.approx(1 / 3)


@pytest.mark.slow
def test_in_process_run_logs_and_resumes_without_repeating(tmp_path):
  config = tu.tiny_config("infonce", total_steps=3, eval_every_steps=0)
  with tu.fast_compile():
    results = train.train_and_evaluate(config, str(tmp_path))
    _check_results_schema(results, steps=3)
    assert results["loss_name"] == "infonce"
    # The same command again finds the finished run: no step is repeated, results are rebuilt.
    again = train.train_and_evaluate(config, str(tmp_path))
  assert again["eval"] == results["eval"] and again["loss"] == results["loss"]
  steps = [json.loads(l)["step"] for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(l)]
  assert steps == [1, 2, 3]


@pytest.mark.slow
def test_non_finite_loss_stops_the_run_and_names_the_step(tmp_path):
  # Step 1 has learning rate 0 (CLIP4Clip's warm-up starts at 0); step 2 moves every weight by
  # ~1e30, so the logits of step 3 overflow.
  config = tu.tiny_config("infonce", total_steps=4, optimizer__lr=1e30,
                          optimizer__weight_decay=0.0, eval_every_steps=0)
  with tu.fast_compile(), pytest.raises(errors.UserError, match=r"not finite at step 3"):
    train.train_and_evaluate(config, str(tmp_path))
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [1, 2]


def test_real_dataset_without_prepared_data_says_how_to_prepare(tmp_path):
  config = tu.load_config("msrvtt")
  config.data.data_dir = str(tmp_path / "nothing_here")
  with pytest.raises(errors.UserError) as err:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  message = str(err.value)
  assert "ncl_jax.data.prepare msrvtt" in message
  assert "configs/synthetic.py needs no data" in message
  assert not (tmp_path / "run").exists()


def test_model_that_cannot_read_the_data_is_a_user_error(tmp_path):
  config = tu.tiny_config("ncl", model__feature_dim=32)
  with pytest.raises(errors.UserError, match="model.feature_dim is 32"):
    train.train_and_evaluate(config, str(tmp_path))


def test_queue_that_does_not_split_over_devices_is_a_user_error(tmp_path):
  config = tu.tiny_config("ncl", ncl__queue_size=30)
  with pytest.raises(errors.UserError, match="config.ncl.queue_size = 30"):
    train.train_and_evaluate(config, str(tmp_path))


def test_initial_state_copies_pretrained_clip_weights(tmp_path):
  from ncl_jax.models import clip as clip_lib
  from ncl_jax.models import convert

  config = tu.tiny_config("ncl")
  # An open_clip-style checkpoint: GELU and another layer-norm epsilon, which the run adopts.
  clip_config = ml_collections.ConfigDict(dict(
      embed_dim=16,
      vision=dict(width=16, layers=1, heads=2, patch_size=8, image_size=16),
      text=config.model.text.to_dict()))
  clip_config.text.update(activation="gelu", layer_norm_eps=1e-6)
  model = clip_lib.CLIP(clip_config)
  clip_params = jax.jit(model.init)(jax.random.PRNGKey(7), np.zeros((1, 16, 16, 3), np.float32),
                                    np.zeros((1, 8), np.int32))["params"]
  clip_params = jax.device_get(clip_params)
  clip_params["logit_scale"] = np.float32(4.0)
  convert.save_converted(tmp_path / "clip", clip_config, clip_params)
  config.clip_dir = str(tmp_path / "clip")
  with tu.fast_compile():
    run = train.Run(config)
    state = jax.device_get(run.initial_state())
  for a, b in zip(jax.tree.leaves(clip_params["text"]), jax.tree.leaves(state.params["text"])):
    np.testing.assert_array_equal(a, b)
  assert run.model.config.text.activation == "gelu"
  assert run.model.config.text.layer_norm_eps == 1e-6
  assert config.model.vision.activation == "quick_gelu"  # not stored: OpenAI's default
  assert float(state.params["logit_scale"]) == 4.0
  # Pretrained CLIP weights train at lr * clip_lr_coef.
  assert float(run.schedules["clip"](50)) == pytest.approx(
      float(run.schedules["new"](50)) * config.optimizer.clip_lr_coef)


def test_training_tokenizes_with_the_clip_directorys_vocabulary(tmp_path):
  import clip_reference as ref

  config = tu.load_config("msrvtt")
  config.clip_dir = str(tmp_path / "clip")
  (tmp_path / "clip").mkdir()
  train.use_clip_vocabulary(config)
  assert config.data.vocab_path == ""  # none there: the data set's default
  ref.write_hf_tokenizer(tmp_path / "clip")
  train.use_clip_vocabulary(config)
  assert config.data.vocab_path == str(tmp_path / "clip")
  config.data.vocab_path = "/elsewhere/vocab.json"  # an explicit choice stays
  train.use_clip_vocabulary(config)
  assert config.data.vocab_path == "/elsewhere/vocab.json"


def test_missing_clip_weights_fail_before_training(tmp_path):
  config = tu.tiny_config("ncl", clip_dir=str(tmp_path / "no_clip"))
  with pytest.raises(errors.UserError, match="not a converted CLIP directory"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_progress_line_fills_in_speed_and_eta(monkeypatch):
  clock = iter([100.0, 102.0, 112.0])  # seconds at the three lines below
  monkeypatch.setattr(logging_utils.time, "perf_counter", lambda: next(clock))
  progress = logging_utils.Progress(total_steps=100, start_step=50)  # a resumed run
  # The first line starts the clock (it comes after compilation), so it has no speed yet.
  assert progress.line(51, 2.0) == "step 51/100  loss 2.0000  -- steps/s  ETA --"
  # 10 steps in 2 s: 5 steps/s, and the 39 steps to go take 7.8 s.
  assert progress.line(61, 1.5) == "step 61/100  loss 1.5000  5.00 steps/s  ETA 0:00:08"
  # The speed is an average since the first line: 40 steps in 12 s; 9 to go take 2.7 s.
  assert progress.line(91, 1.25) == "step 91/100  loss 1.2500  3.33 steps/s  ETA 0:00:03"
