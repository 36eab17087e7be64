"""Evaluation of a trained dual encoder on one split: plain and NCL-normalized retrieval.

Steps (all queries and videos of the split, nothing dropped):

1. Encode captions and videos in fixed-size padded batches (``mask`` marks real rows), split
   over the devices; bring the embeddings to the host and drop the padding.
2. Cosine similarities ``S`` [n_texts, n_videos] and the model's temperature ``1 / logit_scale``.
3. Plain retrieval: metrics of ``S`` (text to video) and ``S^T`` (video to text).
4. NCL-normalized retrieval (inductive): the bank holds training queries, text embeddings for
   text-to-video and video embeddings for video-to-text (``config.eval.bank``, see
   :data:`BANKS`): the training queue of the state as it stands, or the same training pairs
   re-encoded with the evaluated parameters (:func:`bank_positions`,
   :func:`encode_training_batches`). Sinkhorn on
   ``bank x test candidates`` gives candidate biases so that every candidate receives its
   expected share of the bank's retrieval probability (one share per caption of a video); the
   test scores become ``S / temperature + bias`` (:func:`ncl_jax.normalize.ncl`).
5. Normalization error: each candidate's retrieval probability summed over the *test* queries,
   against its expected share (:mod:`ncl_jax.normalize`); reported per direction, absolute
   (``|mass - expected|``) and relative (``|mass / expected - 1|``), mean and max. The headline
   number is the mean of both directions' mean *relative* error, which weighs the directions
   alike even where their shares differ by orders of magnitude (multi-caption data), for plain
   and NCL scores, plus histogram PNGs of ``mass / expected``.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ncl_jax import metrics as metrics_lib
from ncl_jax import normalize
from ncl_jax import plots
from ncl_jax import selection as selection_lib
from ncl_jax import sharding
from ncl_jax.data import normalize_frames
from ncl_jax.errors import UserError
from ncl_jax.models.dual_encoder import DualEncoder


# Result modes of :func:`retrieval_results`: plain scores and NCL-normalized scores.
EVAL_MODES = ("plain", "ncl")

# Where the bank of NCL-normalized inference comes from (``config.eval.bank``):
# "queue": the state's training queues as they stand: the embeddings of the last
#   ``ncl.queue_size`` training pairs, each computed with the parameters of the step that
#   trained on it (up to ``queue_size / global_batch_size`` steps older than the evaluated ones).
# "reencoded": the same training pairs (the batches of the last steps before the evaluated
#   state, ``eval.bank_size`` pairs, 0 = as many as the queue holds) embedded again with the
#   evaluated parameters.
BANKS = ("queue", "reencoded")


def check_bank(bank: str, bank_size: int) -> None:
  """Raises a UserError unless ``config.eval.bank`` / ``bank_size`` are valid."""
  if bank not in BANKS:
    raise UserError(f"config.eval.bank must be one of {', '.join(BANKS)}, got {bank!r}")
  if int(bank_size) < 0:
    raise UserError(f"config.eval.bank_size must be >= 0 (0: the queue's size), got {bank_size}")


def bank_positions(step: int, global_batch_size: int, bank_size: int) -> range:
  """Training-iterator positions of the batches that a re-encoded bank of a state holds.

  The batch at position ``p`` (0-based, counted across epochs) trained step ``p + 1``, so a
  state at ``step`` has seen positions ``0 .. step - 1``. The bank takes the most recent
  ``ceil(bank_size / global_batch_size)`` of them, or all of them early in the run: the queue's
  training pairs when ``bank_size`` is the queue's size.

  Args:
    step: the evaluated state's step (updates applied).
    global_batch_size: training examples per step.
    bank_size: training pairs wanted (> 0).

  Returns:
    The positions, oldest first (empty at step 0).
  """
  batches = min(int(step), -(-int(bank_size) // int(global_batch_size)))
  return range(int(step) - batches, int(step))


def encode_training_batches(encoders: Encoders, params, batches: Iterable[dict[str, np.ndarray]],
                            mesh, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Text and video embeddings of training batches, as the queues would hold them.

  Args:
    encoders: :func:`make_encoders`.
    params: the parameters to embed with.
    batches: this host's rows of global training batches (``text_tokens`` [b, L], ``video``,
      ``frame_mask`` [b, T]), as the training iterator yields them.
    mesh: the device mesh ("data" axis).
    limit: keep only the last ``limit`` pairs (the newest, when batches come oldest first).

  Returns:
    ``(text [n, E], video [n, E])`` float32 on every host, row i of both from the same pair.
  """
  texts, videos = [], []
  for batch in batches:
    inputs = sharding.host_batch_to_global(
        {k: batch[k] for k in ("text_tokens", "video", "frame_mask")}, mesh)
    texts.append(np.asarray(sharding.to_host(encoders.text(params, inputs["text_tokens"])),
                            np.float32))
    videos.append(np.asarray(sharding.to_host(
        encoders.video(params, inputs["video"], inputs["frame_mask"])), np.float32))
  if not texts:
    return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
  text, video = np.concatenate(texts), np.concatenate(videos)
  if limit is not None:
    text, video = text[-limit:], video[-limit:]
  return text, video


