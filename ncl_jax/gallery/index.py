"""Serving NCL-normalized search from a FAISS inner-product index with the biases folded in.

NCL ranks gallery item ``j`` for query ``q`` by ``q . v_j / T + g_j``. Storing each item as
``[v_j, T (g_j - c)]`` and querying with ``[q, 1]`` makes the index's inner product
``T (q . v_j / T + g_j) - T c``: the same ranking for any constant ``c`` (the biases' mean is
used, which keeps the extra coordinate small). An exact (``flat``) index therefore returns
exactly the NCL ranking, and an approximate one (``ivf``, ``hnsw``) approximates it with no
change to the query path. Returned scores are mapped back to ``q . v / T + g``.

"Exactly the NCL ranking" holds up to ties, under this rule: items whose NCL scores are equal,
or closer than the float32 rounding of the folded product (at most ``(D + 1) 2**-24 (|q| |v| +
T |g - c|) / T`` in logits, about 1.6e-3 at D = 256, T = 0.01, ``|g - c| <= 5``), may come in
any order among themselves. FAISS does not promise an order for tied scores (its flat search
returned exact ties highest id first in a check here), whereas a stable ``argsort`` of the
float64 scores puts the lower id first; the returned ids differ from that only within such
groups, and the scores at each rank agree.

An index folder holds ``index.faiss`` and ``manifest.json``: format, kind, temperature,
dimension, gallery size, the bias offset, search parameters, fingerprints of the gallery and the
biases, and a digest of ``index.faiss`` itself, so that a changed file, queries of another
dimension, or a check against a different gallery are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import numpy as np

from ncl_jax import npy_files
from ncl_jax.errors import UserError
from ncl_jax.gallery import inputs

INDEX_FORMAT = "ncl_jax-gallery-index-v1"
INDEX_FILE = "index.faiss"
MANIFEST_FILE = "manifest.json"
KINDS = ("flat", "ivf", "hnsw")
_ADD_ROWS = 65536
_SEARCH_ROWS = 4096
# IVF training uses at most this many items per list (faiss's own guidance is >= 39).
_TRAIN_PER_LIST = 64


def fold_items(items, bias, temperature: float, offset: float) -> np.ndarray:
  """``[v, T (g - offset)]`` [n, D + 1] float32 from items [n, D] and their biases [n]."""
  extra = (np.asarray(bias, np.float64) - offset) * temperature
  return np.concatenate([np.asarray(items, np.float32), extra.astype(np.float32)[:, None]],
                        axis=1)


def fold_queries(queries) -> np.ndarray:
  """``[q, 1]`` [n, D + 1] float32."""
  queries = np.asarray(queries, np.float32)
  return np.concatenate([queries, np.ones((len(queries), 1), np.float32)], axis=1)


def _file_digest(path: pathlib.Path) -> str:
  digest = hashlib.blake2b(digest_size=16)
  with open(path, "rb") as handle:
    for block in iter(lambda: handle.read(1 << 24), b""):
      digest.update(block)
  return digest.hexdigest()


def default_nlist(n_items: int) -> int:
  """IVF lists: about 4 sqrt(N), with at least 39 items per list for training."""
  return int(max(1, min(round(4 * np.sqrt(n_items)), n_items // 39)))


class BiasedIndex:
  """A FAISS index over bias-folded gallery vectors, and its manifest.

  Build with :meth:`build`, persist with :meth:`save`, reopen with :meth:`load`.
  """

  def __init__(self, index, manifest: dict):
    self.index = index
    self.manifest = manifest
    self._apply_search_parameters()

  @property
  def dim(self) -> int:
    return int(self.manifest["dim"])

  def __len__(self) -> int:
    return int(self.manifest["size"])

  @classmethod
  def build(cls, gallery, bias, *, temperature: float, kind: str = "flat",
            nlist: int | None = None, nprobe: int | None = None, hnsw_m: int = 32,
            ef_search: int = 128) -> "BiasedIndex":
    """Indexes ``gallery`` [Ng, D] (array or memmap) with biases [Ng].

    Args:
      gallery: L2-normalised items.
      bias: NCL biases (zeros and ``temperature = 1`` give plain cosine search).
      temperature: the logit temperature the biases were computed at.
      kind: "flat" (exact), "ivf" (inverted lists, ``nlist`` lists, ``nprobe`` searched) or
        "hnsw" (graph with ``hnsw_m`` links, ``ef_search`` candidates per search).
    """
    import faiss  # pylint: disable=g-import-not-at-top
    if kind not in KINDS:
      raise UserError(f"index kind must be one of {KINDS}, got {kind!r}")
    n_items, dim = gallery.shape
    bias = np.asarray(bias, np.float64)
    if bias.shape != (n_items,) or not np.all(np.isfinite(bias)):
      raise UserError(f"biases must be {n_items} finite numbers (one per gallery item), got "
                      f"shape {bias.shape}")
    if not temperature > 0:
      raise UserError(f"temperature must be positive, got {temperature}")
    offset = float(bias.mean())
    params: dict = {}
    if kind == "flat":
      index = faiss.IndexFlatIP(dim + 1)
    elif kind == "ivf":
      params["nlist"] = int(nlist or default_nlist(n_items))
      params["nprobe"] = int(nprobe or max(1, params["nlist"] // 32))
      index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim + 1), dim + 1, params["nlist"],
                                 faiss.METRIC_INNER_PRODUCT)
      sample = np.sort(np.random.default_rng(0).choice(
          n_items, min(n_items, _TRAIN_PER_LIST * params["nlist"]), replace=False))
      index.train(fold_items(gallery[sample], bias[sample], temperature, offset))
    else:
      params.update(hnsw_m=int(hnsw_m), ef_search=int(ef_search))
      index = faiss.IndexHNSWFlat(dim + 1, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
    for start in range(0, n_items, _ADD_ROWS):
      stop = min(start + _ADD_ROWS, n_items)
      index.add(fold_items(gallery[start:stop], bias[start:stop], temperature, offset))
    manifest = {
        "format": INDEX_FORMAT, "kind": kind, "temperature": float(temperature), "dim": int(dim),
        "size": int(n_items), "bias_offset": offset, "params": params,
        "gallery_fingerprint": inputs.fingerprint(gallery),
        "bias_fingerprint": inputs.fingerprint(bias.astype(np.float32)),
        "faiss_version": faiss.__version__}
    return cls(index, manifest)

  def set_search_parameters(self, *, nprobe: int | None = None,
                            ef_search: int | None = None) -> None:
    """Changes how much an approximate index searches (ivf: ``nprobe``; hnsw: ``ef_search``)."""
    params = dict(self.manifest["params"])
    for name, value in (("nprobe", nprobe), ("ef_search", ef_search)):
      if value is None:
        continue
      if name not in params:
        raise UserError(f"{name} does not apply to the {self.manifest['kind']} index")
      if value < 1:
        raise UserError(f"{name} must be positive, got {value}")
      params[name] = int(value)
    self.manifest = dict(self.manifest, params=params)
    self._apply_search_parameters()

  def _apply_search_parameters(self) -> None:
    import faiss  # pylint: disable=g-import-not-at-top
    params = self.manifest.get("params", {})
    if "nprobe" in params:
      faiss.extract_index_ivf(self.index).nprobe = params["nprobe"]
    if "ef_search" in params:
      self.index.hnsw.efSearch = params["ef_search"]

  def save(self, path: str | os.PathLike) -> None:
    """Writes the index folder ``path``, which must not exist; nothing is left on failure."""
    import faiss  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(path)
    npy_files.check_new_output(str(path), "index folder")
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
      temporary.mkdir()
      faiss.write_index(self.index, str(temporary / INDEX_FILE))
      manifest = dict(self.manifest, index_digest=_file_digest(temporary / INDEX_FILE))
      (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")
      if path.exists():
        raise UserError(f"{path} appeared while writing; the index was not saved over it")
      temporary.rename(path)
      self.manifest = manifest
    finally:
      if temporary.exists():
        shutil.rmtree(temporary)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "BiasedIndex":
    """Opens an index folder, refusing other formats and a changed ``index.faiss``."""
    import faiss  # pylint: disable=g-import-not-at-top
    path = pathlib.Path(path)
    manifest_path, index_path = path / MANIFEST_FILE, path / INDEX_FILE
    if not manifest_path.is_file() or not index_path.is_file():
      raise UserError(f"{path} is not a gallery index folder (it needs {MANIFEST_FILE} and "
                      f"{INDEX_FILE}); build one with python -m ncl_jax.gallery index")
    try:
      manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as err:
      raise UserError(f"{manifest_path} is not valid JSON ({err})") from None
    if manifest.get("format") != INDEX_FORMAT:
      raise UserError(f"{manifest_path} has format {manifest.get('format')!r}; this ncl_jax "
                      f"reads {INDEX_FORMAT!r}")
    if _file_digest(index_path) != manifest.get("index_digest"):
      raise UserError(f"{index_path} changed after its manifest was written (digest mismatch); "
                      "rebuild the index")
    index = faiss.read_index(str(index_path))
    if index.ntotal != manifest["size"] or index.d != manifest["dim"] + 1:
      raise UserError(f"{index_path} holds {index.ntotal} vectors of dimension {index.d}, its "
                      f"manifest says {manifest['size']} of {manifest['dim'] + 1}; rebuild it")
    return cls(index, manifest)

  def check_gallery(self, gallery, bias=None) -> None:
    """Refuses a gallery (or biases) other than the one this index was built from."""
    if tuple(gallery.shape) != (len(self), self.dim) or (
        inputs.fingerprint(gallery) != self.manifest["gallery_fingerprint"]):
      raise UserError(f"this index was built from another gallery (it has {len(self)} items of "
                      f"dimension {self.dim}, fingerprint "
                      f"{self.manifest['gallery_fingerprint'][:12]}); rebuild it for this one")
    if bias is not None and inputs.fingerprint(np.asarray(bias, np.float32)) != (
        self.manifest["bias_fingerprint"]):
      raise UserError("this index was built with other biases; rebuild it with these")

  def search(self, queries, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The top ``k`` items per query: (indices int64 [Nq, k], scores float32 [Nq, k]).

    Scores are ``q . v / T + g`` (cosine for a plain index), best first. An approximate
    index that finds fewer than ``k`` items pads with index -1 and score -inf.
    """
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.ndim != 2 or queries.shape[1] != self.dim:
      raise UserError(f"queries must be [N, {self.dim}] to match the index, got shape "
                      f"{queries.shape}")
    if not 1 <= k <= len(self):
      raise UserError(f"k must lie in [1, {len(self)}] (the gallery size), got {k}")
    temperature, offset = self.manifest["temperature"], self.manifest["bias_offset"]
    indices = np.empty((len(queries), k), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), _SEARCH_ROWS):
      found, ids = self.index.search(fold_queries(queries[start:start + _SEARCH_ROWS]), k)
      rows = slice(start, start + len(ids))
      indices[rows] = ids
      scores[rows] = np.where(ids >= 0, found / np.float32(temperature) + np.float32(offset),
                              -np.inf)
    return indices, scores
