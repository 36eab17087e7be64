"""Tests for ncl_jax.metrics: hand-made ties and protocols, a brute-force reference, real data."""

import numpy as np
import pytest

from ncl_jax import metrics

TITLES = "msrvtt_cap4video/msrvtt_titles_matrix.npy"


def _rounded(result):
  return {"R@1": round(result["R@1"], 1), "R@5": round(result["R@5"], 1),
          "R@10": round(result["R@10"], 1), "MdR": result["MdR"], "MnR": round(result["MnR"], 2)}


# ---------------------------------------------------------------------------------------------
# Hand-computed cases.

def test_tie_policies_by_hand():
  scores = np.array([[0.5, 0.5, 0.1],   # ground truth 0 ties candidate 1
                     [0.2, 0.3, 0.3],   # ground truth 1 ties candidate 2
                     [0.9, 0.9, 0.9]])  # everything ties
  np.testing.assert_array_equal(metrics.t2v_ranks(scores, tie="optimistic"), [1, 1, 1])
  np.testing.assert_array_equal(metrics.t2v_ranks(scores, tie="pessimistic"), [2, 2, 3])
  np.testing.assert_array_equal(metrics.t2v_ranks(scores, tie="mean"), [1.5, 1.5, 2])
  # Default is pessimistic; ties never change the number of queries.
  result = metrics.t2v_metrics(scores)
  assert result == pytest.approx(
      {"R@1": 0.0, "R@5": 100.0, "R@10": 100.0, "MdR": 2.0, "MnR": 7 / 3})
  assert metrics.t2v_metrics(scores, tie="optimistic")["R@1"] == 100.0


# Five captions of three videos (captions 0, 1 -> video 0; 2 -> video 1; 3, 4 -> video 2).
_MAP = np.array([0, 0, 1, 2, 2])
_SIMS = np.array([[0.90, 0.60, 0.80],
                  [0.20, 0.30, 0.70],
                  [0.40, 0.60, 0.50],
                  [0.95, 0.20, 0.85],
                  [0.92, 0.90, 0.30]])


def test_multi_caption_t2v_by_hand():
  for tie in metrics.TIE_POLICIES:  # no text query has a tie
    np.testing.assert_array_equal(metrics.t2v_ranks(_SIMS, _MAP, tie=tie), [1, 3, 1, 2, 3])


def test_multi_caption_v2t_strict_by_hand():
  # Video 0: best own caption 0.90; captions 3 (0.95) and 4 (0.92) of video 2 are above -> 3.
  # Video 1: own caption 0.60; caption 4 (0.90) above, caption 0 ties -> 2 or 3.
  # Video 2: best own caption 0.85; nobody else above -> 1.
  scores = _SIMS.T
  np.testing.assert_array_equal(
      metrics.v2t_ranks(scores, _MAP, tie="optimistic"), [3, 2, 1])
  np.testing.assert_array_equal(metrics.v2t_ranks(scores, _MAP), [3, 3, 1])
  np.testing.assert_array_equal(metrics.v2t_ranks(scores, _MAP, tie="mean"), [3, 2.5, 1])
  assert metrics.v2t_metrics(scores, _MAP) == pytest.approx(
      {"R@1": 100 / 3, "R@5": 100.0, "R@10": 100.0, "MdR": 3.0, "MnR": 7 / 3})


def test_multi_caption_v2t_group_max_by_hand():
  # Group scores (best caption per video) in column 0: [0.90, 0.40, 0.95] -> rank 2 (strict: 3,
  # since video 2's two captions both count). Column 1: [0.60, 0.60, 0.90] -> 2 or 3 with the tie.
  scores = _SIMS.T
  np.testing.assert_array_equal(
      metrics.v2t_ranks(scores, _MAP, protocol="group_max", tie="optimistic"), [2, 2, 1])
  np.testing.assert_array_equal(
      metrics.v2t_ranks(scores, _MAP, protocol="group_max"), [2, 3, 1])


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="tie"):
    metrics.t2v_ranks(_SIMS, _MAP, tie="random")
  with pytest.raises(ValueError, match="protocol"):
    metrics.v2t_ranks(_SIMS.T, _MAP, protocol="lenient")
  with pytest.raises(ValueError, match="square"):
    metrics.t2v_ranks(_SIMS)
  with pytest.raises(ValueError, match="NaN"):
    metrics.t2v_ranks(np.array([[1.0, np.nan], [0.0, 1.0]]))
  with pytest.raises(ValueError, match="no valid caption"):
    metrics.v2t_ranks(np.zeros((3, 2)), np.array([0, 0]))


# ---------------------------------------------------------------------------------------------
# Brute force: the definitions written as plain loops, on integer scores full of ties.

def _reference_rank(gt_score, other_scores, tie):
  higher = sum(1 for x in other_scores if x > gt_score)
  higher_eq = sum(1 for x in other_scores if x >= gt_score)
  return {"optimistic": 1 + higher, "pessimistic": 1 + higher_eq,
          "mean": 1 + (higher + higher_eq) / 2}[tie]


