"""Retrieval metrics (R@1, R@5, R@10, MdR, MnR) with explicit tie policies and protocols.

Every function takes a score matrix whose **rows are queries and columns are candidates**:

* text-to-video (t2v): ``scores`` is [n_texts, n_videos]; text ``i`` belongs to video
  ``text_to_video[i]`` (the identity when each video has exactly one caption).
* video-to-text (v2t): ``scores`` is [n_videos, n_texts] (for raw similarities, the transpose
  of the t2v matrix); video ``j``'s ground truth is every caption ``i`` with
  ``text_to_video[i] == j``.

Ranks are 1-based. A query's ground-truth score is compared with the scores of the
*other* candidates (never with itself, never with other ground-truth captions of the same video):

* ``"optimistic"``: rank = 1 + #(other candidates scoring strictly higher).
* ``"pessimistic"`` (default): rank = 1 + #(other candidates scoring higher or equal), so a
  normalizer that collapses scores into ties cannot gain from them.
* ``"mean"``: the average of the two (ties share the rank they span; may be fractional).

Ties change a query's rank, never the number of queries: each query gets exactly one rank
(unlike CLIP4Clip's ``compute_metrics``, whose tied entries inflate the denominator).

Multi-caption video-to-text has two protocols, named explicitly:

* ``"strict"`` (default; VSE++/Collaborative Experts): all captions are candidates and the rank is
  that of the best-ranked ground-truth caption, i.e. 1 + #(non-ground-truth captions scoring
  above the video's best ground-truth caption).
* ``"group_max"`` (CLIP4Clip's lenient protocol): each video's caption group is scored by its best
  caption and the query video's own group is ranked among the groups. Its ranks are never
  larger than ``"strict"`` ranks; R@1 is the same.

With one caption per video both protocols coincide. Masks remove padded queries or candidates.
Scores are processed in row chunks, so a 60,000 x 3,000 matrix needs only a chunk of
temporary memory beyond itself. NaN scores are rejected (a NaN never compares, which would
silently make a rank optimistic).
"""

from __future__ import annotations

import numpy as np

TIE_POLICIES = ("optimistic", "pessimistic", "mean")
V2T_PROTOCOLS = ("strict", "group_max")
METRIC_NAMES = ("R@1", "R@5", "R@10", "MdR", "MnR")

