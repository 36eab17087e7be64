"""Evaluation: padded encoding over devices, plain and NCL-normalized metrics, normalization error.

References are independent: metrics of hand-built matrices, a float64 numpy Sinkhorn for the
NCL biases, and the normalization error computed with numpy softmaxes.
"""

import jax
import numpy as np
import pytest

from ncl_jax import errors
from ncl_jax import evaluate
from ncl_jax import metrics as metrics_lib
from ncl_jax import sharding
from ncl_jax import train
from ncl_jax.errors import UserError

import train_testutils as tu


def _eval_config(**overrides):
  config = tu.load_config("synthetic").eval
  for k, v in overrides.items():
    config[k] = v
  return config


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(z, axis=-1):
  z = z - z.max(axis=axis, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=axis, keepdims=True)


def _numpy_sinkhorn_biases(bank_logits, col_marginals, iterations=5000):
  """Column potentials g with softmax rows of (L + g) summing to col_marginals, float64."""
  logits = np.asarray(bank_logits, np.float64)
  b = np.asarray(col_marginals, np.float64)
  b = b * logits.shape[0] / b.sum()
  g = np.zeros(logits.shape[1])
  for _ in range(iterations):
    colsum = _softmax(logits + g[None, :], axis=1).sum(axis=0)
    g = g + np.log(b) - np.log(colsum)
  return g - g.mean()


def test_perfect_embeddings_give_perfect_retrieval():
  rng = np.random.default_rng(0)
  video = _unit(rng.normal(size=(12, 8)))
  text = video.copy()
  bank = _unit(rng.normal(size=(40, 8)))
  out = evaluate.retrieval_results(text, video, np.arange(12), logit_scale=100.0,
                                   text_bank=bank, video_bank=bank, eval_config=_eval_config())
  for mode in ("plain", "ncl"):
    for direction in ("t2v", "v2t"):
      assert out[mode][direction]["R@1"] == 100.0
      assert out[mode][direction]["MdR"] == 1.0
  assert out["num_texts"] == out["num_videos"] == 12
  assert out["bank_size"] == {"t2v": 40, "v2t": 40}


def test_ncl_scores_use_the_training_bank_and_the_error_matches_numpy(tmp_path):
  rng = np.random.default_rng(1)
  n, d, scale = 30, 6, 20.0
  hub = _unit(rng.normal(size=d))

  def draw(count):  # pairs where a few videos lie near a common direction: hubs
    video = _unit(rng.normal(size=(count, d)) + 1.5 * hub * (rng.random(count) < 0.1)[:, None])
    return _unit(video + 0.8 * rng.normal(size=(count, d))), video

  text, video = draw(n)
  text_bank, video_bank = draw(60)  # "training" queries from the same distribution
  config = _eval_config(sinkhorn_tol=1e-7, sinkhorn_max_iterations=20000)
  out = evaluate.retrieval_results(text, video, np.arange(n), logit_scale=scale,
                                   text_bank=text_bank, video_bank=video_bank,
                                   eval_config=config, plot_prefix=str(tmp_path / "h"))
  sims = text @ video.T

  # Plain: the metrics module on the raw similarities.
  assert out["plain"]["t2v"] == metrics_lib.t2v_metrics(sims, np.arange(n))
  assert out["plain"]["v2t"] == metrics_lib.v2t_metrics(sims.T, np.arange(n))
  # NCL: sims * scale + biases from Sinkhorn on bank x test candidates (numpy, float64).
  g_t2v = _numpy_sinkhorn_biases(scale * text_bank @ video.T, np.ones(n))
  g_v2t = _numpy_sinkhorn_biases(scale * video_bank @ text.T, np.ones(n))
  assert out["ncl"]["t2v"] == metrics_lib.t2v_metrics(scale * sims + g_t2v, np.arange(n))
  assert out["ncl"]["v2t"] == metrics_lib.v2t_metrics(scale * sims.T + g_v2t, np.arange(n))

  # Normalization error: mean |summed test retrieval probability - 1| over candidates,
  # averaged over both directions.
  def error(logits):
    return np.abs(_softmax(logits, axis=1).sum(axis=0) - 1.0).mean()

  plain = 0.5 * (error(scale * sims) + error(scale * sims.T))
  ncl = 0.5 * (error(scale * sims + g_t2v) + error(scale * sims.T + g_v2t))
  assert out["normalization_error"]["plain"] == pytest.approx(plain, rel=1e-4)
  assert out["normalization_error"]["ncl"] == pytest.approx(ncl, rel=1e-3)
  assert (tmp_path / "h_t2v.png").stat().st_size > 0 and (tmp_path / "h_v2t.png").exists()
  # A second evaluation keeps the existing figures (plots never overwrite).
  evaluate.retrieval_results(text, video, np.arange(n), logit_scale=scale, text_bank=text_bank,
                             video_bank=video_bank, eval_config=config,
                             plot_prefix=str(tmp_path / "h"))
  # With the test queries themselves as the bank, NCL balances the test scores exactly.
  own = evaluate.retrieval_results(text, video, np.arange(n), logit_scale=scale, text_bank=text,
                                   video_bank=video, eval_config=config)
  assert own["normalization_error"]["ncl"] < 1e-4 < plain


