"""What the explorer serves, computed without any web code: search, test queries and hubs.

An :class:`Explorer` holds one evaluation split of a trained model. At start-up it embeds all
captions and videos of the split once, computes the NCL candidate biases of the split's videos
from the model's bank of training queries (:meth:`ncl_jax.inference.Gallery.ncl_biases`, with
each video's caption count as its expected share, as the trainer's evaluation does), the
ground-truth rank of every caption of the split (plain and NCL) and each video's summed
retrieval probability (before and after normalization). A search then embeds one query and
ranks the split's videos both ways; everything else is a lookup.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import pathlib
import time
from typing import Any, Callable

import numpy as np
from PIL import Image

from ncl_jax import inference
from ncl_jax import metrics
from ncl_jax import normalize
from ncl_jax import plots
from ncl_jax import runs
from ncl_jax.data import EvalData, get_dataset, synthetic
from ncl_jax.errors import UserError

MAX_QUERY_CHARS = 300       # CLIP's 77 tokens rarely need more characters.
MAX_K = 100                 # results per column
MAX_QUERIES_PAGE = 1000     # captions per /api/queries answer
CAPTIONS_PER_ITEM = 3       # ground-truth captions shown with a result
THUMBNAIL_PIXELS = 128      # longest side of a frames-mode thumbnail
HISTOGRAM_BINS = 40
# Ground-truth rank groups of the rank distribution: (label, lowest rank, highest rank).
RANK_GROUPS = (("1", 1, 1), ("2-5", 2, 5), ("6-10", 6, 10), ("11-50", 11, 50),
               ("51-100", 51, 100), (">100", 101, np.inf))
NORMALIZATIONS = ("plain", "ncl")
HUB_QUERY_SETS = ("bank", "test")


def check_run(workdir: str) -> pathlib.Path:
  """A finished training run with a selected checkpoint, checked before anything is loaded.

  Raises:
    UserError: the folder does not exist or the run has not selected a checkpoint.
  """
  path = pathlib.Path(workdir).expanduser()
  if not path.is_dir():
    raise UserError(f"--workdir {path} does not exist; pass the --workdir of a finished "
                    "python -m ncl_jax.main run")
  results = runs.read_results(path)
  if not results or "selected_step" not in results:
    raise UserError(f"--workdir {path} has no selected checkpoint ({runs.RESULTS_FILE} with "
                    "selected_step is written when a run finishes); let the run finish, or "
                    "export a checkpoint with python tools/export.py --workdir RUN --out BUNDLE "
                    "--step N and pass --bundle BUNDLE")
  return path


def check_bundle(bundle_dir: str) -> pathlib.Path:
  """A bundle folder, checked before anything is loaded (:func:`ncl_jax.inference.load_bundle`
  reads it)."""
  path = pathlib.Path(bundle_dir).expanduser()
  if not (path / runs.MANIFEST_FILE).is_file():
    raise UserError(f"--bundle {path} is not an ncl_jax bundle (no {runs.MANIFEST_FILE}); "
                    "create one with python tools/export.py --workdir RUN --out BUNDLE")
  return path


def text_tokenizer(bundle):
  """The bundle's tokenizer; for the synthetic set, its word vocabulary (captions are ids)."""
  if bundle.tokenizer is not None:
    return bundle.tokenizer
  if bundle.config.data.name == "synthetic":
    return synthetic.SyntheticVocabulary(bundle.config.data)
  raise UserError("this model has no tokenizer vocabulary, so typed queries cannot be embedded; "
                  "export it again with CLIP's bpe_simple_vocab_16e6.txt.gz next to its weights")


def check_query(text: str) -> str:
  """A typed query, stripped; UserError when empty or longer than :data:`MAX_QUERY_CHARS`."""
  text = (text or "").strip()
  if not text:
    raise UserError("the query is empty; type a caption")
  if len(text) > MAX_QUERY_CHARS:
    raise UserError(f"the query has {len(text)} characters; at most {MAX_QUERY_CHARS} are "
                    "accepted")
  return text


