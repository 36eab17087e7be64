"""Histograms of each candidate's summed retrieval probability, before and after normalization.

The figure mirrors NCL's Fig. 2: for a contrastively trained model most videos receive far more
or far less than their fair share (1 for one caption per video) of the retrieval probability
summed over all text queries; after normalization the histogram collapses onto the share.

matplotlib is imported only when a plot is drawn, and only through its object-oriented API with
the Agg canvas, so importing this module neither needs matplotlib nor changes a caller's
pyplot backend.
"""

from __future__ import annotations

import os

import numpy as np


def plot_mass_histograms(path: str | os.PathLike, before, after, expected, *,
                         labels: tuple[str, str] = ("before", "after"), bins: int = 50,
                         title: str | None = None) -> None:
  """Writes a PNG with two histograms of summed retrieval probability per candidate.

  Args:
    path: output file (.png); an existing file is not overwritten.
    before: [n_candidates] summed retrieval probability before normalization.
    after: [n_candidates] the same after normalization.
    expected: scalar or [n_candidates] expected share, drawn as a vertical line (its mean).
    labels: panel titles.
    bins: histogram bins, shared by both panels.
    title: figure title.

  Raises:
    FileExistsError: ``path`` exists.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  before = np.asarray(before, np.float64)
  after = np.asarray(after, np.float64)
  share = float(np.mean(expected))
  low = min(before.min(), after.min(), share)
  high = max(before.max(), after.max(), share)
  edges = np.linspace(low, high if high > low else low + 1.0, bins + 1)

  fig = Figure(figsize=(9, 3.6), dpi=110)
  FigureCanvasAgg(fig)
  axes = fig.subplots(1, 2, sharex=True)  # own y scales: the "after" spike would flatten "before"
  for ax, values, label in zip(axes, (before, after), labels):
    ax.hist(values, bins=edges, color="tab:blue", alpha=0.8)
    ax.axvline(share, color="tab:red", linestyle="--", label=f"expected share {share:.3g}")
    mae = float(np.mean(np.abs(values - np.asarray(expected, np.float64))))
    ax.set_title(f"{label} (mean |error| {mae:.3g})")
    ax.set_xlabel("summed retrieval probability per candidate")
    ax.legend(loc="upper right", fontsize="small")
  axes[0].set_ylabel("number of candidates")
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  # Exclusive creation: the caller's files are never overwritten.
  with open(path, "xb") as handle:
    fig.savefig(handle, format="png")
