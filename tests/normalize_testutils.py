"""Similarity matrices with hubs, shared by the normalizer and selection tests."""

import numpy as np


def hub_sims(rng, n_rows, n_cols, dim=16):
  """Cosine similarities [n_rows, n_cols] where some candidates are hubs (near a shared direction)."""
  hubness = 2 * rng.random((n_cols, 1))
  cands = rng.standard_normal((n_cols, dim)) + hubness * rng.standard_normal(dim)
  cands /= np.linalg.norm(cands, axis=1, keepdims=True)
  queries = rng.standard_normal((n_rows, dim))
  queries /= np.linalg.norm(queries, axis=1, keepdims=True)
  return (queries @ cands.T).astype(np.float32)