class ThumbnailCollector:
  """Keeps the first stored frame of every video as a small JPEG, batch by batch.

  Given as ``on_video_batch`` to :func:`ncl_jax.inference.embed_split`, so frames are decoded
  once. Frames are uint8 [T, H, W, 3]; features-mode videos have no pictures.
  """

  def __init__(self, pixels: int = THUMBNAIL_PIXELS):
    self.pixels = pixels
    self.jpegs: list[bytes] = []

  def __call__(self, batch: dict[str, np.ndarray]) -> None:
    for video, real in zip(batch["video"], batch["mask"]):
      if real:
        self.jpegs.append(jpeg_thumbnail(video[0], self.pixels))


def jpeg_thumbnail(frame: np.ndarray, pixels: int = THUMBNAIL_PIXELS) -> bytes:
  """JPEG bytes of a uint8 [H, W, 3] frame, its longest side at most ``pixels``."""
  image = Image.fromarray(np.asarray(frame, np.uint8), "RGB")
  image.thumbnail((pixels, pixels))
  out = io.BytesIO()
  image.save(out, format="JPEG", quality=85)
  return out.getvalue()


def positions(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(order, rank) of one score row [N]: best first, equal scores in gallery order (as
  :meth:`ncl_jax.inference.Gallery.search` orders them); ``rank[j]`` is item j's 1-based place."""
  order = np.argsort(-scores, kind="stable")
  rank = np.empty(len(order), np.int64)
  rank[order] = np.arange(1, len(order) + 1)
  return order, rank


@dataclasses.dataclass
class MassTable:
  """Each video's summed retrieval probability over a query set, relative to its expected share.

  Attributes:
    queries: the query set ("bank": the model's training queries; "test": the split's captions).
    num_queries: its size.
    relative: {"plain": [N], "ncl": [N]} mass / expected share (1 = exactly its share).
    error: {"plain": {...}, "ncl": {...}}: :func:`ncl_jax.normalize.normalization_error`'s
      ``mae``/``max`` (absolute deviation from the expected share) and ``relative_mae``/
      ``relative_max`` (of ``|mass / expected - 1|``).
  """

  queries: str
  num_queries: int
  relative: dict[str, np.ndarray]
  error: dict[str, dict[str, float]]


def mass_table(queries: str, sims: np.ndarray, share: np.ndarray, *, logit_scale: float,
               bias: np.ndarray) -> MassTable:
  """:class:`MassTable` of similarities [n_queries, N] before and after adding NCL's ``bias``.

  ``share`` [N] is each video's relative expected share (its caption count); it is scaled to the
  query count, since every query distributes a probability of 1.
  """
  expected = share * (sims.shape[0] / share.sum())
  masses = {"plain": normalize.candidate_mass(sims, scale=logit_scale),
            "ncl": normalize.candidate_mass(sims, scale=logit_scale, bias=bias)}
  error = {}
  for mode, mass in masses.items():
    detail = normalize.normalization_error(mass, expected)
    error[mode] = {key: detail[key] for key in ("mae", "max", "relative_mae", "relative_max")}
  return MassTable(queries, int(sims.shape[0]),
                   {mode: plots.share_ratio(mass, expected) for mode, mass in masses.items()},
                   error)


class Stopwatch:
  """Seconds per named phase, in order (the start-up breakdown the page and docs report)."""

  def __init__(self):
    self.laps: dict[str, float] = {}
    self._last = time.perf_counter()

  def lap(self, name: str) -> None:
    now = time.perf_counter()
    self.laps[name] = self.laps.get(name, 0.0) + now - self._last
    self._last = now


def rank_distribution(ranks: np.ndarray) -> list[int]:
  """Counts of ranks in each of :data:`RANK_GROUPS`."""
  return [int(np.count_nonzero((ranks >= low) & (ranks <= high))) for _, low, high in RANK_GROUPS]


def compile_ahead(bundle, num_texts: int, num_videos: int, share: np.ndarray,
                  batch_size: int) -> None:
  """Compiles what start-up and search run, two at a time, on inputs of zeros.

  Compilation is most of a cold start and each compilation uses one core; run one after the
  other (as embedding the split, then solving Sinkhorn would), the second core idles. The
  shapes are the ones used later (the encoders' batches, the one-query batch of a search,
  the bank x gallery problem through the same :meth:`~ncl_jax.inference.Bundle.gallery`, the
  summed probabilities over the bank and over the split's captions), so the real calls find
  their compiled functions.
  """
  tokens = np.zeros((batch_size, bundle.max_words), np.int32)
  videos = np.zeros((batch_size,) + tuple(bundle.video_shape), bundle.video_dtype)
  frame_mask = np.ones(videos.shape[:2], bool)
  placeholder = np.zeros((num_videos, bundle.embed_dim), np.float32)
  jobs = [lambda: bundle.embed_videos(videos, frame_mask, batch_size),
          lambda: bundle.embed_texts(tokens, batch_size),
          lambda: bundle.embed_texts(tokens[:1], batch_size=1),  # a typed query
          lambda: bundle.gallery(placeholder, expected_share=share).ncl_biases,
          lambda: normalize.candidate_mass(np.zeros((len(bundle.text_bank), num_videos),
                                                    np.float32)),
          lambda: normalize.candidate_mass(np.zeros((num_texts, num_videos), np.float32))]
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    for job in [pool.submit(job) for job in jobs]:
      job.result()


class Explorer:
  """One evaluation split of a trained model, ready to search.

  Args:
    bundle: the model (:class:`ncl_jax.inference.Bundle`).
    eval_data: the split (:class:`ncl_jax.data.EvalData`).
    source: where the model came from, shown on the page (e.g. ``{"workdir": ..., "step": ...}``).
    batch_size: items per encoder call while embedding the split.
  """

  def __init__(self, bundle, eval_data, *, source: dict[str, Any], batch_size: int = 64):
    watch = Stopwatch()
    self.tokenizer = text_tokenizer(bundle)
    self.caption_to_video = np.asarray(eval_data.caption_to_video, np.int64)
    # NCL biases with a video's caption count as its share (as the evaluation does).
    self.share = normalize.expected_mass(len(self.caption_to_video), eval_data.num_videos,
                                         self.caption_to_video, direction="t2v")
    compile_ahead(bundle, len(self.caption_to_video), eval_data.num_videos, self.share,
                  batch_size)
    watch.lap("compile")
    self.bundle = bundle
    self.source = dict(source)
    self.split = eval_data.name
    self.dataset_name = str(bundle.config.data.name)
    frames = bundle.config.model.input_mode == "frames"
    thumbnails = ThumbnailCollector() if frames else None
    self.text_emb, video_emb = inference.embed_split(bundle, eval_data, batch_size,
                                                     on_video_batch=thumbnails)
    self.thumbnails = thumbnails.jpegs if thumbnails else None
    watch.lap("embed split")
    self.num_texts, self.num_videos = len(self.text_emb), len(video_emb)
    self.video_ids = [str(v) for v in (eval_data.video_ids or range(self.num_videos))]
    self.captions = self._caption_texts(eval_data, batch_size)
    self.video_captions = [[] for _ in range(self.num_videos)]
    for caption, video in enumerate(self.caption_to_video):
      self.video_captions[video].append(caption)

    self.gallery = bundle.gallery(video_emb, expected_share=self.share)
    self.biases = self.gallery.ncl_biases
    watch.lap("ncl biases")

    self.tie = str(bundle.config.eval.get("tie", "pessimistic"))
    self.query_ranks = {}
    for mode in NORMALIZATIONS:
      scores = self.gallery.scores(self.text_emb, mode)
      self.query_ranks[mode] = metrics.t2v_ranks(scores, self.caption_to_video, tie=self.tie)
    self.query_metrics = {mode: metrics.metrics_from_ranks(r) for mode, r in
                          self.query_ranks.items()}
    watch.lap("test ranks")

    bank_sims = bundle.text_bank @ video_emb.T
    test_sims = self.text_emb @ video_emb.T
    self.masses = {
        name: mass_table(name, sims, self.share, logit_scale=bundle.logit_scale,
                         bias=self.biases.bias)
        for name, sims in (("bank", bank_sims), ("test", test_sims))}
    watch.lap("masses")
    self.timings = watch.laps

  def _caption_texts(self, eval_data, batch_size: int) -> list[str]:
    if eval_data.captions is not None:
      return [str(c) for c in eval_data.captions]
    if not hasattr(self.tokenizer, "decode"):
      return [f"caption {i}" for i in range(self.num_texts)]
    texts = []
    for batch in eval_data.text_batches(batch_size):
      texts += [self.tokenizer.decode(row) for row in batch["text_tokens"][batch["mask"]]]
    return texts

  # Page data ---------------------------------------------------------------------------------

  def info(self) -> dict[str, Any]:
    """What the page shows in its header: source, split sizes, bank, temperature, examples."""
    example_ids = np.argsort(self.query_ranks["ncl"] - self.query_ranks["plain"],
                             kind="stable")[:3]
    return {
        "source": self.source,
        "dataset": self.dataset_name,
        "split": self.split,
        "input_mode": str(self.bundle.config.model.input_mode),
        "num_videos": self.num_videos,
        "num_texts": self.num_texts,
        "bank_size": int(len(self.bundle.text_bank)),
        "temperature": float(self.bundle.temperature),
        "sinkhorn": {"iterations": int(self.biases.iterations),
                     "error": float(self.biases.error)},
        "thumbnails": self.thumbnails is not None,
        "max_query_chars": MAX_QUERY_CHARS,
        "max_k": MAX_K,
        "example_queries": [self.captions[i] for i in example_ids],
        "startup_seconds": {name: round(seconds, 3) for name, seconds in self.timings.items()},
    }

  def _video(self, index: int) -> dict[str, Any]:
    captions = self.video_captions[index]
    return {"id": self.video_ids[index], "index": int(index),
            "captions": [self.captions[c] for c in captions[:CAPTIONS_PER_ITEM]],
            "num_captions": len(captions),
            "thumbnail": f"/api/thumbnail/{index}" if self.thumbnails is not None else None}

  def embed_query(self, text: str) -> np.ndarray:
    """The L2-normalised embedding [1, E] of a typed query."""
    tokens = self.tokenizer.encode_batch([check_query(text)], self.bundle.max_words)
    return self.bundle.embed_texts(np.asarray(tokens, np.int32), batch_size=1)

  def search(self, text: str | None = None, caption: int | None = None, k: int = 10
             ) -> dict[str, Any]:
    """The top ``k`` videos of a typed query or of caption ``caption`` of the split.

    Returns:
      ``{"query", "k", "plain": [items], "ncl": [items], "ground_truth", "elapsed_ms"}``. An
      item is a video (``id``, ``index``, ``captions``, ``num_captions``, ``thumbnail``) with
      its ``score`` (plain: cosine similarity; ncl: ``cos / temperature + bias``), its ``rank``
      in this column and ``plain_rank`` / ``ncl_rank`` (its place in both rankings, for the
      rank change). ``ground_truth`` (caption queries only) names the caption's video and its
      ranks; its items carry ``"ground_truth": true``.

    Raises:
      UserError: neither or both of ``text`` and ``caption``, an unknown caption, an empty or
        too long query, a word the tokenizer does not know.
    """
    started = time.perf_counter()
    if (text is None) == (caption is None):
      raise UserError("give either a query text or a caption index")
    k = int(k)
    if not 1 <= k <= MAX_K:
      raise UserError(f"k must lie in [1, {MAX_K}], got {k}")
    k = min(k, self.num_videos)
    if caption is not None:
      caption = int(caption)
      if not 0 <= caption < self.num_texts:
        raise UserError(f"caption must lie in [0, {self.num_texts - 1}], got {caption}")
      query, text = self.text_emb[caption][None, :], self.captions[caption]
    else:
      query = self.embed_query(text)
      text = check_query(text)
    scores, orders, ranks = {}, {}, {}
    for mode in NORMALIZATIONS:
      scores[mode] = self.gallery.scores(query, mode)[0]
      orders[mode], ranks[mode] = positions(scores[mode])
    gt = None if caption is None else int(self.caption_to_video[caption])
    out: dict[str, Any] = {"query": text, "k": k}
    for mode in NORMALIZATIONS:
      column = []
      for place, index in enumerate(orders[mode][:k]):
        item = self._video(index)
        item.update(score=float(scores[mode][index]), rank=place + 1,
                    plain_rank=int(ranks["plain"][index]), ncl_rank=int(ranks["ncl"][index]))
        if gt is not None:
          item["ground_truth"] = bool(index == gt)
        column.append(item)
      out[mode] = column
    out["ground_truth"] = None
    if gt is not None:
      out["ground_truth"] = {"caption": caption, **self._video(gt),
                             "plain_rank": float(self.query_ranks["plain"][caption]),
                             "ncl_rank": float(self.query_ranks["ncl"][caption])}
    out["elapsed_ms"] = round(1000.0 * (time.perf_counter() - started), 3)
    return out

  def queries(self, offset: int = 0, limit: int = 200, contains: str = "",
              order: str = "index") -> dict[str, Any]:
    """The split's captions with their ground truth's plain and NCL rank, and the rank
    distribution and metrics over the whole split.

    Args:
      offset, limit: the page of matching captions (limit at most :data:`MAX_QUERIES_PAGE`).
      contains: keep captions containing this text (case-insensitive).
      order: "index" (split order), "improved" (largest rank gain under NCL first) or
        "worsened" (largest loss first).
    """
    if order not in ("index", "improved", "worsened"):
      raise UserError(f"order must be index, improved or worsened, got {order!r}")
    if not 0 < limit <= MAX_QUERIES_PAGE or offset < 0:
      raise UserError(f"limit must lie in [1, {MAX_QUERIES_PAGE}] and offset be >= 0")
    if len(contains) > MAX_QUERY_CHARS:
      raise UserError(f"contains has more than {MAX_QUERY_CHARS} characters")
    plain, ncl = self.query_ranks["plain"], self.query_ranks["ncl"]
    selected = np.arange(self.num_texts)
    if contains.strip():
      needle = contains.strip().lower()
      selected = np.array([i for i in selected if needle in self.captions[i].lower()], np.int64)
    if order != "index" and len(selected):
      gain = (plain - ncl)[selected]
      selected = selected[np.argsort(-gain if order == "improved" else gain, kind="stable")]
    page = selected[offset:offset + limit]
    return {
        "split": self.split, "total": self.num_texts, "matched": int(len(selected)),
        "offset": int(offset), "tie": self.tie,
        "queries": [{"index": int(i), "text": self.captions[i],
                     "video": self.video_ids[self.caption_to_video[i]],
                     "plain_rank": float(plain[i]), "ncl_rank": float(ncl[i])} for i in page],
        "metrics": self.query_metrics,
        "rank_distribution": {"groups": [label for label, _, _ in RANK_GROUPS],
                              "plain": rank_distribution(plain), "ncl": rank_distribution(ncl)},
    }

  def hubs(self, k: int = 20, over: str = "test", order: str = "desc") -> dict[str, Any]:
    """Videos by summed retrieval probability relative to their expected share.

    Args:
      k: videos per list.
      over: "test" (the split's captions: new queries, the informative view) or "bank" (the
        model's training queries, which NCL balances by construction).
      order: "desc" (hubs first) or "asc" (the least retrieved first).

    Returns:
      ``{"over", "num_queries", "plain": [items], "ncl": [items], "histogram": {"edges",
      "plain", "ncl"}, "error", "hubs", "orphans"}``: the ``k`` videos with the largest (or
      smallest) relative mass before and after normalization, each with ``plain`` and ``ncl``
      relative masses and its place in both orders; histograms of the relative masses over
      shared bins; the normalization error; how many videos get more than twice
      (``hubs``) or less than half (``orphans``) their share.
    """
    if over not in HUB_QUERY_SETS:
      raise UserError(f"over must be one of {', '.join(HUB_QUERY_SETS)}, got {over!r}")
    if order not in ("desc", "asc"):
      raise UserError(f"order must be desc or asc, got {order!r}")
    k = int(k)
    if not 1 <= k <= MAX_K:
      raise UserError(f"k must lie in [1, {MAX_K}], got {k}")
    table = self.masses[over]
    ranks = {mode: positions(table.relative[mode])[1] for mode in NORMALIZATIONS}
    out: dict[str, Any] = {"over": over, "num_queries": table.num_queries, "order": order}
    for mode in NORMALIZATIONS:
      values = table.relative[mode]
      order_ids = np.argsort(values if order == "asc" else -values, kind="stable")[:k]
      out[mode] = [{**self._video(j), "plain": float(table.relative["plain"][j]),
                    "ncl": float(table.relative["ncl"][j]), "plain_rank": int(ranks["plain"][j]),
                    "ncl_rank": int(ranks["ncl"][j])} for j in order_ids]
    top = max(2.0, float(max(v.max() for v in table.relative.values())))
    edges = np.linspace(0.0, top, HISTOGRAM_BINS + 1)
    out["histogram"] = {"edges": edges.tolist(),
                        **{mode: np.histogram(table.relative[mode], edges)[0].tolist()
                           for mode in NORMALIZATIONS}}
    out["error"] = table.error
    out["hubs"] = {mode: int(np.count_nonzero(v > 2.0)) for mode, v in table.relative.items()}
    out["orphans"] = {mode: int(np.count_nonzero(v < 0.5)) for mode, v in table.relative.items()}
    return out

  def thumbnail(self, index: int) -> bytes:
    """JPEG of video ``index``'s first stored frame (frames mode only)."""
    if self.thumbnails is None:
      raise UserError("this model reads features, not frames: its videos have no thumbnails")
    if not 0 <= index < self.num_videos:
      raise UserError(f"video index must lie in [0, {self.num_videos - 1}], got {index}")
    return self.thumbnails[index]


def open_explorer(*, workdir: str | None = None, bundle_dir: str | None = None,
                  split: str = "test", data_dir: str | None = None,
                  progress: Callable[[str], None] | None = None) -> Explorer:
  """Loads a run's selected checkpoint (or a bundle) and its data set's ``split``.

  Raises:
    UserError: see :func:`check_run` / :func:`check_bundle`; an unknown split; missing data.
  """
  say = progress or (lambda _: None)
  watch = Stopwatch()
  if (workdir is None) == (bundle_dir is None):
    raise UserError("pass exactly one of --workdir and --bundle")
  if workdir is not None:
    path = check_run(workdir)
    say(f"loading the selected checkpoint of {path}")
    bundle = inference.bundle_from_run(path)
    source = {"workdir": str(path), "step": int(bundle.manifest["step"])}
  else:
    path = check_bundle(bundle_dir)
    say(f"loading bundle {path}")
    bundle = inference.load_bundle(path)
    source = {"bundle": str(path), "step": bundle.manifest.get("step")}
  watch.lap("load model")
  if data_dir:
    bundle.config.data.data_dir = data_dir
  if bundle.config.data.name == "synthetic":
    # Only the split to show: generating the whole synthetic set would take 5x as long.
    eval_data = EvalData(synthetic.make_split(bundle.config.data, split), split)
  else:
    eval_data = get_dataset(bundle.config.data, bundle.tokenizer).eval_data(split)
  watch.lap("open split")
  say(f"embedding {eval_data.num_texts} captions and {eval_data.num_videos} videos of "
      f"{bundle.config.data.name} {split}")
  explorer = Explorer(bundle, eval_data, source=source)
  explorer.timings = {**watch.laps, **explorer.timings}
  return explorer


__all__ = ["Explorer", "MAX_K", "MAX_QUERY_CHARS", "check_bundle", "check_run", "check_query",
           "open_explorer", "positions"]