def _reference_t2v(sims, mapping, tie):
  return [_reference_rank(sims[i, mapping[i]],
                          [sims[i, j] for j in range(sims.shape[1]) if j != mapping[i]], tie)
          for i in range(sims.shape[0])]


def _reference_v2t(sims, mapping, protocol, tie):
  ranks = []
  for v in range(sims.shape[1]):
    own = [i for i in range(len(mapping)) if mapping[i] == v]
    if protocol == "strict":
      best = max(sims[i, v] for i in own)
      others = [sims[i, v] for i in range(len(mapping)) if mapping[i] != v]
    else:
      groups = {w: max(sims[i, v] for i in range(len(mapping)) if mapping[i] == w)
                for w in set(mapping.tolist())}
      best = groups.pop(v)
      others = list(groups.values())
    ranks.append(_reference_rank(best, others, tie))
  return ranks


@pytest.mark.parametrize("seed", range(4))
def test_ranks_match_brute_force(seed):
  rng = np.random.default_rng(seed)
  n_videos = 9
  mapping = np.concatenate([np.arange(n_videos), rng.integers(0, n_videos, 14)])
  sims = rng.integers(0, 4, (len(mapping), n_videos)).astype(np.float32)  # many ties
  for tie in metrics.TIE_POLICIES:
    np.testing.assert_array_equal(metrics.t2v_ranks(sims, mapping, tie=tie, chunk_rows=5),
                                  _reference_t2v(sims, mapping, tie))
    for protocol in metrics.V2T_PROTOCOLS:
      np.testing.assert_array_equal(
          metrics.v2t_ranks(sims.T, mapping, protocol=protocol, tie=tie, chunk_rows=4),
          _reference_v2t(sims, mapping, protocol, tie))
  strict = metrics.v2t_ranks(sims.T, mapping, tie="optimistic")
  lenient = metrics.v2t_ranks(sims.T, mapping, protocol="group_max", tie="optimistic")
  assert np.all(lenient <= strict)
  np.testing.assert_array_equal(lenient == 1, strict == 1)


def test_masks_equal_slicing(rng):
  n_texts, n_videos = 30, 12
  mapping = np.concatenate([np.arange(n_videos), rng.integers(0, n_videos, n_texts - n_videos)])
  sims = rng.standard_normal((n_texts, n_videos)).astype(np.float32)
  # Pad with 5 garbage text rows (mapped to video 0) and 3 garbage video columns that score high.
  padded = np.full((n_texts + 5, n_videos + 3), 9.0, np.float32)
  padded[:n_texts, :n_videos] = sims
  padded_map = np.concatenate([mapping, np.zeros(5, int)])
  text_mask = np.arange(n_texts + 5) < n_texts
  video_mask = np.arange(n_videos + 3) < n_videos
  for protocol in metrics.V2T_PROTOCOLS:
    got = metrics.retrieval_metrics(padded, padded_map, protocol=protocol, text_mask=text_mask,
                                    video_mask=video_mask)
    assert got == metrics.retrieval_metrics(sims, mapping, protocol=protocol)


def test_metrics_from_ranks_percent_and_median():
  result = metrics.metrics_from_ranks([1, 2, 6, 11, 3])
  assert result == pytest.approx({"R@1": 20.0, "R@5": 60.0, "R@10": 80.0, "MdR": 3.0, "MnR": 4.6})
  assert tuple(result) == metrics.METRIC_NAMES


# ---------------------------------------------------------------------------------------------
# Real data: Cap4Video's MSR-VTT 1k-A titles matrix and the table in its README.

def test_real_matrix_matches_readme_table(shared_data_dir):
  sims = np.load(shared_data_dir / TITLES)
  optimistic = metrics.retrieval_metrics(sims, tie="optimistic")
  assert _rounded(optimistic["t2v"]) == {"R@1": 29.7, "R@5": 55.8, "R@10": 66.6, "MdR": 4.0,
                                         "MnR": 26.74}
  assert _rounded(optimistic["v2t"]) == {"R@1": 28.4, "R@5": 54.9, "R@10": 66.8, "MdR": 4.0,
                                         "MnR": 27.09}
  # Pessimistic (the default): t2v has no ground-truth ties, so it is unchanged; the 9 tied
  # v2t queries each lose a rank, 3 of them their rank 1.
  pessimistic = metrics.retrieval_metrics(sims)
  assert pessimistic["t2v"] == optimistic["t2v"]
  assert _rounded(pessimistic["v2t"]) == {"R@1": 28.1, "R@5": 54.9, "R@10": 66.8, "MdR": 4.0,
                                          "MnR": 27.1}
  diff = metrics.v2t_ranks(sims.T) - metrics.v2t_ranks(sims.T, tie="optimistic")
  assert np.count_nonzero(diff) == 9 and np.all(diff >= 0)
  # One caption per video: both v2t protocols agree.
  assert metrics.v2t_metrics(sims.T, protocol="group_max") == pessimistic["v2t"]
