"""Inference with a trained model: embed texts and videos, rank a gallery, plain or NCL-normalized.

A *bundle* is the folder ``tools/export.py`` writes (layout in :mod:`ncl_jax.export`): encoder
parameters, the run's config, the NCL bias bank (the training query queues) and the embedding
functions serialized with ``jax.export``. Typical use::

  from ncl_jax import inference
  bundle = inference.load_bundle("bundle/")
  videos = bundle.embed_videos(video_array, frame_mask)        # [N, E], L2-normalised
  gallery = bundle.gallery(videos)                              # text-to-video search
  top, scores = gallery.search(bundle.embed_texts(["a dog surfs"]), k=5, normalization="ncl")

Scores. ``plain`` ranks by cosine similarity. ``ncl`` ranks by ``cos / temperature + bias_j``:
NCL's inference-time normalization, with candidate biases from Sinkhorn on the bundled bank of
training queries x the gallery, so that every gallery item receives its expected share of the
bank's retrieval probability (hubs are pushed down, never-retrieved items up). The biases depend
on the gallery only, so a :class:`Gallery` computes them once, on first use, and caches them;
queries are then ranked independently of each other (inductive: no test query influences another
query's scores).

Backends. ``"flax"`` (default) rebuilds the model from the bundled config with this version of
ncl_jax and runs it jitted; ``"exported"`` calls the bundled ``jax.export`` functions, which need
no model code but only load in JAX versions that accept the serialization (deployment, not
archival). Both take fixed-size, zero-padded batches, so each input shape compiles once.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax import export as jax_export

from ncl_jax import evaluate
from ncl_jax import normalize
from ncl_jax import runs
from ncl_jax import sharding
from ncl_jax import streaming
from ncl_jax.data.pipeline import sample_frame_indices
from ncl_jax.data.synthetic import SyntheticVocabulary
from ncl_jax.errors import UserError
from ncl_jax.gallery import index as index_lib
from ncl_jax.gallery import solve
from ncl_jax.models.dual_encoder import DualEncoder
from ncl_jax.tokenizer import ClipTokenizer

BACKENDS = ("flax", "exported")
NORMALIZATIONS = ("plain", "ncl")


def _pad_rows(array: np.ndarray, rows: int) -> np.ndarray:
  missing = rows - array.shape[0]
  if missing <= 0:
    return array
  return np.concatenate([array, np.zeros((missing,) + array.shape[1:], array.dtype)])


class Bundle:
  """A trained dual encoder ready for inference.

  Attributes:
    config: the run's config (``config.model``, ``config.data``, ``config.eval``).
    params: the encoder parameters.
    text_bank: [n_t, E] float32 training text embeddings (the text queue): the bank that
      normalizes text-to-video scores.
    video_bank: [n_v, E] float32 training video embeddings: the bank for video-to-text.
    logit_scale: the model's inverse temperature; ``temperature = 1 / logit_scale``.
    max_words: L, token ids per caption.
    video_shape: shape of one padded video, e.g. (T, D) features or (T, H, W, 3) frames.
    video_dtype: float32 (features) or uint8 (frames, CLIP-normalised inside the encoder).
    tokenizer: CLIP's tokenizer, or the synthetic set's words, when the bundle holds a
      vocabulary, else None (token ids only).
    manifest: the bundle's manifest.json (empty for a bundle made from a workdir in memory).
    backend: "flax" or "exported".
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any, text_bank: np.ndarray,
               video_bank: np.ndarray, *, backend: str = "flax", exported=None,
               tokenizer=None, manifest: dict | None = None):
    if backend not in BACKENDS:
      raise UserError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "exported" and exported is None:
      raise UserError("the exported backend needs a bundle written by tools/export.py")
    self.config = config
    self.params = jax.device_put(params)
    self.text_bank = np.asarray(text_bank, np.float32)
    self.video_bank = np.asarray(video_bank, np.float32)
    self.logit_scale = float(np.exp(np.asarray(jax.device_get(params["logit_scale"]),
                                               np.float64)))
    self.temperature = 1.0 / self.logit_scale
    self.backend = backend
    self.tokenizer = tokenizer
    self.manifest = dict(manifest or {})
    self.max_words = int(config.data.max_words)
    self.video_shape, self.video_dtype = video_input_shape(config)
    self._exported = exported
    self._text_fn, self._video_fn = self._functions()

  @property
  def max_frames(self) -> int:
    return int(self.video_shape[0])

  @property
  def embed_dim(self) -> int:
    return int(self.config.model.embed_dim)

  def _functions(self):
    if self.backend == "exported":
      text_exp, video_exp = self._exported
      return text_exp.call, video_exp.call
    encoders = evaluate.make_encoders(DualEncoder(self.config.model))
    return encoders.text, encoders.video

  # Embedding ---------------------------------------------------------------------------------

  def tokenize(self, texts: Sequence[str]) -> np.ndarray:
    """Token ids int32 [N, max_words] of captions, with the bundle's CLIP tokenizer."""
    if self.tokenizer is None:
      raise UserError("this bundle has no tokenizer vocabulary (exported without CLIP's "
                      "vocabulary, or a synthetic-set bundle from before synthetic_vocab.txt); "
                      "pass token ids [N, max_words] instead of strings")
    return np.asarray(self.tokenizer.encode_batch(list(texts), self.max_words), np.int32)

  def embed_texts(self, texts, batch_size: int = 64) -> np.ndarray:
    """L2-normalised text embeddings [N, E] float32.

    Args:
      texts: a list of N strings (needs the bundle's tokenizer) or token ids int [N, L] with
        L <= max_words (zero-padded to max_words).
      batch_size: captions per encoder call; the last batch is zero-padded.
    """
    if len(texts) and isinstance(texts[0], str):
      tokens = self.tokenize(texts)
    else:
      tokens = np.asarray(texts, np.int32)
      if tokens.ndim != 2 or tokens.shape[1] > self.max_words:
        raise UserError(f"token ids must be [N, L] with L <= {self.max_words}, got shape "
                        f"{tokens.shape}")
      tokens = np.pad(tokens, ((0, 0), (0, self.max_words - tokens.shape[1])))
    outputs = []
    for start in range(0, len(tokens), batch_size):
      chunk = tokens[start:start + batch_size]
      emb = self._text_fn(self.params, _pad_rows(chunk, batch_size))
      outputs.append(np.asarray(emb, np.float32)[:len(chunk)])
    return np.concatenate(outputs) if outputs else np.zeros((0, self.embed_dim), np.float32)

  def pad_videos(self, videos) -> tuple[np.ndarray, np.ndarray]:
    """Videos of any length as (video [N, *video_shape], frame_mask bool [N, T]).

    Args:
      videos: a list of N arrays [t_i, ...] (frames uint8 [t_i, H, W, 3] or features
        [t_i, D]); longer than T frames are subsampled uniformly, as in training.
    """
    out = np.zeros((len(videos),) + tuple(self.video_shape), self.video_dtype)
    mask = np.zeros((len(videos), self.max_frames), bool)
    for i, video in enumerate(videos):
      video = np.asarray(video)
      if video.shape[1:] != tuple(self.video_shape[1:]) or video.shape[0] == 0:
        raise UserError(f"video {i} has shape {video.shape}; expected [t, "
                        f"{', '.join(map(str, self.video_shape[1:]))}] with t >= 1")
      keep = sample_frame_indices(video.shape[0], self.max_frames)
      out[i, :len(keep)] = video[keep]
      mask[i, :len(keep)] = True
    return out, mask

  def embed_videos(self, videos, frame_mask=None, batch_size: int = 16) -> np.ndarray:
    """L2-normalised video embeddings [N, E] float32.

    Args:
      videos: an array [N, *video_shape] (padded, with ``frame_mask``) or a list of
        per-video arrays [t_i, ...] of any length (see :meth:`pad_videos`). Frames are uint8
        RGB at the training resolution; features float32.
      frame_mask: bool [N, T], True for real frames; None means all frames are real.
      batch_size: videos per encoder call; the last batch is zero-padded.
    """
    if isinstance(videos, (list, tuple)):
      if frame_mask is not None:
        raise UserError("pass frame_mask only with a padded video array")
      videos, frame_mask = self.pad_videos(videos)
    videos = np.asarray(videos)
    if videos.shape[1:] != tuple(self.video_shape):
      raise UserError(f"videos must be [N, {', '.join(map(str, self.video_shape))}], got "
                      f"{videos.shape}; pass a list of [t, ...] arrays for other lengths")
    videos = videos.astype(self.video_dtype, copy=False)
    if frame_mask is None:
      frame_mask = np.ones(videos.shape[:2], bool)
    frame_mask = np.asarray(frame_mask, bool)
    outputs = []
    for start in range(0, len(videos), batch_size):
      chunk = videos[start:start + batch_size]
      emb = self._video_fn(self.params, _pad_rows(chunk, batch_size),
                           _pad_rows(frame_mask[start:start + batch_size], batch_size))
      outputs.append(np.asarray(emb, np.float32)[:len(chunk)])
    return np.concatenate(outputs) if outputs else np.zeros((0, self.embed_dim), np.float32)

  # Search -----------------------------------------------------------------------------------

  def gallery(self, embeddings: np.ndarray, kind: str = "video",
              expected_share: np.ndarray | None = None) -> "Gallery":
    """A searchable gallery of ``kind`` ("video": text queries; "text": video queries).

    Args:
      embeddings: [N, E] gallery embeddings from :meth:`embed_videos` / :meth:`embed_texts`.
      kind: what the gallery holds; picks the bank (text queue for videos, video queue for
        texts).
      expected_share: [N] positive relative share of retrieval probability each item should
        receive under NCL (default uniform; e.g. a video's caption count, see
        :func:`ncl_jax.normalize.expected_mass`).
    """
    if kind not in ("video", "text"):
      raise UserError(f"kind must be 'video' or 'text', got {kind!r}")
    bank = self.text_bank if kind == "video" else self.video_bank
    eval_config = self.config.eval
    return Gallery(embeddings, bank, temperature=self.temperature,
                   expected_share=expected_share, tol=float(eval_config.sinkhorn_tol),
                   max_iterations=int(eval_config.sinkhorn_max_iterations))


