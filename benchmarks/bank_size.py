"""When does a bank help? Inductive gain of each normalizer against the bank's size.

Run from the repository root::

  python benchmarks/bank_size.py [--data ../shared/data/msrvtt_cap4video] [--plot docs/bank_size.png]
      [--json OUT] [--seeds 3]

Two studies, both leak-free (a bank's own answers are never in the gallery):

* **Synthetic embeddings** (banks can be large). No model is trained (2 shared CPU cores): the
  embeddings are drawn directly from the generative story of :mod:`ncl_jax.data.synthetic` at
  the embedding level: concept directions with Zipf-like popularity, a video = its concepts +
  an attribute + a common offset + noise with a per-video scale (clean and noisy clips, so
  central videos become hubs), a caption = a random subset of its video's concepts (+ the
  attribute half the time) + noise. Test: 500 videos with one caption each. Banks: captions of
  *other* (training) videos, 0.5x to 64x the gallery (t2v), and those training videos (v2t,
  against the test captions). DualIS's gallery-side banks are the same training videos scored
  against the test videos (t2v) and the training captions against the test captions (v2t).
* **Real matrices**: the halves split of benchmarks/fair_normalizers.py (test = pairs 500-999),
  random sub-banks of 50-500 of the other captions / videos.

Every method at its published defaults (strength 1; NNN's k capped at the bank's size). Gains
are test R@1 minus plain, in points, mean over the seeds. T = 0.01, pessimistic ties.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from ncl_jax import metrics  # noqa: E402  pylint: disable=g-import-not-at-top
from ncl_jax import normalize as nz  # noqa: E402  pylint: disable=g-import-not-at-top
import fair_normalizers as fair  # noqa: E402  pylint: disable=g-import-not-at-top

TEMPERATURE = 0.01
GALLERY = 500
MULTIPLES = (0.5, 1, 4, 16, 64)
REAL_SIZES = (50, 100, 200, 500)
METHODS = ("ncl", "qbnorm", "is", "csls", "nnn", "dn", "dualis")


class World:
  """Embedding-level sampler of the synthetic set's generative story (see the docstring)."""

  def __init__(self, seed: int, dim: int = 64, concepts: int = 200, attributes: int = 20,
               zipf: float = 1.0):
    rng = np.random.default_rng(seed)
    self.rng = rng
    self.concepts = _unit(rng.standard_normal((concepts, dim)))
    self.attributes = _unit(rng.standard_normal((attributes, dim)))
    self.offset = 0.8 * _unit(rng.standard_normal(dim))
    popularity = (np.arange(concepts) + 1.0) ** -zipf
    self.popularity = popularity / popularity.sum()

  def pairs(self, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` (caption, video) embedding pairs, unit norm, [n, dim] each."""
    rng, dim = self.rng, self.concepts.shape[1]
    text, video = np.empty((n, dim)), np.empty((n, dim))
    for i in range(n):
      shown = rng.choice(len(self.concepts), size=rng.integers(1, 4), replace=False,
                         p=self.popularity)
      attribute = self.attributes[rng.integers(len(self.attributes))]
      noise = rng.lognormal(0.0, 0.5)  # per-video noise scale: clean and noisy clips
      video[i] = (self.concepts[shown].sum(0) + 0.7 * attribute + self.offset +
                  noise * rng.standard_normal(dim) / np.sqrt(dim))
      named = shown[rng.random(len(shown)) < 0.7]
      named = shown[:1] if len(named) == 0 else named
      text[i] = (self.concepts[named].sum(0) + (0.7 * attribute if rng.random() < 0.5 else 0) +
                 1.2 * rng.standard_normal(dim) / np.sqrt(dim))
    return _unit(text), _unit(video)


def _unit(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _gain(queries, bank, method: str, plain: float, gallery_bank=None) -> float:
  options = dict(fair.DEFAULTS.get(method, {}))
  if method == "nnn":
    options["k"] = min(options["k"], bank.shape[0])
  scores = nz.normalize(queries, method, bank, temperature=TEMPERATURE,
                        gallery_bank=gallery_bank, **options)
  return metrics.t2v_metrics(scores)["R@1"] - plain


def synthetic(seeds: int) -> dict:
  """Gain per method, direction and bank multiple: {method: {direction: {multiple: [gains]}}}."""
  out = {m: {"t2v": {}, "v2t": {}} for m in METHODS}
  plain_r1 = {"t2v": [], "v2t": []}
  for seed in range(seeds):
    world = World(seed)
    test_t, test_v = world.pairs(GALLERY)
    train_t, train_v = world.pairs(int(max(MULTIPLES) * GALLERY))
    problems = {"t2v": (test_t @ test_v.T, train_t, train_v, test_v, test_v),
                "v2t": (test_v @ test_t.T, train_v, train_t, test_t, test_t)}
    for direction, (queries, bank_side, other_side, candidates, _) in problems.items():
      queries = queries.astype(np.float32)
      plain = metrics.t2v_metrics(queries)["R@1"]
      plain_r1[direction].append(plain)
      for multiple in MULTIPLES:
        n = int(multiple * GALLERY)
        bank = (bank_side[:n] @ candidates.T).astype(np.float32)
        # DualIS's gallery side: items of the candidates' modality against the candidates.
        gallery_bank = (other_side[:n] @ candidates.T).astype(np.float32)
        for method in METHODS:
          gain = _gain(queries, bank, method, plain,
                       gallery_bank if nz.normalizer(method).gallery_bank else None)
          out[method][direction].setdefault(str(multiple), []).append(gain)
  return {"gain": out, "plain": plain_r1}


def real(path: str, seeds: int) -> dict:
  """Gain per method, direction and sub-bank size on one real matrix's halves split."""
  sims = np.load(path)
  splits = fair.leak_free(sims, np.arange(500, 1000), np.arange(500))
  out = {m: {"t2v": {}, "v2t": {}} for m in METHODS if m != "dualis"}
  for direction, split in splits.items():
    plain = metrics.t2v_metrics(split.queries)["R@1"]
    for size in REAL_SIZES:
      for seed in range(seeds):
        rows = np.sort(np.random.default_rng(seed).permutation(500)[:size])
        for method in out:
          out[method][direction].setdefault(str(size), []).append(
              _gain(split.queries, split.bank[rows], method, plain))
  return out


def plot(path: str, results: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
  for ax, direction in zip(axes[:2], ("t2v", "v2t")):
    for method, per in results["synthetic"]["gain"].items():
      means = [np.mean(per[direction][str(m)]) for m in MULTIPLES]
      ax.plot(MULTIPLES, means, marker="o", label=method)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bank size / gallery size")
    ax.set_ylabel("R@1 gain over plain (points)")
    ax.set_title(f"synthetic embeddings, {direction} (gallery {GALLERY}, "
                 f"{len(results['synthetic']['plain'][direction])} seeds)")
  ax = axes[2]
  colours = {m: f"C{i}" for i, m in enumerate(METHODS)}  # the same colour per method as left
  for name, per_matrix in results["real"].items():
    for method in per_matrix:
      means = [np.mean(per_matrix[method]["t2v"][str(s)]) for s in REAL_SIZES]
      ax.plot(REAL_SIZES, means, marker="o", ls="-" if name == "video" else "--",
              color=colours[method], label=f"{method} ({name})")
  ax.axhline(0, color="black", lw=0.8)
  ax.set_xscale("log")
  ax.set_xticks(REAL_SIZES, [str(s) for s in REAL_SIZES])
  ax.minorticks_off()
  ax.set_xlabel("bank captions (gallery: 500 videos)")
  ax.set_title("real MSR-VTT halves split, t2v")
  axes[0].legend(fontsize=8)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def markdown(results: dict) -> str:
  lines = ["**Synthetic embeddings** (gallery 500; R@1 gain over plain in points, mean over "
           f"{len(results['synthetic']['plain']['t2v'])} seeds, t2v / v2t; plain R@1 "
           f"{np.mean(results['synthetic']['plain']['t2v']):.1f} / "
           f"{np.mean(results['synthetic']['plain']['v2t']):.1f}):", "",
           "| method | " + " | ".join(f"{m:g}×" for m in MULTIPLES) + " |",
           "| --- " * (len(MULTIPLES) + 1) + "|"]
  for method, per in results["synthetic"]["gain"].items():
    lines.append(f"| {method} | " + " | ".join(
        f"{np.mean(per['t2v'][str(m)]):+.1f} / {np.mean(per['v2t'][str(m)]):+.1f}"
        for m in MULTIPLES) + " |")
  lines += ["", "**Real matrices, leak-free halves** (gallery 500; random sub-banks; R@1 gain "
            "over plain, mean over the seeds, t2v / v2t):", "",
            "| matrix | method | " + " | ".join(str(s) for s in REAL_SIZES) + " |",
            "| --- " * (len(REAL_SIZES) + 2) + "|"]
  for name, per_matrix in results["real"].items():
    for method, per in per_matrix.items():
      lines.append(f"| {name} | {method} | " + " | ".join(
          f"{np.mean(per['t2v'][str(s)]):+.1f} / {np.mean(per['v2t'][str(s)]):+.1f}"
          for s in REAL_SIZES) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "msrvtt_cap4video"))
  parser.add_argument("--plot", help="PNG of the gain curves (not overwritten)")
  parser.add_argument("--json", help="the numbers (not overwritten)")
  parser.add_argument("--seeds", type=int, default=3)
  parser.add_argument("--replot", metavar="JSON",
                      help="draw --plot from an earlier run's --json instead of measuring")
  args = parser.parse_args()
  for path in (args.plot, args.json):
    if path and os.path.exists(path):
      raise SystemExit(f"error: {path} exists; choose a new file name")
  if args.replot:
    with open(args.replot, encoding="utf-8") as handle:
      plot(args.plot, json.load(handle))
    return
  start = time.time()
  results = {"synthetic": synthetic(args.seeds),
             "real": {name: real(os.path.join(args.data, file), args.seeds)
                      for name, file in fair.MATRICES.items()}}
  print(markdown(results))
  print(f"\n({time.time() - start:.0f} s; load average {os.getloadavg()[0]:.1f})")
  if args.plot:
    plot(args.plot, results)
  if args.json:
    with open(args.json, "x", encoding="utf-8") as handle:
      json.dump(results, handle, indent=2, default=float)


if __name__ == "__main__":
  main()
