"""Histograms of each candidate's summed retrieval probability, before and after normalization.

The figure mirrors NCL's Fig. 2: for a contrastively trained model most videos receive far more
or far less than their fair share of the retrieval probability summed over all text queries;
after normalization the histogram collapses onto the share. The x axis is ``mass / expected``
(1 = the candidate gets exactly its share), so multi-caption data, where shares differ per
candidate and per direction, reads like one-to-one data; the count axis is logarithmic so the
few hubs in the tail stay visible beside the bulk.

matplotlib is imported only when a plot is drawn, and only through its object-oriented API with
the Agg canvas, so importing this module neither needs matplotlib nor changes a caller's
pyplot backend.
"""

from __future__ import annotations

import os

import numpy as np

from ncl_jax import npy_files


def share_ratio(mass, expected) -> np.ndarray:
  """``mass / expected`` per candidate, [n_candidates] float64 (1 = exactly its share)."""
  mass = np.asarray(mass, np.float64)
  return mass / np.broadcast_to(np.asarray(expected, np.float64), mass.shape)


def plot_mass_histograms(path: str | os.PathLike, before, after, expected, *,
                         labels: tuple[str, str] = ("before", "after"), bins: int = 50,
                         title: str | None = None) -> None:
  """Writes a PNG with two histograms of ``mass / expected`` per candidate.

  Args:
    path: output file (.png); an existing file is not overwritten.
    before: [n_candidates] summed retrieval probability before normalization.
    after: [n_candidates] the same after normalization.
    expected: scalar or [n_candidates] expected share (positive).
    labels: panel titles.
    bins: histogram bins, shared by both panels.
    title: figure title.

  Raises:
    UserError: ``path`` exists (it is never overwritten).
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  ratios = (share_ratio(before, expected), share_ratio(after, expected))
  low = min(0.0, *(r.min() for r in ratios))
  high = max(2.0, *(r.max() for r in ratios))
  edges = np.linspace(low, high, bins + 1)

  fig = Figure(figsize=(9, 3.6), dpi=110)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2, sharex=True)  # own y ranges: the "after" spike would flatten "before"
  for ax, ratio, label in zip(axes, ratios, labels):
    ax.hist(ratio, bins=edges, color="tab:blue", alpha=0.8)
    ax.set_yscale("log")  # hubs are a handful of candidates far right of the bulk
    ax.axvline(1.0, color="tab:red", linestyle="--", label="expected share")
    relative = float(np.mean(np.abs(ratio - 1.0)))
    ax.set_title(f"{label} (mean |mass/expected - 1| {relative:.3g})", fontsize="medium")
    ax.set_xlabel("summed retrieval probability / expected share")
    ax.legend(loc="upper right", fontsize="small")
  axes[0].set_ylabel("number of candidates (log)")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  npy_files.save_new(path, lambda temporary: fig.savefig(temporary, format="png"))