class Gallery:
  """Gallery embeddings with NCL candidate biases computed once and cached.

  Large galleries: when bank x gallery exceeds 16M entries the biases come from
  :func:`ncl_jax.gallery.solve.dense_biases` (tiles of embeddings on this process's devices,
  the bank x gallery matrix never stored), and from ``index_threshold`` items on
  :meth:`search` ranks through an exact FAISS index with the biases folded in
  (:mod:`ncl_jax.gallery.index`), built on first use, instead of scoring every item in numpy.

  Args:
    embeddings: [N, E] L2-normalised gallery embeddings.
    bank: [n_bank, E] embeddings of training queries of the other modality.
    temperature: the model's temperature (logits are cos / temperature).
    expected_share: optional [N] relative target shares (default uniform).
    tol, max_iterations: Sinkhorn's stopping rule.
  """

  # Galleries with at least this many items are searched through a FAISS index.
  index_threshold = 50_000

  def __init__(self, embeddings: np.ndarray, bank: np.ndarray, *, temperature: float,
               expected_share: np.ndarray | None = None, tol: float = 1e-4,
               max_iterations: int = 1000):
    self.embeddings = np.asarray(embeddings, np.float32)
    if self.embeddings.ndim != 2 or len(self.embeddings) == 0:
      raise UserError(f"gallery embeddings must be a non-empty [N, E] array, got shape "
                      f"{self.embeddings.shape}")
    self.bank = np.asarray(bank, np.float32)
    self.temperature = float(temperature)
    self.expected_share = None if expected_share is None else np.asarray(expected_share)
    self._tol, self._max_iterations = tol, max_iterations
    self._indexes = {}

  def __len__(self) -> int:
    return len(self.embeddings)

  @functools.cached_property
  def ncl_biases(self) -> streaming.Biases:
    """Candidate biases [N] from Sinkhorn on bank x gallery (computed on first use)."""
    if len(self.bank) == 0:
      raise UserError("the bundle's bank is empty (the run saved no training queries), so "
                      "NCL-normalized scores are undefined; use normalization='plain'")
    if len(self.bank) * len(self) > normalize.DENSE_LIMIT:
      return solve.dense_biases(
          self.bank, self.embeddings, temperature=self.temperature,
          col_marginals=self.expected_share, tol=self._tol, max_iterations=self._max_iterations,
          mesh=sharding.make_mesh(jax.local_devices())).biases()
    return normalize.ncl_biases(self.bank @ self.embeddings.T, temperature=self.temperature,
                                col_marginals=self.expected_share, tol=self._tol,
                                max_iterations=self._max_iterations)

  def _index(self, normalization: str):
    """The exact FAISS index of ``normalization`` (plain: zero biases at temperature 1)."""
    if normalization not in self._indexes:
      if normalization == "ncl":
        bias, temperature = self.ncl_biases.bias, self.temperature
      else:
        bias, temperature = np.zeros(len(self), np.float32), 1.0
      self._indexes[normalization] = index_lib.BiasedIndex.build(
          self.embeddings, bias, temperature=temperature, kind="flat")
    return self._indexes[normalization]

  def _checked_queries(self, queries, normalization: str) -> np.ndarray:
    if normalization not in NORMALIZATIONS:
      raise UserError(f"normalization must be one of {NORMALIZATIONS}, got {normalization!r}")
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.shape[1] != self.embeddings.shape[1]:
      raise UserError(f"queries have {queries.shape[1]} dimensions, the gallery "
                      f"{self.embeddings.shape[1]}")
    return queries

  def scores(self, queries: np.ndarray, normalization: str = "ncl") -> np.ndarray:
    """Scores [Q, N] of query embeddings [Q, E]: cosine ("plain") or cos / T + bias ("ncl")."""
    queries = self._checked_queries(queries, normalization)
    sims = queries @ self.embeddings.T
    if normalization == "plain":
      return sims
    return sims / np.float32(self.temperature) + self.ncl_biases.bias[None, :]

  def search(self, queries: np.ndarray, k: int = 10, normalization: str = "ncl"
             ) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` gallery items per query: (indices int [Q, k], scores [Q, k]), best first.

    Below ``index_threshold`` items equal scores keep gallery order; from it on the ranking
    comes from an exact FAISS index (same scores to float32 rounding; FAISS orders ties).
    """
    if len(self) >= self.index_threshold:
      queries = self._checked_queries(queries, normalization)
      return self._index(normalization).search(queries, max(1, min(int(k), len(self))))
    scores = self.scores(queries, normalization)
    k = max(1, min(int(k), scores.shape[1]))
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, axis=1)


def embed_split(bundle: Bundle, eval_data, batch_size: int = 64, on_video_batch=None
                ) -> tuple[np.ndarray, np.ndarray]:
  """All caption and video embeddings of an evaluation split, padding rows dropped.

  Args:
    bundle: the model.
    eval_data: a :class:`ncl_jax.data.EvalData` split.
    batch_size: items per encoder call.
    on_video_batch: optional callable given each padded video batch (``{"video",
      "frame_mask", "mask"}``) as it is embedded, e.g. to keep thumbnails without reading the
      videos twice.

  Returns:
    (text_emb [n_texts, E], video_emb [n_videos, E]) float32, L2-normalised.
  """
  text = [bundle.embed_texts(b["text_tokens"], batch_size)[b["mask"]]
          for b in eval_data.text_batches(batch_size)]
  video = []
  for batch in eval_data.video_batches(batch_size):
    if on_video_batch is not None:
      on_video_batch(batch)
    embedded = bundle.embed_videos(batch["video"], batch["frame_mask"], batch_size)
    video.append(embedded[batch["mask"]])
  return np.concatenate(text), np.concatenate(video)


def video_input_shape(config: ml_collections.ConfigDict) -> tuple[tuple[int, ...], np.dtype]:
  """Shape and dtype of one padded video as the run's data pipeline produced it."""
  data, model = config.data, config.model
  frames = int(data.max_frames)
  if model.input_mode == "features":
    return (frames, int(model.feature_dim)), np.dtype(np.float32)
  size = int(data.get("image_size", model.vision.image_size))
  return (frames, size, size, 3), np.dtype(np.uint8)


def _tokenizer_from(path: pathlib.Path):
  if path.name == runs.SYNTHETIC_VOCAB_FILE:
    return SyntheticVocabulary.load(path)
  return ClipTokenizer(str(path))


def _run_tokenizer(config: ml_collections.ConfigDict):
  """The tokenizer a run trained with: the synthetic set's words, or CLIP's vocabulary found
  next to the run's CLIP weights (None when there is none)."""
  if config.data.name == "synthetic":
    return SyntheticVocabulary(config.data)
  vocab = runs.find_vocabulary(config)
  return _tokenizer_from(vocab) if vocab else None


def load_bundle(path: str | os.PathLike, backend: str = "flax") -> Bundle:
  """Loads a bundle written by ``tools/export.py``.

  Args:
    path: the bundle folder.
    backend: "flax" (rebuild the model from the config) or "exported" (the serialized
      ``jax.export`` functions).

  Raises:
    UserError: not a bundle, a format this version cannot read, or an export this JAX rejects.
  """
  root = pathlib.Path(path).expanduser()
  manifest_path = root / runs.MANIFEST_FILE
  if not manifest_path.is_file():
    raise UserError(f"{root} is not an ncl_jax bundle (no {runs.MANIFEST_FILE}); create one with "
                    "python tools/export.py --workdir RUN --out BUNDLE")
  manifest = json.loads(manifest_path.read_text())
  if manifest.get("format") != runs.BUNDLE_FORMAT:
    raise UserError(f"{manifest_path} has format {manifest.get('format')!r}; this ncl_jax reads "
                    f"{runs.BUNDLE_FORMAT!r}")
  config = ml_collections.ConfigDict(json.loads((root / runs.BUNDLE_CONFIG_FILE).read_text()))
  params = runs.restore_params(root / runs.PARAMS_DIR)
  with np.load(root / runs.BANK_FILE) as bank:
    text_bank, video_bank = bank["text_bank"], bank["video_bank"]
  exported = None
  if backend == "exported":
    try:
      exported = tuple(jax_export.deserialize(bytearray((root / name).read_bytes()))
                       for name in (runs.TEXT_FN_FILE, runs.VIDEO_FN_FILE))
    except Exception as err:  # the serialization format is versioned by JAX, not by us
      raise UserError(f"JAX {jax.__version__} cannot load the functions exported with JAX "
                      f"{manifest.get('jax_version')} ({err}); use backend='flax'") from err
  tokenizer = None
  if manifest.get("tokenizer"):
    tokenizer = _tokenizer_from(root / manifest["tokenizer"])
  return Bundle(config, params, text_bank, video_bank, backend=backend, exported=exported,
                tokenizer=tokenizer, manifest=manifest)


def bundle_from_run(workdir: str | os.PathLike, step: int | None = None) -> Bundle:
  """A flax-backend :class:`Bundle` straight from a training run's checkpoint (no export).

  Uses the checkpoint :func:`ncl_jax.runs.select_step` picks (the one evaluated on the test
  split, or ``step``) and the tokenizer vocabulary next to the run's CLIP weights, if any.
  """
  run = runs.restore_run(workdir, step)
  return Bundle(run.config, run.params, run.text_bank, run.video_bank,
                tokenizer=_run_tokenizer(run.config),
                manifest={"workdir": str(workdir), "step": run.step})


__all__ = ["BACKENDS", "Bundle", "Gallery", "NORMALIZATIONS", "bundle_from_run", "embed_split",
           "load_bundle", "video_input_shape"]
