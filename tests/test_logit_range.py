"""The usable temperature range: the float32 failures at its ends happen, and inside it they do not."""

import numpy as np
import pytest

from ncl_jax import logit_range
from ncl_jax.errors import UserError


def test_range_of_a_hand_computed_matrix():
  scores = np.array([[0.5, -0.25], [0.125, 0.0]], np.float32)
  max_abs, spread = logit_range.score_range(scores, None, scores[:1])
  assert (max_abs, spread) == (0.5, 0.75)  # the first row alone spreads over 0.75 too
  assert logit_range.usable_temperatures(max_abs, spread) == (0.5 / 2 ** 13, 0.75 * 2 ** 13)


def _ranks_survive(scores, temperature, bias):
  """Whether ``scores / T + bias`` in float32 keeps the scores' order (no new ties)."""
  logits = np.float32(scores) / np.float32(temperature) + np.float32(bias)
  return len(np.unique(logits)) == len(np.unique(scores))


def test_beyond_the_upper_end_every_score_ties_next_to_a_log_n_bias():
  rng = np.random.default_rng(0)
  scores = np.sort(rng.uniform(-0.3, 0.4, 64)).astype(np.float32)
  bias = np.log(1000.0)  # the size of a Sinkhorn bias over 1,000 candidates
  _, highest = logit_range.usable_temperatures(*logit_range.score_range(scores[None]))
  spread = float(scores.max() - scores.min())
  all_tied = spread / (np.finfo(np.float32).eps * bias)  # the spread is below one float32 step
  assert highest < all_tied
  assert len(np.unique(np.float32(scores) / np.float32(4 * all_tied) + np.float32(bias))) == 1
  # Inside the range the 64 scores keep most of their order (the check refuses before all ties).
  inside = np.float32(scores) / np.float32(highest / 8) + np.float32(bias)
  assert len(np.unique(inside)) >= 32


def test_below_the_lower_end_the_biases_no_longer_move_the_largest_logit():
  scores = np.array([0.9, -0.7, 0.2], np.float32)
  lowest, _ = logit_range.usable_temperatures(*logit_range.score_range(scores[None]))
  tiny = 0.9 / 2.0 ** 25  # largest logit 2^25: float32 spacing 4 there
  assert tiny < lowest
  logit = np.float32(0.9) / np.float32(tiny)
  assert logit + np.float32(1.0) == logit  # a bias step of 1 (a factor e in mass) vanishes
  assert _ranks_survive(scores, lowest, 1.0)
  edge = np.float32(0.9) / np.float32(lowest)
  assert edge + np.float32(2.0 ** -9) != edge  # at the lower end, 1/512 still registers


@pytest.mark.parametrize("temperature, message", [
    (1e-30, r"1e-30 is too small .* \|score\| 0\.9 .* in \[0\.00011, 1\.31e\+04\]"),
    (1e30, r"1e\+30 is too large .* spread over 1\.6, .* tie"),
])
def test_refusals_name_the_usable_range(temperature, message):
  with pytest.raises(UserError, match=message):
    logit_range.check_temperature(temperature, 0.9, 1.6)
  logit_range.check_temperature(0.01, 0.9, 1.6)  # CLIP's temperature is inside


def test_constant_scores_and_hopeless_magnitudes_are_refused_at_any_temperature():
  with pytest.raises(UserError, match="all equal"):
    logit_range.check_temperature(0.01, 0.3, 0.0)
  with pytest.raises(UserError, match="subtract a constant"):
    logit_range.check_temperature(1.0, 1e6, 1e-3)


def test_embedding_range_bounds_magnitude_by_norms_and_samples_the_spread():
  rng = np.random.default_rng(1)
  queries = rng.standard_normal((300, 8)).astype(np.float32)
  items = rng.standard_normal((50, 8)).astype(np.float32)
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  items /= np.linalg.norm(items, axis=1, keepdims=True)
  bound, spread = logit_range.embedding_score_range(queries, items, 1.01, sample_queries=40)
  full = queries @ items.T
  assert bound == pytest.approx(1.01 ** 2) and bound >= np.abs(full).max()
  assert 0.5 * (full.max() - full.min()) < spread <= full.max() - full.min() + 1e-6