def select_metric_mode(select_metric: str) -> str:
  """``"max"`` or ``"min"``: whether a larger value of ``config.eval.select_metric`` is better.

  Valid keys: ``"<mode>/<t2v|v2t>/<R@1|R@5|R@10|MdR|MnR>"`` (ranks: smaller is better) and
  ``"normalization_error/<mode>"`` (the mean relative normalization error of both directions:
  smaller is better), with ``<mode>`` one of :data:`EVAL_MODES`.

  Raises:
    UserError: any other key.
  """
  parts = str(select_metric).split("/")
  if len(parts) == 3 and parts[0] in EVAL_MODES and parts[1] in ("t2v", "v2t") and (
      parts[2] in metrics_lib.METRIC_NAMES):
    return "min" if parts[2] in ("MdR", "MnR") else "max"
  if len(parts) == 2 and parts[0] == "normalization_error" and parts[1] in EVAL_MODES:
    return "min"
  examples = ", ".join([f"{m}/t2v/R@1" for m in EVAL_MODES] + ["normalization_error/ncl"])
  raise UserError(f"config.eval.select_metric {select_metric!r} is not a validation result; "
                  f"use <mode>/<t2v|v2t>/<R@1|R@5|R@10|MdR|MnR> or normalization_error/<mode> "
                  f"with mode in {EVAL_MODES} (e.g. {examples})")


class Encoders(NamedTuple):
  """Jitted encoders: ``text(params, tokens)`` and ``video(params, video, frame_mask)`` -> [N, E]."""

  text: Callable[..., jax.Array]
  video: Callable[..., jax.Array]
  frames: bool


def make_encoders(model: DualEncoder) -> Encoders:
  """Jitted single-modality encoders of ``model`` (inputs may be split over devices)."""

  def text(params, tokens):
    return model.apply({"params": params}, tokens, method=DualEncoder.encode_text)

  def video(params, video, frame_mask):
    if model.config.input_mode == "frames":
      video = normalize_frames(video, xp=jnp)
    return model.apply({"params": params}, video, frame_mask, method=DualEncoder.encode_video)

  return Encoders(jax.jit(text), jax.jit(video), model.config.input_mode == "frames")


def _encode(fn: Callable, params, batches, keys: tuple[str, ...], mesh) -> np.ndarray:
  """Runs ``fn`` over padded global batches; returns the rows whose ``mask`` is True."""
  outputs = []
  for batch in batches:
    rows = sharding.process_slice(batch["mask"].shape[0])
    inputs = sharding.host_batch_to_global({k: batch[k][rows] for k in keys}, mesh)
    emb = sharding.to_host(fn(params, *(inputs[k] for k in keys)))
    outputs.append(np.asarray(emb, np.float32)[batch["mask"]])
  return np.concatenate(outputs, axis=0)


