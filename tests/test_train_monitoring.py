"""The trainer's run monitoring: non-finite losses, throughput and MFU, profiling."""

import json
import math

import jax
import numpy as np
import pytest

import train_testutils as tu
from ncl_jax import checkpointing, chips, errors, logging_utils, train


@pytest.mark.slow
def test_non_finite_loss_keeps_the_last_good_checkpoint(tmp_path):
  # Step 1 has learning rate 0 (warm-up starts at 0); step 2 moves every weight by ~1e30, so the
  # logits of step 3 overflow. Step 2 is saved (every 2 steps) before step 3 runs.
  config = tu.tiny_config("infonce", total_steps=6, optimizer__lr=1e30,
                          optimizer__weight_decay=0.0, eval_every_steps=0,
                          checkpoint_every_steps=2)
  with tu.fast_compile():
    with pytest.raises(errors.UserError, match=r"not finite at step 3 .*last checkpoint is kept"):
      train.train_and_evaluate(config, str(tmp_path))
    ckpt = checkpointing.Checkpointer(tmp_path, config=config.to_dict())
    assert ckpt.all_steps == [2]
    state, extra = ckpt.restore(2, train.Run(config).abstract_state)
    ckpt.close()
  assert int(state.step) == 2
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(jax.device_get(state.params)))
  assert math.isfinite(extra["last_loss"])


def test_non_finite_gradient_norm_also_stops_the_run():
  train.check_finite(5, {"loss": 1.0, "grad_norm": 2.0})
  with pytest.raises(errors.UserError, match=r"gradient norm is not finite at step 7"):
    train.check_finite(7, {"loss": 1.0, "grad_norm": float("inf")})


@pytest.mark.slow
def test_run_logs_throughput_and_writes_the_profile_of_the_chosen_steps(tmp_path):
  config = tu.tiny_config("infonce", total_steps=4, eval_every_steps=0, profile_steps=(2, 3))
  with tu.fast_compile():
    results = train.train_and_evaluate(config, str(tmp_path))
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_lines = [l for l in lines if "loss" in l]
  # Every step is logged (a short run); the first starts the clock, the others carry rates.
  assert "steps_per_s" not in train_lines[0]
  for line in train_lines[1:]:
    assert line["steps_per_s"] > 0 and line["tflops_per_device"] > 0
    assert "mfu" not in line   # no peak FLOP/s for a CPU
  throughput = results["throughput"]
  assert throughput["flops_per_step_per_device"] > 0
  assert throughput["steps_per_s"] > 0 and throughput["mfu"] is None
  # results.json rounds floats at 10 decimals: a tiny CPU model's TFLOP/s keep ~5 digits.
  assert throughput["tflops_per_device"] == pytest.approx(
      throughput["flops_per_step_per_device"] * throughput["steps_per_s"] / 1e12, rel=1e-3)
  assert results["device_kind"] == jax.devices()[0].device_kind
  traces = list((tmp_path / train.PROFILE_DIR).glob("plugins/profile/*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_throughput_reports_mfu_against_the_chips_peak(monkeypatch):
  clock = iter([10.0, 12.0, 13.0])
  monkeypatch.setattr(logging_utils.time, "perf_counter", lambda: next(clock))
  peak = chips.peak_flops_of("TPU v5 lite")
  meter = logging_utils.Throughput(flops_per_step_per_device=1e12, peak_flops=peak)
  assert meter.report(5) == {}                      # starts the clock
  first = meter.report(9)                           # 4 steps in 2 s
  assert first["steps_per_s"] == pytest.approx(2.0)
  assert first["tflops_per_device"] == pytest.approx(2.0)
  assert first["mfu"] == pytest.approx(2e12 / 197e12)
  meter.report(10)                                  # 1 step in 1 s
  summary = meter.summary()
  assert summary["steps_per_s"] == pytest.approx(5 / 3)
  assert summary["mfu"] == pytest.approx(1e12 * 5 / 3 / 197e12)


def test_profile_steps_must_be_an_ordered_pair(tmp_path):
  with pytest.raises(errors.UserError, match=r"profile_steps must be \(first, last\)"):
    train.ProfileWindow((3, 2), str(tmp_path))
  with pytest.raises(errors.UserError, match=r"profile_steps"):
    train.ProfileWindow((0, 2), str(tmp_path))
  train.ProfileWindow((), str(tmp_path))