# Row chunks hold about this many scores (64 MiB of float32 temporaries per comparison).
_CHUNK_ELEMENTS = 1 << 24


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _row_chunks(n_rows: int, n_cols: int, chunk_rows: int | None):
  step = chunk_rows or max(1, _CHUNK_ELEMENTS // max(n_cols, 1))
  for start in range(0, n_rows, step):
    yield slice(start, min(start + step, n_rows))


def _as_mask(mask, n: int, what: str) -> np.ndarray:
  if mask is None:
    return np.ones(n, bool)
  mask = np.asarray(mask, bool)
  if mask.shape != (n,):
    raise ValueError(f"{what} must have shape ({n},), got {mask.shape}")
  return mask


def _check_scores(scores) -> np.ndarray:
  scores = np.asarray(scores)
  if scores.ndim != 2:
    raise ValueError(f"scores must be 2-D [n_queries, n_candidates], got shape {scores.shape}")
  return scores


def _check_map(text_to_video, n_texts: int, n_videos: int) -> np.ndarray:
  if text_to_video is None:
    if n_texts != n_videos:
      raise ValueError(
          f"without text_to_video the matrix must be square (ground truth on the diagonal), got "
          f"{n_texts} texts x {n_videos} videos")
    return np.arange(n_texts)
  text_to_video = np.asarray(text_to_video)
  if text_to_video.shape != (n_texts,) or not np.issubdtype(text_to_video.dtype, np.integer):
    raise ValueError(
        f"text_to_video must be an integer array of shape ({n_texts},), got "
        f"{text_to_video.dtype} {text_to_video.shape}")
  if n_texts and (text_to_video.min() < 0 or text_to_video.max() >= n_videos):
    raise ValueError(f"text_to_video entries must lie in [0, {n_videos})")
  return text_to_video.astype(np.int64)


def _combine(n_higher: np.ndarray, n_higher_or_equal: np.ndarray, tie: str) -> np.ndarray:
  """1-based ranks from counts of other candidates above / at-or-above the ground truth."""
  if tie == "optimistic":
    return 1.0 + n_higher
  if tie == "pessimistic":
    return 1.0 + n_higher_or_equal
  return 1.0 + 0.5 * (n_higher + n_higher_or_equal)


def _count_above(block: np.ndarray, reference: np.ndarray, others: np.ndarray):
  """Counts, per row, the ``others`` entries of ``block`` above / at-or-above ``reference``.

  Args:
    block: [r, m] scores.
    reference: [r] the ground-truth score of each row.
    others: [r, m] or [m] bool, the candidates that compete with the ground truth.

  Returns:
    Two [r] int64 arrays: #(> reference) and #(>= reference) among ``others``.
  """
  if np.isnan(block).any():
    raise ValueError("scores contain NaN; a NaN never compares, so ranks would be wrong")
  ref = reference[:, None]
  higher = np.count_nonzero((block > ref) & others, axis=1)
  higher_or_equal = np.count_nonzero((block >= ref) & others, axis=1)
  return higher, higher_or_equal


def t2v_ranks(scores, text_to_video=None, *, tie: str = "pessimistic", text_mask=None,
              video_mask=None, chunk_rows: int | None = None) -> np.ndarray:
  """1-based text-to-video ranks of each (unmasked) text query's ground-truth video.

  Args:
    scores: [n_texts, n_videos] scores (higher is better); numpy, memmap or JAX array.
    text_to_video: [n_texts] int, the video of each text; default: the diagonal.
    tie: one of :data:`TIE_POLICIES`.
    text_mask: [n_texts] bool, False drops a (padded) query.
    video_mask: [n_videos] bool, False drops a (padded) candidate.
    chunk_rows: rows per chunk (default: about 16M scores per chunk).

  Returns:
    [n_valid_texts] float64 ranks, in query order.
  """
  _check_choice("tie", tie, TIE_POLICIES)
  scores = _check_scores(scores)
  n_texts, n_videos = scores.shape
  t2v = _check_map(text_to_video, n_texts, n_videos)
  text_mask = _as_mask(text_mask, n_texts, "text_mask")
  video_mask = _as_mask(video_mask, n_videos, "video_mask")
  if not np.all(video_mask[t2v[text_mask]]):
    raise ValueError("a valid text query's ground-truth video is masked out")
  ranks = []
  for rows in _row_chunks(n_texts, n_videos, chunk_rows):
    keep = text_mask[rows]
    block = np.asarray(scores[rows], np.float32)[keep]
    gt = t2v[rows][keep]
    others = video_mask[None, :] & (np.arange(n_videos)[None, :] != gt[:, None])
    higher, higher_eq = _count_above(block, block[np.arange(len(gt)), gt], others)
    ranks.append(_combine(higher, higher_eq, tie))
  return np.concatenate(ranks) if ranks else np.zeros(0)


def v2t_ranks(scores, text_to_video=None, *, protocol: str = "strict", tie: str = "pessimistic",
              text_mask=None, video_mask=None, chunk_rows: int | None = None) -> np.ndarray:
  """1-based video-to-text ranks of each (unmasked) video query.

  Args:
    scores: [n_videos, n_texts] scores, rows are video queries (``sims.T`` for raw similarities).
    text_to_video: [n_texts] int, the video of each text; default: the diagonal.
    protocol: ``"strict"`` (all captions ranked; the best ground-truth caption counts) or
      ``"group_max"`` (CLIP4Clip: captions grouped by video, each group scored by its maximum).
    tie: one of :data:`TIE_POLICIES`.
    text_mask: [n_texts] bool, False drops a (padded) caption candidate.
    video_mask: [n_videos] bool, False drops a (padded) video query (and, for ``group_max``,
      its caption group).
    chunk_rows: video rows per chunk.

  Returns:
    [n_valid_videos] float64 ranks, in query order.

  Raises:
    ValueError: a valid video has no valid caption (its rank would be undefined).
  """
  _check_choice("tie", tie, TIE_POLICIES)
  _check_choice("protocol", protocol, V2T_PROTOCOLS)
  scores = _check_scores(scores)
  n_videos, n_texts = scores.shape
  t2v = _check_map(text_to_video, n_texts, n_videos)
  text_mask = _as_mask(text_mask, n_texts, "text_mask")
  video_mask = _as_mask(video_mask, n_videos, "video_mask")
  n_captions = np.bincount(t2v[text_mask], minlength=n_videos)
  if np.any(video_mask & (n_captions == 0)):
    missing = np.flatnonzero(video_mask & (n_captions == 0))[:5]
    raise ValueError(f"videos {missing.tolist()} have no valid caption; mask them out")
  if protocol == "group_max":
    return _v2t_group_max(scores, t2v, tie, text_mask, video_mask, chunk_rows)
  ranks = []
  for rows in _row_chunks(n_videos, n_texts, chunk_rows):
    keep = video_mask[rows]
    block = np.asarray(scores[rows], np.float32)[keep]
    video_ids = np.arange(n_videos)[rows][keep]
    is_gt = (t2v[None, :] == video_ids[:, None]) & text_mask[None, :]
    best_gt = np.max(np.where(is_gt, block, -np.inf), axis=1)
    others = ~is_gt & text_mask[None, :]
    higher, higher_eq = _count_above(block, best_gt, others)
    ranks.append(_combine(higher, higher_eq, tie))
  return np.concatenate(ranks) if ranks else np.zeros(0)


def _v2t_group_max(scores, t2v, tie, text_mask, video_mask, chunk_rows) -> np.ndarray:
  """CLIP4Clip's lenient v2t protocol: rank caption groups scored by their best caption."""
  n_videos, n_texts = scores.shape
  # Sorting the valid captions by video makes every group a contiguous run for reduceat.
  valid = np.flatnonzero(text_mask & video_mask[t2v])
  order = valid[np.argsort(t2v[valid], kind="stable")]
  groups, starts = np.unique(t2v[order], return_index=True)
  ranks = []
  for rows in _row_chunks(n_videos, n_texts, chunk_rows):
    keep = video_mask[rows]
    block = np.asarray(scores[rows], np.float32)[keep]
    if np.isnan(block).any():
      raise ValueError("scores contain NaN; a NaN never compares, so ranks would be wrong")
    group_scores = np.full((block.shape[0], n_videos), -np.inf, np.float32)
    if len(order):
      group_scores[:, groups] = np.maximum.reduceat(block[:, order], starts, axis=1)
    video_ids = np.arange(n_videos)[rows][keep]
    own = group_scores[np.arange(len(video_ids)), video_ids]
    others = np.zeros((len(video_ids), n_videos), bool)
    others[:, groups] = True
    others[np.arange(len(video_ids)), video_ids] = False
    higher, higher_eq = _count_above(group_scores, own, others)
    ranks.append(_combine(higher, higher_eq, tie))
  return np.concatenate(ranks) if ranks else np.zeros(0)


def metrics_from_ranks(ranks) -> dict[str, float]:
  """``{"R@1", "R@5", "R@10", "MdR", "MnR"}`` from 1-based ranks; R@K in percent.

  Args:
    ranks: [n_queries] 1-based ranks (one per query).
  """
  ranks = np.asarray(ranks, np.float64)
  if ranks.ndim != 1 or ranks.size == 0:
    raise ValueError(f"ranks must be a non-empty 1-D array, got shape {ranks.shape}")
  return {
      "R@1": float(100.0 * np.mean(ranks <= 1)),
      "R@5": float(100.0 * np.mean(ranks <= 5)),
      "R@10": float(100.0 * np.mean(ranks <= 10)),
      "MdR": float(np.median(ranks)),
      "MnR": float(np.mean(ranks)),
  }


def t2v_metrics(scores, text_to_video=None, *, tie: str = "pessimistic", text_mask=None,
                video_mask=None) -> dict[str, float]:
  """Text-to-video metrics of ``scores`` [n_texts, n_videos]; see :func:`t2v_ranks`."""
  return metrics_from_ranks(t2v_ranks(
      scores, text_to_video, tie=tie, text_mask=text_mask, video_mask=video_mask))


def v2t_metrics(scores, text_to_video=None, *, protocol: str = "strict",
                tie: str = "pessimistic", text_mask=None, video_mask=None) -> dict[str, float]:
  """Video-to-text metrics of ``scores`` [n_videos, n_texts]; see :func:`v2t_ranks`."""
  return metrics_from_ranks(v2t_ranks(
      scores, text_to_video, protocol=protocol, tie=tie, text_mask=text_mask,
      video_mask=video_mask))


def retrieval_metrics(sims, text_to_video=None, *, protocol: str = "strict",
                      tie: str = "pessimistic", text_mask=None,
                      video_mask=None) -> dict[str, dict[str, float]]:
  """Both directions for one similarity matrix ``sims`` [n_texts, n_videos].

  Returns:
    ``{"t2v": {...}, "v2t": {...}}``, each with the five metrics of :func:`metrics_from_ranks`.
  """
  sims = _check_scores(sims)
  return {
      "t2v": t2v_metrics(sims, text_to_video, tie=tie, text_mask=text_mask,
                         video_mask=video_mask),
      "v2t": v2t_metrics(sims.T, text_to_video, protocol=protocol, tie=tie,
                         text_mask=text_mask, video_mask=video_mask),
  }
