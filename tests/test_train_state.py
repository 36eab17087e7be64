"""CLIP4Clip's optimiser: schedule, two learning rates, frozen weights, decay mask, clamp."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ncl_jax import errors
from ncl_jax import train
from ncl_jax import train_state as ts
from ncl_jax.models import dual_encoder

import train_testutils as tu


def _opt_config(**overrides):
  config = tu.load_config("msrvtt").optimizer
  for k, v in overrides.items():
    config[k] = v
  return config


def test_schedule_is_clip4clips_warmup_cosine():
  total, warmup, peak = 200, 0.1, 1e-4
  schedule = ts.clip4clip_warmup_cosine(peak, total, warmup)
  for count in (0, 1, 10, 19, 20, 21, 100, 199, 200):
    x = count / total
    # CLIP4Clip's BertAdam: warmup_cosine(x) = x / warmup below warmup, else 0.5 (1 + cos(pi x)).
    expected = peak * (x / warmup if x < warmup else 0.5 * (1 + math.cos(math.pi * x)))
    assert float(schedule(count)) == pytest.approx(expected, rel=1e-5, abs=1e-12)
  with pytest.raises(errors.UserError):
    ts.clip4clip_warmup_cosine(peak, 0, warmup)


def _params():
  config = tu.tiny_config().model
  config.head = "seqTransf"
  config.head_heads = 2
  model = dual_encoder.DualEncoder(config)
  return config, train.init_params(model, 0)


def test_decay_mask_excludes_biases_norms_embeddings_and_logit_scale():
  _, params = _params()
  decayed = set(ts.leaf_paths(params, ts.is_decayed))
  not_decayed = set(ts.leaf_paths(params, lambda p, x: not ts.is_decayed(p, x)))
  assert decayed and not_decayed
  for path in decayed:
    assert path.endswith("kernel") or path.endswith("proj") or "projection" in path, path
  for path in not_decayed:
    assert (path.endswith("bias") or path.endswith("scale") or "embed" in path
            or path == "logit_scale"), path
  assert "logit_scale" in not_decayed
  assert any("token_embedding" in p for p in not_decayed)
  assert any("ln_final" in p for p in not_decayed)


def test_two_learning_rates_and_frozen_weights():
  params = {"text": {"w": jnp.ones((2, 3)), "b": jnp.ones(3)},
            "head": {"w": jnp.ones((3, 3))},
            "frozen": {"w": jnp.ones((3, 2))}}
  labels = {"text": {"w": "clip", "b": "clip"}, "head": {"w": "new"}, "frozen": {"w": "frozen"}}
  opt = _opt_config(warmup_fraction=0.0, weight_decay=0.0)
  tx, schedules = ts.make_optimizer(opt, labels, total_steps=100)
  grads = jax.tree.map(lambda p: 0.01 * jnp.ones_like(p), params)
  # A huge frozen gradient must neither move its weight nor shrink the others by clipping.
  grads["frozen"]["w"] = 1e6 * jnp.ones((3, 2))
  updates, _ = tx.update(grads, tx.init(params), params)
  # Adam's first step moves every weight by lr * sign(grad) (up to eps).
  np.testing.assert_allclose(updates["head"]["w"], -1e-4, rtol=1e-3)
  np.testing.assert_allclose(updates["text"]["w"], -1e-7, rtol=1e-3)
  np.testing.assert_allclose(updates["text"]["b"], -1e-7, rtol=1e-3)
  np.testing.assert_array_equal(updates["frozen"]["w"], 0.0)
  assert float(schedules["new"](0)) == pytest.approx(1e-4)
  assert float(schedules["clip"](0)) == pytest.approx(1e-7)


def test_weight_decay_follows_the_mask():
  params = {"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.ones(2)}}
  labels = {"dense": {"kernel": "new", "bias": "new"}}
  opt = _opt_config(warmup_fraction=0.0, weight_decay=0.2, lr=0.1)
  tx, _ = ts.make_optimizer(opt, labels, total_steps=100)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  np.testing.assert_allclose(updates["dense"]["kernel"], -0.1 * 0.2, rtol=1e-6)
  np.testing.assert_array_equal(updates["dense"]["bias"], 0.0)


def test_unknown_label_is_rejected():
  with pytest.raises(errors.UserError, match="unknown parameter labels"):
    ts.make_optimizer(_opt_config(), {"w": "pretrained"}, total_steps=10)


def test_logit_scale_is_clamped_at_ln_100():
  params = {"logit_scale": jnp.asarray(5.0), "head": {"logit_scale_bias": jnp.asarray(9.0)}}
  out = ts.clamp_logit_scale(params)
  assert float(out["logit_scale"]) == pytest.approx(math.log(100.0))
  assert float(out["head"]["logit_scale_bias"]) == 9.0
  assert float(ts.clamp_logit_scale({"logit_scale": jnp.asarray(2.0)})["logit_scale"]) == 2.0


def test_pretrained_runs_train_clip_weights_at_the_small_rate():
  config, params = _params()
  labels = dual_encoder.param_labels(params, config, pretrained=True)
  flat = dict(zip(ts.leaf_paths(params, lambda p, x: True), jax.tree.leaves(labels)))
  assert flat["logit_scale"] == "clip"
  assert all(v == "clip" for k, v in flat.items() if k.startswith("text/"))
  assert all(v == "new" for k, v in flat.items() if k.startswith("head/"))