def test_multi_caption_shares_follow_caption_counts():
  rng = np.random.default_rng(2)
  video = _unit(rng.normal(size=(5, 4)))
  caption_to_video = np.array([0, 0, 0, 1, 2, 2, 3, 4])
  text = _unit(video[caption_to_video] + 0.1 * rng.normal(size=(8, 4)))
  out = evaluate.retrieval_results(text, video, caption_to_video, logit_scale=50.0,
                                   text_bank=text, video_bank=video, eval_config=_eval_config())
  detail = out["normalization_error_detail"]["plain"]["t2v"]
  probs = _softmax(50.0 * text @ video.T, axis=1).sum(axis=0)
  expected = np.bincount(caption_to_video)
  assert detail["mae"] == pytest.approx(np.abs(probs - expected).mean(), rel=1e-5)
  assert detail["relative_mae"] == pytest.approx(np.abs(probs / expected - 1).mean(), rel=1e-5)
  assert detail["relative_max"] == pytest.approx(np.abs(probs / expected - 1).max(), rel=1e-5)
  # The headline is the relative error averaged over both directions: v2t shares are
  # 1/#captions per caption, t2v shares the caption counts.
  v2t_probs = _softmax(50.0 * video @ text.T, axis=1).sum(axis=0)
  v2t_expected = 1.0 / expected[caption_to_video]
  headline = 0.5 * (np.abs(probs / expected - 1).mean() +
                    np.abs(v2t_probs / v2t_expected - 1).mean())
  assert out["normalization_error"]["plain"] == pytest.approx(headline, rel=1e-5)
  assert out["num_texts"] == 8 and out["num_videos"] == 5


@pytest.mark.parametrize("key, mode", [("plain/t2v/R@1", "max"), ("ncl/v2t/MnR", "min"),
                                       ("normalization_error/ncl", "min")])
def test_select_metric_direction(key, mode):
  assert evaluate.select_metric_mode(key) == mode


def test_select_metric_rejects_unknown_keys():
  with pytest.raises(UserError, match="normalization_error/<mode>"):
    evaluate.select_metric_mode("ncl/t2v/R@2")


def test_empty_bank_leaves_scores_plain():
  rng = np.random.default_rng(3)
  video = _unit(rng.normal(size=(6, 4)))
  text = _unit(video + 0.3 * rng.normal(size=(6, 4)))
  empty = np.zeros((0, 4), np.float32)
  out = evaluate.retrieval_results(text, video, np.arange(6), logit_scale=10.0, text_bank=empty,
                                   video_bank=empty, eval_config=_eval_config())
  assert out["ncl"] == out["plain"]
  assert out["bank_size"] == {"t2v": 0, "v2t": 0}


def test_encoding_is_padded_over_devices_and_drops_nothing():
  config = tu.tiny_config()
  with tu.fast_compile():
    mesh = sharding.make_mesh()
    run = train.Run(config, mesh)
    params = jax.device_get(run.initial_state().params)
    data = run.dataset.eval_data("test")  # 28 captions and videos in batches of 16: 12 padded
    text, video = evaluate.encode_split(run.encoders, params, data, mesh, batch_size=16)
    assert text.shape == (28, 16) and video.shape == (28, 16)
    # The same rows encoded in one unpadded, unsharded call.
    tokens = np.concatenate([b["text_tokens"][b["mask"]] for b in data.text_batches(28)])
    videos = next(data.video_batches(28))
    ref_text = run.model.apply({"params": params}, tokens, method=run.model.encode_text)
    ref_video = run.model.apply({"params": params}, videos["video"], videos["frame_mask"],
                                method=run.model.encode_video)
  np.testing.assert_allclose(text, ref_text, atol=1e-5)
  np.testing.assert_allclose(video, ref_video, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)


def test_bank_positions_are_the_batches_of_the_last_steps():
  assert list(evaluate.bank_positions(0, 16, 32)) == []      # nothing trained yet: empty bank
  assert list(evaluate.bank_positions(1, 16, 32)) == [0]     # step 1 trained on position 0
  assert list(evaluate.bank_positions(5, 16, 32)) == [3, 4]  # the queue: the last 2 batches
  assert list(evaluate.bank_positions(5, 16, 40)) == [2, 3, 4]  # a partial batch: one more
  assert list(evaluate.bank_positions(5, 16, 1000)) == [0, 1, 2, 3, 4]  # capped by the run


@pytest.mark.parametrize("bank, size", [("queues", 0), ("queue", -1)])
def test_bad_bank_settings_are_user_errors(bank, size):
  with pytest.raises(errors.UserError, match="config.eval.bank"):
    evaluate.check_bank(bank, size)


def test_reencoded_bank_holds_the_queued_pairs_embedded_with_the_evaluated_params():
  # Learning rate 0: the parameters never change, so re-encoding the queued training pairs
  # must give back exactly the rows the train steps wrote into the queues.
  config = tu.tiny_config("ncl", optimizer__lr=0.0, optimizer__weight_decay=0.0)
  with tu.fast_compile():
    run = train.Run(config, sharding.make_mesh(jax.devices()[:1]))  # 1 device compiles faster
    state, batches = run.initial_state(), run.train_iterator()
    for _ in range(3):  # batch 16, queue 32: the queues hold steps 2 and 3
      state, _ = run.train_step(state, sharding.host_batch_to_global(next(batches), run.mesh))
    queue_text, queue_video = run.bank(state)
    config.eval.bank = "reencoded"
    text, video = run.bank(state)
    assert text.shape == video.shape == queue_text.shape == (32, 16)
    # Rows as (text, video) pairs, sorted, since the queue's slot order differs.
    pairs = lambda t, v: np.round(np.concatenate([t, v], axis=1), 4)
    by_rows = lambda x: x[np.lexsort(x.T[::-1])]
    np.testing.assert_allclose(by_rows(pairs(text, video)),
                               by_rows(pairs(queue_text, queue_video)), atol=2e-4)
    config.eval.bank_size = 40  # reaches one batch further back, keeps the newest 40 pairs
    more_text, _ = run.bank(state)
    assert more_text.shape == (40, 16)
    np.testing.assert_allclose(more_text[-32:], text, atol=1e-6)