def encode_split(encoders: Encoders, params, eval_data, mesh, batch_size: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """All caption and video embeddings of a split: ([num_texts, E], [num_videos, E]) float32."""
  text = _encode(encoders.text, params, eval_data.text_batches(batch_size), ("text_tokens",),
                 mesh)
  video = _encode(encoders.video, params, eval_data.video_batches(batch_size),
                  ("video", "frame_mask"), mesh)
  return text, video


def logit_scale_of(params) -> float:
  """``exp`` of the model's log logit scale (the inverse temperature)."""
  return float(np.exp(np.asarray(jax.device_get(params["logit_scale"]), np.float64)))


def retrieval_results(text_emb: np.ndarray, video_emb: np.ndarray, caption_to_video: np.ndarray,
                      *, logit_scale: float, text_bank: np.ndarray, video_bank: np.ndarray,
                      eval_config, plot_prefix: str | None = None,
                      methods: Mapping[str, Mapping[str, Mapping[str, Any]]] | None = None
                      ) -> dict[str, Any]:
  """Plain and NCL-normalized metrics and normalization errors from embeddings.

  Args:
    text_emb: [n_texts, E] L2-normalised caption embeddings.
    video_emb: [n_videos, E] L2-normalised video embeddings.
    caption_to_video: int [n_texts], the video of each caption.
    logit_scale: the model's inverse temperature.
    text_bank: [n_bank_t, E] training text embeddings (the text queue), the t2v bank.
    video_bank: [n_bank_v, E] training video embeddings (the video queue), the v2t bank.
    eval_config: ``config.eval`` (``sinkhorn_tol``, ``sinkhorn_max_iterations``,
      ``v2t_protocol``, ``tie``).
    plot_prefix: the histograms of summed retrieval probabilities (plain vs NCL) go to
      ``<plot_prefix>_t2v.png`` and ``<plot_prefix>_v2t.png``; None draws nothing. Existing
      files are kept.
    methods: other normalizers to report beside NCL, ``{method: {"t2v": options, "v2t":
      options}}`` (e.g. from :func:`select_hyperparameters`), with the same banks.

  Returns:
    ``{"plain": {"t2v": {...}, "v2t": {...}}, "ncl": {...}, "normalization_error": {"plain": x,
    "ncl": y}, "normalization_error_detail": {...}, "num_texts", "num_videos", "bank_size",
    "sinkhorn": {...}, "temperature"}``, plus ``"methods": {method: {"t2v", "v2t",
    "hyperparameters"}}`` when ``methods`` is given.
  """
  n_texts, n_videos = text_emb.shape[0], video_emb.shape[0]
  temperature = 1.0 / logit_scale
  sims = text_emb @ video_emb.T
  protocol, tie = str(eval_config.v2t_protocol), str(eval_config.tie)
  shares = {"t2v": normalize.expected_mass(n_texts, n_videos, caption_to_video, direction="t2v"),
            "v2t": normalize.expected_mass(n_videos, n_texts, caption_to_video, direction="v2t")}
  logits, sinkhorn = _ncl_logits(sims, text_emb, video_emb, text_bank, video_bank, shares,
                                 temperature, eval_config)
  masses = {"plain": {"t2v": normalize.candidate_mass(sims, scale=logit_scale),
                      "v2t": normalize.candidate_mass(sims.T, scale=logit_scale)},
            "ncl": {d: normalize.candidate_mass(logits[d]) for d in ("t2v", "v2t")}}
  if plot_prefix is not None and jax.process_index() == 0:
    _plot_masses(plot_prefix, masses, shares, n_texts, n_videos)
  detail, headline = _normalization_errors(masses, shares)
  results = {
      "plain": _both_directions(sims, sims.T, caption_to_video, protocol, tie),
      "ncl": _both_directions(logits["t2v"], logits["v2t"], caption_to_video, protocol, tie),
      "normalization_error": headline,
      "normalization_error_detail": detail,
      "num_texts": int(n_texts),
      "num_videos": int(n_videos),
      "bank_size": {"t2v": int(len(text_bank)), "v2t": int(len(video_bank))},
      "sinkhorn": sinkhorn,
      "temperature": float(temperature),
  }
  if methods:
    results["methods"] = _other_methods(methods, sims, text_emb, video_emb, text_bank, video_bank,
                                        caption_to_video, temperature, protocol, tie)
  return results


def _both_directions(t2v_scores, v2t_scores, caption_to_video, protocol: str, tie: str) -> dict:
  """Text-to-video and video-to-text metrics of [n_texts, n_videos] and [n_videos, n_texts]."""
  return {"t2v": metrics_lib.t2v_metrics(t2v_scores, caption_to_video, tie=tie),
          "v2t": metrics_lib.v2t_metrics(v2t_scores, caption_to_video, protocol=protocol,
                                         tie=tie)}


def _ncl_logits(sims, text_emb, video_emb, text_bank, video_bank, shares: dict,
                temperature: float, eval_config) -> tuple[dict, dict]:
  """NCL-normalized logits per direction and the Sinkhorn report ({"iterations", "error"}).

  An empty bank (no training step yet) leaves the scores as they are.
  """
  if not (len(text_bank) and len(video_bank)):
    return ({"t2v": sims / temperature, "v2t": sims.T / temperature},
            {d: {"iterations": 0, "error": 0.0} for d in ("t2v", "v2t")})
  options = dict(tol=float(eval_config.sinkhorn_tol),
                 max_iterations=int(eval_config.sinkhorn_max_iterations))
  problems = {"t2v": (sims, text_bank @ video_emb.T), "v2t": (sims.T, video_bank @ text_emb.T)}
  logits, sinkhorn = {}, {}
  for d, (scores, bank_scores) in problems.items():
    logits[d], biases = normalize.ncl(scores, bank_scores, temperature=temperature,
                                      col_marginals=shares[d], **options)
    sinkhorn[d] = {"iterations": biases.iterations, "error": biases.error}
  return logits, sinkhorn


def _normalization_errors(masses: dict, shares: dict) -> tuple[dict, dict]:
  """Per mode and direction, the error of the summed retrieval probabilities against their
  expected shares (histograms left out: they live in the PNG), and per mode the mean relative
  error of both directions."""
  detail = {mode: {d: normalize.normalization_error(masses[mode][d], shares[d])
                   for d in ("t2v", "v2t")} for mode in masses}
  for by_direction in detail.values():
    for d, error in by_direction.items():
      by_direction[d] = {k: v for k, v in error.items() if k != "histogram"}
  headline = {mode: 0.5 * (detail[mode]["t2v"]["relative_mae"] +
                           detail[mode]["v2t"]["relative_mae"]) for mode in detail}
  return detail, headline


def _plot_masses(plot_prefix: str, masses: dict, shares: dict, n_texts: int,
                 n_videos: int) -> None:
  """Plain vs NCL histograms per direction to ``<plot_prefix>_<direction>.png``."""
  for d, candidate, n_queries in (("t2v", "video", n_texts), ("v2t", "caption", n_videos)):
    path = f"{plot_prefix}_{d}.png"
    if not os.path.exists(path):  # a repeated evaluation keeps the first figure
      plots.plot_mass_histograms(
          path, masses["plain"][d], masses["ncl"][d], shares[d],
          labels=("plain", "NCL-normalized"),
          title=f"{d}: summed retrieval probability of the {n_queries} test queries per "
          f"{candidate}")


def _other_methods(methods, sims, text_emb, video_emb, text_bank, video_bank, caption_to_video,
                   temperature: float, protocol: str, tie: str) -> dict:
  """``{method: {"t2v", "v2t", "hyperparameters"}}`` of the other normalizers, same banks."""
  banks = _direction_problems(sims, text_emb, video_emb, text_bank, video_bank)
  return {method: {**{d: _method_metrics(method, banks[d], options[d], caption_to_video,
                                         temperature, d, protocol, tie) for d in banks},
                   "hyperparameters": {d: dict(options[d]) for d in banks}}
          for method, options in methods.items()}


def _direction_problems(sims, text_emb, video_emb, text_bank, video_bank) -> dict:
  """Per direction: (query x candidate similarities, bank x candidate similarities)."""
  return {"t2v": (sims, text_bank @ video_emb.T), "v2t": (sims.T, video_bank @ text_emb.T)}


def _direction_score(direction: str, caption_to_video, protocol: str, tie: str) -> Callable:
  """Scores -> metrics of one direction under the evaluation's protocol and tie policy."""
  if direction == "t2v":
    return lambda scores: metrics_lib.t2v_metrics(scores, caption_to_video, tie=tie)
  return lambda scores: metrics_lib.v2t_metrics(scores, caption_to_video, protocol=protocol,
                                                tie=tie)


def _direction_ranks(direction: str, caption_to_video, protocol: str, tie: str) -> Callable:
  """Scores -> 1-based ground-truth ranks of one direction (protocol and tie policy)."""
  if direction == "t2v":
    return lambda scores: metrics_lib.t2v_ranks(scores, caption_to_video, tie=tie)
  return lambda scores: metrics_lib.v2t_ranks(scores, caption_to_video, protocol=protocol,
                                              tie=tie)


def _method_metrics(method: str, problem, options, caption_to_video, temperature: float,
                    direction: str, protocol: str, tie: str) -> dict:
  queries, bank = problem
  if len(bank) == 0 and normalize.normalizer(method).uses_bank:  # no training step yet
    return _direction_score(direction, caption_to_video, protocol, tie)(queries)
  scores = normalize.normalize(queries, method,
                               bank if normalize.normalizer(method).uses_bank else None,
                               temperature=temperature,
                               col_marginals=_shares(queries, caption_to_video, direction),
                               **options)
  return _direction_score(direction, caption_to_video, protocol, tie)(scores)


def _shares(queries, caption_to_video, direction: str) -> np.ndarray:
  """Expected candidate shares of one direction's [n_queries, n_candidates] problem."""
  return normalize.expected_mass(queries.shape[0], queries.shape[1], caption_to_video,
                                 direction=direction)


def select_hyperparameters(text_emb: np.ndarray, video_emb: np.ndarray,
                           caption_to_video: np.ndarray, *, logit_scale: float,
                           text_bank: np.ndarray, video_bank: np.ndarray, methods,
                           eval_config) -> tuple[dict[str, Any], dict[str, Any]]:
  """Each method's options chosen on a *validation* split's labels, per direction.

  The registry's grid (:func:`ncl_jax.selection.grid`) is scored by validation R@1 (ties: lower
  mean rank) with the training bank, as :func:`retrieval_results` will use it on the test split
  (:func:`ncl_jax.selection.select_on_queries`, with its guard: the plain point, strength 0,
  stays unless another wins clearly). With an empty bank (no training step yet)
  the bank methods have nothing to normalize with and report plain scores, so their choice is
  empty.

  Args:
    text_emb, video_emb, caption_to_video: the validation split's embeddings and labels.
    logit_scale: the model's inverse temperature.
    text_bank, video_bank: [n_bank, E] training text / video embeddings (the banks).
    methods: normalizer names (``ncl_jax.normalize.method_names()``).
    eval_config: ``config.eval`` (``v2t_protocol``, ``tie``).

  Returns:
    ``(values, report)``: ``values[method] = {"t2v": options, "v2t": options}`` (the
    ``methods`` argument of :func:`retrieval_results`); ``report[method][direction]`` is the
    selection's JSON (:meth:`ncl_jax.selection.Selection.as_json`) or None.
  """
  protocol, tie = str(eval_config.v2t_protocol), str(eval_config.tie)
  problems = _direction_problems(text_emb @ video_emb.T, text_emb, video_emb, text_bank,
                                 video_bank)
  chosen, report = {}, {}
  for method in methods:
    chosen[method], report[method] = {}, {}
    for direction, (queries, bank) in problems.items():
      if len(bank) == 0 and normalize.normalizer(method).uses_bank:
        chosen[method][direction], report[method][direction] = {}, None
        continue
      picked = selection_lib.select_on_queries(
          method, queries, bank, temperature=1.0 / logit_scale,
          ranks=_direction_ranks(direction, caption_to_video, protocol, tie),
          col_marginals=_shares(queries, caption_to_video, direction))
      chosen[method][direction] = picked.values
      report[method][direction] = picked.as_json()
  return chosen, report


def evaluate_split(encoders: Encoders, params, eval_data, mesh, *, text_bank: np.ndarray,
                   video_bank: np.ndarray, eval_config, plot_prefix: str | None = None,
                   methods=None) -> dict[str, Any]:
  """Encodes ``eval_data`` with ``params`` and returns :func:`retrieval_results`."""
  text_emb, video_emb = encode_split(encoders, params, eval_data, mesh,
                                     int(eval_config.batch_size))
  return retrieval_results(
      text_emb, video_emb, eval_data.caption_to_video, logit_scale=logit_scale_of(params),
      text_bank=text_bank, video_bank=video_bank, eval_config=eval_config, plot_prefix=plot_prefix,
      methods=methods)


def select_on_split(encoders: Encoders, params, eval_data, mesh, *, text_bank: np.ndarray,
                    video_bank: np.ndarray, eval_config, methods
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
  """Encodes a validation split and returns :func:`select_hyperparameters` on it."""
  text_emb, video_emb = encode_split(encoders, params, eval_data, mesh,
                                     int(eval_config.batch_size))
  return select_hyperparameters(
      text_emb, video_emb, eval_data.caption_to_video, logit_scale=logit_scale_of(params),
      text_bank=text_bank, video_bank=video_bank, methods=methods, eval_config=eval_config)


def extra_methods(eval_config) -> tuple[str, ...]:
  """The normalizers of ``config.eval.methods`` ("ncl,qbnorm,is,csls,dsl"; "" for none).

  ``ncl`` here is NCL with its strength ``alpha`` chosen on the validation split, reported
  under ``"methods"`` beside the always-reported NCL at ``alpha = 1``.

  Raises:
    UserError: an unknown name, or ``none`` (always reported).
  """
  names = tuple(n.strip() for n in str(eval_config.get("methods", "")).split(",") if n.strip())
  allowed = tuple(m for m in normalize.method_names()
                  if m != "none" and not normalize.normalizer(m).gallery_bank)
  for name in names:
    if name not in allowed:
      raise UserError(f"config.eval.methods: unknown normalizer {name!r}; use a comma-separated "
                      f"subset of {', '.join(allowed)} (plain and ncl at alpha 1 are always "
                      f"reported)")
  return names
