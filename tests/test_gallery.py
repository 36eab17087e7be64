"""ncl_jax.gallery: NCL biases from embeddings (dense on 1/4 devices and 2 processes, sparse with
a certified bound), the bias-folded FAISS index, Gallery's large-gallery paths, and the CLI."""

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from ncl_jax import inference, normalize, sharding, streaming
from ncl_jax.errors import UserError
from ncl_jax.gallery import cli, dense, inputs, search, solve, sparse, sparse_mesh
from ncl_jax.gallery import index as index_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _unit(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _problem(rng, n_bank=300, n_items=37, dim=16):
  """Clustered embeddings: items share a few directions, so some items are hubs."""
  centres = rng.normal(size=(4, dim))
  items = _unit(centres[rng.integers(0, 4, n_items)] + 0.8 * rng.normal(size=(n_items, dim)))
  bank = _unit(centres[rng.integers(0, 4, n_bank)] + 1.0 * rng.normal(size=(n_bank, dim)))
  return bank, items


def _centred(g):
  g = np.asarray(g, np.float64)
  return g - g.mean()


def _dense_probs(bank, items, bias, temperature):
  """float64 softmax over all items of each bank row [Nb, Ng]: the reference plan."""
  logits = bank.astype(np.float64) @ items.T.astype(np.float64) / temperature + bias
  logits -= logits.max(axis=1, keepdims=True)
  p = np.exp(logits)
  return p / p.sum(axis=1, keepdims=True)


def _reference_column_sums(scores, index, scale, bias, n_items, levels=None):
  """The sparse plan's column sums from its definition, as a dense float64 [r, n] matrix: row i
  keeps its K logits ``scale s + g`` and gives every other item ``L_i + g_j`` (``L_i`` the K-th
  kept logit by default: the clipped matrix)."""
  scores = np.asarray(scores, np.float64) * scale
  g = np.asarray(bias, np.float64)
  level = scores.min(axis=1) if levels is None else np.asarray(levels, np.float64)
  logits = level[:, None] + g[None, :]
  np.put_along_axis(logits, index.astype(np.int64), scores + g[index], axis=1)
  logits -= logits.max(axis=1, keepdims=True)
  plan = np.exp(logits)
  return (plan / plan.sum(axis=1, keepdims=True)).sum(axis=0)


def _omitted_probability(probs, kept):
  """Each row's probability outside its kept items, summed directly (no 1 - kept cancellation)."""
  omitted = np.ones(probs.shape, bool)
  np.put_along_axis(omitted, kept.astype(np.int64), False, axis=1)
  return np.where(omitted, probs, 0.0).sum(axis=1)


# -- dense mode --------------------------------------------------------------------------------


@pytest.mark.parametrize("n_devices", [1, 4])
def test_dense_biases_equal_the_similarity_matrix_path(rng, tmp_path, n_devices):
  bank, items = _problem(rng)  # 37 items: padded to a multiple of 4 devices
  shares = rng.uniform(0.5, 2.0, len(items))
  np.save(tmp_path / "bank.npy", bank.astype(np.float16))
  bank16 = np.load(tmp_path / "bank.npy", mmap_mode="r")  # float16 rows, read in chunks
  mesh = sharding.make_mesh(jax.devices()[:n_devices])
  # chunk_rows=64 streams the 300 bank rows in 5 chunks, the last one padded.
  got = solve.dense_biases(bank16, items, temperature=0.05, col_marginals=shares, tol=1e-6,
                           chunk_rows=64, mesh=mesh)
  assert got.converged and got.devices == n_devices and got.mode == "dense"
  bank16 = np.asarray(bank16, np.float32)
  reference = normalize.ncl_biases(bank16 @ items.T, temperature=0.05, col_marginals=shares,
                                   tol=1e-6, stream=True)
  np.testing.assert_allclose(_centred(got.bias), _centred(reference.bias), atol=2e-4)
  # The column sums of the float64 plan with these biases meet the targets.
  mass = _dense_probs(bank16, items, got.bias, 0.05).sum(axis=0)
  target = shares * len(bank) / shares.sum()
  assert np.abs(mass - target).sum() / len(bank) < 1e-5


def test_bank_groups_equal_the_one_dimensional_mesh(rng):
  """4 CPU devices as 2 bank groups x 2 gallery shards: each group streams its half of the bank
  (151 and 150 rows in chunks of 64, the last ones padded), one all-reduce per pass."""
  bank, items = _problem(rng, n_bank=301)
  flat = solve.dense_biases(bank, items, temperature=0.05, tol=1e-6, chunk_rows=64,
                            mesh=sharding.make_mesh(jax.devices()[:4]))
  grouped = solve.dense_biases(bank, items, temperature=0.05, tol=1e-6, chunk_rows=64,
                               mesh=dense.make_mesh(2, jax.devices()[:4]))
  assert grouped.bank_groups == 2 and grouped.devices == 4 and flat.bank_groups == 1
  assert grouped.passes == flat.passes
  np.testing.assert_allclose(_centred(grouped.bias), _centred(flat.bias), atol=1e-5)
  # One pass's column sums agree too, and sum to the bank size.
  g = rng.normal(size=len(items))
  sums = [dense.DenseColumnMass(bank, items, 20.0, mesh, rows=64)(g) for mesh in
          (dense.make_mesh(1, jax.devices()[:4]), dense.make_mesh(2, jax.devices()[:4]),
           dense.make_mesh(4, jax.devices()[:4]))]
  reference = _dense_probs(bank, items, g, 0.05).sum(axis=0)
  for got in sums:
    np.testing.assert_allclose(got, reference, rtol=2e-5)
  with pytest.raises(UserError, match="--bank_groups must divide the 4 devices"):
    dense.make_mesh(3, jax.devices()[:4])


def test_gallery_uses_the_embedding_path_for_large_galleries(rng, monkeypatch):
  bank, items = _problem(rng, n_bank=200, n_items=30)
  small = inference.Gallery(items, bank, temperature=0.05, tol=1e-6)
  expected = small.ncl_biases.bias
  monkeypatch.setattr(normalize, "DENSE_LIMIT", 100)  # 200 x 30 now counts as large
  calls = []
  original = solve.dense_biases
  monkeypatch.setattr(solve, "dense_biases", lambda *a, **k: calls.append(1) or original(*a, **k))
  large = inference.Gallery(items, bank, temperature=0.05, tol=1e-6)
  np.testing.assert_allclose(_centred(large.ncl_biases.bias), _centred(expected), atol=2e-4)
  assert calls == [1]


# -- sparse mode -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed,temperature,k", [(0, 0.05, 5), (1, 0.02, 12), (2, 0.1, 30)])
def test_sparse_bound_never_under_estimates_the_omitted_mass(seed, temperature, k):
  bank, items = _problem(np.random.default_rng(seed), n_bank=250, n_items=40)
  solution = solve.sparse_biases(bank, items, temperature=temperature, top_k=k, tol=1e-7)
  found = search.top_k_items(bank, items, k)
  kept = found.index
  error = sparse.float32_score_error(bank.shape[1])
  untiered = sparse.omitted_mass_bound(found.scores, kept, 1.0 / temperature, solution.bias,
                                      len(items), error)
  bound = sparse.omitted_mass_bound(found.scores, kept, 1.0 / temperature, solution.bias,
                                   len(items), error, found.tier_scores, found.tier_ranks)
  probs = _dense_probs(bank, items, solution.bias, temperature)
  outside = _omitted_probability(probs, kept)
  assert np.all(bound >= outside), (bound - outside).min()
  assert np.all(bound <= untiered)
  np.testing.assert_array_equal(found.tier_ranks, [r for r in (2 * k, 4 * k, 8 * k) if r <= 40])
  if 2 * k <= len(items):  # deeper ranks' scores tighten it
    assert np.any(bound < untiered)
  assert solution.omitted_mass_bound == pytest.approx(bound.max(), rel=1e-3)  # score margin x1.1
  # The dense problem's column error under the sparse biases is within the certified error.
  dense_error = np.abs(probs.sum(axis=0) - len(bank) / len(items)).sum() / len(bank)
  assert dense_error <= solution.certified_error
  assert solution.converged == (solution.certified_error <= 1e-7)


def test_sparse_bound_holds_when_omitted_items_tie_with_the_last_kept():
  """Duplicated items and equal biases make the bound's two relaxations exact: only the float32
  score margin keeps it above the true omitted mass."""
  rng = np.random.default_rng(3)
  items = np.repeat(_unit(rng.normal(size=(2, 32))), 4, axis=0)  # 8 items, 2 distinct
  bank = _unit(items[rng.integers(0, 8, 40)] + 0.3 * rng.normal(size=(40, 32)))
  found = search.top_k_items(bank, items, 5)  # the 5th kept ties with the 3 omitted
  kept = found.index
  bias = np.zeros(8, np.float32)
  bound = sparse.omitted_mass_bound(found.scores, kept, 100.0, bias, 8,
                                   sparse.float32_score_error(32), found.tier_scores,
                                   found.tier_ranks)
  probs = _dense_probs(bank, items, bias, 0.01)
  outside = _omitted_probability(probs, kept)
  assert np.all(bound >= outside)
  np.testing.assert_allclose(bound, outside, rtol=0.02, atol=1e-30)  # and nearly tight


def test_sparse_mode_matches_dense_and_says_when_k_is_too_small(rng):
  bank, items = _problem(rng, n_bank=400, n_items=40)
  dense = solve.dense_biases(bank, items, temperature=0.02, tol=1e-6)
  wide = solve.sparse_biases(bank, items, temperature=0.02, top_k=39, tol=1e-3)
  narrow = solve.sparse_biases(bank, items, temperature=0.02, top_k=2, tol=1e-3)
  assert wide.converged and wide.certified_error <= 1e-3
  np.testing.assert_allclose(_centred(wide.bias), _centred(dense.bias), atol=0.05)
  assert narrow.error <= 1e-3 and not narrow.converged  # the sparse problem solved, not the task
  assert narrow.certified_error > 1e-3 and narrow.omitted_mass_bound > 0


def _random_plan(rng, n_rows=130, n_items=50, k=7):
  """A sparse plan's inputs: kept scores [n, k], distinct kept ids, omitted levels; n_items."""
  scores = rng.uniform(-0.2, 0.9, (n_rows, k)).astype(np.float32)
  index = np.stack([rng.choice(n_items, k, replace=False) for _ in range(n_rows)])
  return scores, index.astype(np.int32), rng.uniform(5.0, 15.0, n_rows), n_items


def test_sparse_plan_split_over_devices_equals_one_device(rng):
  """Each of 4 devices owns a block of bank rows (130 rows: padded to 132); one psum per pass."""
  scores, index, levels, n_items = _random_plan(rng)
  bias = rng.normal(size=n_items)
  mesh = sharding.make_mesh(jax.devices()[:4])
  split = sparse_mesh.ShardedSparsePlan(scores, index, levels, n_items, 20.0, mesh)
  np.testing.assert_allclose(split(bias), sparse.SparsePlan(scores, index, levels, n_items,
                                                            20.0)(bias), rtol=2e-5)
  bank, items = _problem(rng, n_bank=300, n_items=40)
  one = solve.sparse_biases(bank, items, temperature=0.05, top_k=8, tol=1e-6, sample_rows=0)
  four = solve.sparse_biases(bank, items, temperature=0.05, top_k=8, tol=1e-6, sample_rows=0,
                             mesh=mesh)
  assert four.devices == 4 and one.devices == 1
  np.testing.assert_allclose(_centred(four.bias), _centred(one.bias), atol=1e-4)
  assert four.certified_error == pytest.approx(one.certified_error, rel=1e-3)


def test_omitted_level_by_hand():
  # One row, n = 10 items, k = 2 kept, the search saw ranks 3..4 (scores 0.5, 0.4) and one
  # padded slot; 10 - 2 - 2 = 6 unseen items get at most the lowest seen score, 0.4.
  scores = np.array([[0.9, 0.8, 0.5, 0.4, -3.4e38]])
  ids = np.array([[4, 7, 1, 2, -1]])
  scale = 10.0
  expected = np.log(np.exp(5.0) + np.exp(4.0) + 6 * np.exp(4.0)) - np.log(8)
  np.testing.assert_allclose(sparse.omitted_level(scores, ids, 2, 10, scale), [expected])
  # Nothing below rank k seen: every omitted item at the k-th score (the clipped matrix).
  np.testing.assert_allclose(sparse.omitted_level(scores[:, :2], ids[:, :2], 2, 10, scale), [8.0])


def test_deep_level_brings_sparse_biases_closer_to_dense(rng):
  bank, items = _problem(rng, n_bank=600, n_items=60, dim=16)
  dense = solve.dense_biases(bank, items, temperature=0.05, tol=1e-8)
  sparse = solve.sparse_biases(bank, items, temperature=0.05, top_k=6, tol=1e-8)
  found = search.top_k_items(bank, items, 6)
  b = streaming.balanced_marginals(None, len(bank), len(items))
  clipped = streaming.column_fixed_point(
      lambda g: _reference_column_sums(found.scores, found.index, 20.0, g, len(items)),
      b, tol=1e-8)
  gap = lambda g: np.abs(_centred(g) - _centred(dense.bias)).mean()
  corr = lambda g: np.corrcoef(g, dense.bias)[0, 1]
  # (k = 6 of 60 items at T = 0.05 leaves much of each row's mass omitted: neither is close.)
  assert gap(sparse.bias) < 0.8 * gap(clipped.bias), (gap(sparse.bias), gap(clipped.bias))
  assert corr(sparse.bias) > corr(clipped.bias) + 0.1, (corr(sparse.bias), corr(clipped.bias))


def test_sparse_plan_equals_its_definition(rng):
  scores, index, levels, n_items = _random_plan(rng)
  bias = rng.normal(size=n_items)
  plan = sparse.SparsePlan(scores, index, levels, n_items, 20.0, rows=48)   # 3 chunks, padded
  expected = _reference_column_sums(scores, index, 20.0, bias, n_items, levels)
  np.testing.assert_allclose(plan(bias), expected, rtol=2e-5)
  assert plan(bias).sum() == pytest.approx(130, rel=1e-5)   # each row spreads 1


def test_unscanned_lists_bound_their_items(rng):
  bank, items = _problem(rng, n_bank=50, n_items=80, dim=16)
  lists = search._ivf_lists(items, 8)
  scanned = np.zeros((50, 8), bool)
  for row in scanned:
    row[rng.choice(8, 3, replace=False)] = True
  bias = rng.normal(size=len(items))
  bound = sparse.unscanned_log_mass(bank, scanned, lists, 20.0, bias, 0.0)
  g = bias - bias.max()
  logits = 20.0 * (bank.astype(np.float64) @ items.T.astype(np.float64)) + g
  unscanned = ~scanned[:, lists.assignment]
  with np.errstate(divide="ignore"):   # a query that scanned every non-empty list: log 0
    truth = np.log(np.where(unscanned, np.exp(logits), 0.0).sum(axis=1))
  assert np.all(bound >= truth - 1e-9)
  assert np.all(np.isfinite(bound))


def test_ivf_search_is_exact_within_the_scanned_lists(rng):
  bank, items = _problem(rng, n_bank=300, n_items=120, dim=16)
  k = 6
  found = search.top_k_items(bank, items, k, search="ivf", nlist=12, nprobe=2,
                            temperature=0.05)
  exact = search.top_k_items(bank, items, k, temperature=0.05)
  scanned = found.lists.scanned[found.scan_batch][:, found.lists.assignment]   # [Nb, Ng]
  sims = bank.astype(np.float64) @ items.T.astype(np.float64)
  for row in range(len(bank)):
    visible = np.flatnonzero(scanned[row])
    best = visible[np.argsort(-sims[row, visible], kind="stable")[:k]]
    np.testing.assert_allclose(np.sort(sims[row, found.index[row]]),
                               np.sort(sims[row, best]), atol=1e-5)
    assert np.all(scanned[row, found.index[row]])
    for rank, tier in zip(found.tier_ranks, found.tier_scores[row]):
      if rank <= len(visible):
        assert tier == pytest.approx(np.sort(sims[row, visible])[::-1][rank - 1], abs=1e-5)
  missed = np.mean([len(set(a) - set(b)) for a, b in zip(exact.index, found.index)])
  assert missed > 0   # approximate here: some true top-k items lie in unscanned lists


@pytest.mark.parametrize("seed,norm", [(0, 1.0), (1, 1.01)])
def test_ivf_sparse_mode_bound_and_certificate_hold(seed, norm):
  """Also with every row at the norm the command line accepts (1.01), where the caps of the
  unscanned lists need the query's norm."""
  rng = np.random.default_rng(seed)
  bank, items = (norm * x for x in _problem(rng, n_bank=300, n_items=120, dim=16))
  k, temperature = 6, 0.05
  found = search.top_k_items(bank, items, k, search="ivf", nlist=12, nprobe=2)
  solution = solve.sparse_biases(bank, items, temperature=temperature, top_k=k, tol=1e-7,
                                 search="ivf", nlist=12, nprobe=2)
  assert solution.search == "ivf"
  probs = _dense_probs(bank, items, solution.bias, temperature)
  outside = _omitted_probability(probs, found.index)
  scale = 1.0 / temperature
  error = sparse.score_error(bank, items)
  assert error == pytest.approx(sparse.float32_score_error(16) * norm ** 2, rel=1e-5)
  unscanned = sparse.unscanned_log_mass(bank, found.lists.scanned[found.scan_batch],
                                        found.lists, scale, solution.bias, error)
  bound = sparse.omitted_mass_bound(found.scores, found.index, scale, solution.bias,
                                    len(items), error, found.tier_scores, found.tier_ranks,
                                    unscanned)
  assert np.all(bound >= outside), (bound - outside).min()
  dense_error = np.abs(probs.sum(axis=0) - len(bank) / len(items)).sum() / len(bank)
  assert dense_error <= solution.certified_error
  assert dense_error <= solution.sampled_certified_error   # every row scored: exact


def test_unscanned_cap_uses_the_query_norm():
  """A hand-built list where ``q.c + r_c`` is below the item's score for a query of norm 1.01
  (q along v - c): the cap must be ``q.c + |q| r_c``."""
  item, centre = np.array([[1.0, 0.0]]), np.array([[0.6, 0.8]])
  radius = np.linalg.norm(item - centre, axis=1)
  query = 1.01 * (item - centre) / radius
  lists = search.IvfLists(centre, radius, np.array([0]))
  truth = 100.0 * (query @ item.T)[0, 0]
  assert 100.0 * (query @ centre.T + radius)[0, 0] < truth - 0.5   # the unit-norm cap fails
  bound = sparse.unscanned_log_mass(query, np.zeros((1, 1), bool), lists, 100.0, np.zeros(1),
                                    0.0)
  assert bound[0] >= truth - 1e-9
  assert bound[0] == pytest.approx(truth, abs=1e-6)   # and is tight here


def test_certificate_covers_kept_scores_off_by_the_rounding_allowance(rng):
  """Kept scores stored off by up to ``error`` (what float32 scoring may do) and the worst-case
  certificate still covers the dense problem's error, through its rounding term."""
  bank, items = _problem(rng, n_bank=300, n_items=40)
  scale, error = 20.0, 2e-3          # far above float32's, so that the term matters
  found = search.top_k_items(bank, items, 5, temperature=1.0 / scale)
  signs = np.where(rng.random(found.scores.shape) < 0.5, -1.0, 1.0)
  off = found._replace(scores=(found.scores + error * signs).astype(np.float32))
  b = streaming.balanced_marginals(None, len(bank), len(items))
  plan = sparse.SparsePlan(off.scores, off.index, off.omitted_level, len(items), scale)
  out = streaming.column_fixed_point(plan, b, tol=1e-9)
  gap = sparse.worst_case_gap(bank, off, out.bias, scale, len(items), error)
  assert gap.rounding == pytest.approx(np.expm1(2 * scale * error))
  probs = _dense_probs(bank, items, out.bias, 1.0 / scale)
  dense_error = np.abs(probs.sum(axis=0) - b).sum() / len(bank)
  assert dense_error <= out.error + gap.gap
  # Per row, a logit shift of at most e moves the softmax by at most expm1(2 e) in L1.
  logits = rng.normal(size=(50, 9)) * 3
  shift = rng.uniform(-0.1, 0.1, size=logits.shape)
  moved = np.abs(_softmax_rows(logits) - _softmax_rows(logits + shift)).sum(axis=1)
  assert np.all(moved <= sparse.kept_rounding_gap(1.0, 0.1))


def _softmax_rows(logits):
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


# -- the sampled certificate ---------------------------------------------------------------------


def test_sampled_bound_holds_in_the_promised_fraction_of_seeds():
  bank, items = _problem(np.random.default_rng(4), n_bank=400, n_items=40)
  temperature, k = 0.05, 4
  solution = solve.sparse_biases(bank, items, temperature=temperature, top_k=k, tol=1e-7,
                                 sample_rows=0)
  assert solution.sampled_certified_error is None and solution.sample_rows is None
  found = search.top_k_items(bank, items, k, temperature=temperature)
  distances, omitted = sparse.row_differences(bank, items, found, solution.bias,
                                              1.0 / temperature, np.arange(len(bank)))
  # Each distance from its definition: the float64 softmax row against the plan's row.
  plan = np.log(np.maximum(_sparse_plan_rows(found, solution.bias, temperature, len(items)),
                           1e-300))
  np.testing.assert_allclose(distances, np.abs(
      _dense_probs(bank, items, solution.bias, temperature) - np.exp(plan)).sum(axis=1),
      atol=1e-9)
  truth = distances.mean()
  probs = _dense_probs(bank, items, solution.bias, temperature)
  np.testing.assert_allclose(omitted, _omitted_probability(probs, found.index), atol=1e-9)
  dense_error = np.abs(probs.sum(axis=0) - len(bank) / len(items)).sum() / len(bank)
  assert dense_error <= solution.error + truth
  seeds, confidence, m = 400, 0.9, 25
  misses = naive_misses = 0
  for seed in range(seeds):
    sample = distances[sparse.sample_rows(len(bank), m, seed)]
    misses += sparse.bernstein_upper(sample, confidence, 2.0) < truth
    naive_misses += sample.mean() < truth
  # At most the promised 10 % of seeds miss (with binomial room: P(> 55 of 400) < 1e-3).
  assert misses <= 55, misses
  assert naive_misses > 100, naive_misses   # the plain sample mean misses often: a real check


def _sparse_plan_rows(found, bias, temperature, n_items):
  """The solved plan's rows [Nb, Ng] from their definition (kept logits, the omitted level)."""
  g = np.asarray(bias, np.float64)
  logits = np.asarray(found.omitted_level, np.float64)[:, None] + g
  np.put_along_axis(logits, found.index.astype(np.int64),
                    found.scores.astype(np.float64) / temperature + g[found.index], axis=1)
  return _softmax_rows(logits)


def test_sampled_certificate_is_far_tighter_than_the_worst_case():
  bank, items = _problem(np.random.default_rng(5), n_bank=3000, n_items=60)
  solution = solve.sparse_biases(bank, items, temperature=0.05, top_k=15, tol=1e-6,
                                 sample_rows=1000, confidence=0.999, sample_seed=7,
                                 certify="sampled")
  report = solution.report()
  assert (report["confidence"], report["sample_rows"], report["sample_seed"]) == (0.999, 1000, 7)
  probs = _dense_probs(bank, items, solution.bias, 0.05)
  dense_error = np.abs(probs.sum(axis=0) - len(bank) / len(items)).sum() / len(bank)
  sampled = solution.sampled_certified_error
  # (Measured 0.013 <= 0.073 < 0.28 / 3; of the 0.073, 0.035 is the 1000-row range term.)
  assert dense_error <= sampled < solution.certified_error / 3, (
      dense_error, sampled, solution.certified_error)
  assert solution.converged == (sampled <= 1e-6) and solution.certify == "sampled"


def test_ivf_settings_and_their_errors():
  assert search.ivf_settings(100_000, None, None) == (1264, 16)
  assert search.ivf_settings(1000, 20, None) == (20, 16)
  assert search.ivf_settings(1000, 10, None) == (10, 10)
  with pytest.raises(UserError, match="--nprobe must lie in"):
    search.ivf_settings(1000, 10, 11)
  with pytest.raises(UserError, match="--nlist must lie in"):
    search.ivf_settings(1000, 2000, None)


# -- index ---------------------------------------------------------------------------------------


def _exact_ranking(queries, items, bias, temperature, k):
  scores = queries.astype(np.float64) @ items.T.astype(np.float64) / temperature + bias
  order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return order, np.take_along_axis(scores, order, axis=1)


@pytest.mark.parametrize("kind,options", [("flat", {}), ("ivf", {"nlist": 4, "nprobe": 4})])
def test_exact_indexes_return_the_ncl_ranking(rng, tmp_path, kind, options):
  items = _unit(rng.normal(size=(300, 16)))
  bias = rng.normal(scale=2.0, size=300).astype(np.float32)
  queries = _unit(rng.normal(size=(50, 16)))
  built = index_lib.BiasedIndex.build(items, bias, temperature=0.05, kind=kind, **options)
  built.save(tmp_path / "index")
  loaded = index_lib.BiasedIndex.load(tmp_path / "index")
  order, expected = _exact_ranking(queries, items, bias, 0.05, 10)
  for index in (built, loaded):
    got_order, got_scores = index.search(queries, 10)
    np.testing.assert_array_equal(got_order, order)
    np.testing.assert_allclose(got_scores, expected, rtol=1e-5, atol=1e-4)
  # NCL changes the ranking here, so the test would fail with the biases left out.
  assert not np.array_equal(order, _exact_ranking(queries, items, 0 * bias, 0.05, 10)[0])


def test_flat_index_orders_ties_only_within_their_group(rng):
  """The documented tie rule: exactly tied items may come in any order among themselves (here
  each item appears 4 times), but the tied groups, and the scores at every rank, are those of a
  stable argsort."""
  items = np.repeat(_unit(rng.normal(size=(5, 16))), 4, axis=0)
  bias = np.repeat(rng.normal(size=5), 4).astype(np.float32)
  queries = _unit(rng.normal(size=(30, 16)))
  got, got_scores = index_lib.BiasedIndex.build(items, bias, temperature=0.05).search(queries, 8)
  order, expected = _exact_ranking(queries, items, bias, 0.05, 8)
  np.testing.assert_allclose(got_scores, expected, rtol=1e-5, atol=1e-4)
  for row in range(len(queries)):
    for group in (slice(0, 4), slice(4, 8)):
      assert set(got[row, group]) == set(order[row, group])


def test_hnsw_index_approximates_the_ranking(rng):
  items = _unit(rng.normal(size=(500, 16)))
  bias = rng.normal(size=500).astype(np.float32)
  queries = _unit(rng.normal(size=(40, 16)))
  got, _ = index_lib.BiasedIndex.build(items, bias, temperature=0.05, kind="hnsw").search(
      queries, 10)
  order, _ = _exact_ranking(queries, items, bias, 0.05, 10)
  recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, order)])
  assert recall >= 0.9


def test_index_refuses_changes(rng, tmp_path):
  items = _unit(rng.normal(size=(50, 8)))
  bias = np.zeros(50, np.float32)
  built = index_lib.BiasedIndex.build(items, bias, temperature=0.05)
  built.save(tmp_path / "index")
  with pytest.raises(UserError, match="already exists"):
    built.save(tmp_path / "index")
  index = index_lib.BiasedIndex.load(tmp_path / "index")
  index.check_gallery(items, bias)
  other = items.copy()
  other[3] = _unit(rng.normal(size=(1, 8)))[0]
  with pytest.raises(UserError, match="another gallery"):
    index.check_gallery(other)
  with pytest.raises(UserError, match="other biases"):
    index.check_gallery(items, bias + 1)
  with pytest.raises(UserError, match=r"queries must be \[N, 8\]"):
    index.search(_unit(rng.normal(size=(2, 9))), 3)
  with open(tmp_path / "index" / index_lib.INDEX_FILE, "ab") as handle:
    handle.write(b"\0")
  with pytest.raises(UserError, match="changed after its manifest"):
    index_lib.BiasedIndex.load(tmp_path / "index")


@pytest.mark.parametrize("normalization", ["plain", "ncl"])
def test_gallery_search_through_the_index_equals_numpy_search(rng, normalization):
  bank, items = _problem(rng, n_bank=200, n_items=60)
  queries = _unit(rng.normal(size=(20, 16)))
  gallery = inference.Gallery(items, bank, temperature=0.05)
  want_order, want_scores = gallery.search(queries, k=7, normalization=normalization)
  gallery.index_threshold = 1
  got_order, got_scores = gallery.search(queries, k=7, normalization=normalization)
  np.testing.assert_array_equal(got_order, want_order)
  np.testing.assert_allclose(got_scores, want_scores, rtol=1e-5, atol=1e-4)


# -- command line --------------------------------------------------------------------------------


@pytest.fixture
def files(tmp_path, rng):
  bank, items = _problem(rng, n_bank=120, n_items=20, dim=8)
  paths = {"bank": tmp_path / "bank.npy", "gallery": tmp_path / "gallery.npy",
           "queries": tmp_path / "queries.npy"}
  np.save(paths["bank"], bank)
  np.save(paths["gallery"], items)
  np.save(paths["queries"], _unit(rng.normal(size=(6, 8))))
  return paths


def _biases_args(files, out, *extra):
  return ["biases", "--bank", str(files["bank"]), "--gallery", str(files["gallery"]),
          "--temperature", "0.05", "--out", str(out), "--quiet", *extra]


def test_cli_biases_index_search_round_trip(files, tmp_path, capsys):
  out = tmp_path / "biases.npy"
  assert cli.main(_biases_args(files, out, "--json", "-")) == 0
  captured = capsys.readouterr()
  report = json.loads(captured.out)
  assert report["converged"] and report["mode"] == "dense" and report["passes"] >= 1
  # --quiet drops the progress lines, not the one closing line.
  assert captured.err == (f"wrote {out}: converged (tol 0.0001), column error "
                          f"{report['error']:.3g}, {report['passes']} passes, "
                          f"{report['seconds']:.1f} s\n")
  bias = np.load(out)
  assert bias.dtype == np.float32 and bias.shape == (20,)
  assert cli.main(["index", "--gallery", str(files["gallery"]), "--biases", str(out),
                   "--temperature", "0.05", "--out", str(tmp_path / "index")]) == 0
  assert cli.main(["search", "--index", str(tmp_path / "index"), "--queries",
                   str(files["queries"]), "--k", "4", "--out", str(tmp_path / "top.npz"),
                   "--gallery", str(files["gallery"])]) == 0
  assert capsys.readouterr().err.splitlines()[-1].startswith(
      f"wrote {tmp_path / 'top.npz'}: the top 4 items of 6 queries")
  top = np.load(tmp_path / "top.npz")
  order, scores = _exact_ranking(np.load(files["queries"]), np.load(files["gallery"]), bias,
                                 0.05, 4)
  assert top["indices"].dtype == np.int64 and top["scores"].dtype == np.float32
  np.testing.assert_array_equal(top["indices"], order)
  np.testing.assert_allclose(top["scores"], scores, rtol=1e-5, atol=1e-4)
  assert not list(tmp_path.glob(".*partial*"))


def test_cli_sparse_ivf_reports_its_search(files, tmp_path, capsys):
  out = tmp_path / "sparse.npy"
  assert cli.main(_biases_args(files, out, "--top_k", "4", "--search", "ivf", "--nlist", "4",
                               "--tol", "1e-3", "--json", "-")) == 0
  captured = capsys.readouterr()
  report = json.loads(captured.out)
  assert report["mode"] == "sparse" and report["search"] == "ivf" and report["top_k"] == 4
  assert report["certified_error"] >= report["error"]
  assert report["converged"] == (report["certified_error"] <= 1e-3)
  if not report["converged"]:
    assert "--nprobe, or --search exact" in captured.err
  assert np.load(out).shape == (20,)


def test_cli_biases_progress_shows_the_time_left(files, tmp_path, capsys):
  out = tmp_path / "b.npy"
  args = [a for a in _biases_args(files, out, "--tol", "1e-6") if a != "--quiet"]
  assert cli.main(args) == 0
  lines = capsys.readouterr().err.splitlines()
  passes = [line for line in lines if line.startswith("pass ")]
  # (Anderson steps may raise the error for a pass, which hides the estimate for that pass.)
  assert len(passes) >= 3 and any(" s left)" in line for line in passes[1:]), passes
  assert lines[-1].startswith(f"wrote {out}: converged")
  # Passes left at the recent geometric rate: 1e-1 -> 1e-2 per pass reaches 1e-4 in 2 more.
  assert solve._passes_left([1e-1, 1e-2], 1e-4, 100) == 2
  assert solve._passes_left([1e-1, 1e-2], 1e-4, 1) == 1
  assert solve._passes_left([1e-2, 1e-1], 1e-4, 100) is None


def _save(path, array):
  np.save(path, array)
  return str(path)


def test_cli_dense_mode_continues_a_sparse_run_exactly(files, tmp_path, capsys):
  """A sparse run's biases as --initial_biases: the dense mode reaches the exact solution (the
  cold run's, to its tolerance) in fewer passes, and its certified error is its own."""
  sparse_out, warm_out, cold_out = (tmp_path / f"{name}.npy" for name in ("s", "w", "c"))
  assert cli.main(_biases_args(files, sparse_out, "--top_k", "4", "--tol", "1e-4")) == 0
  reports = {}
  for name, out, extra in (("cold", cold_out, ()),
                           ("warm", warm_out, ("--initial_biases", str(sparse_out)))):
    capsys.readouterr()
    assert cli.main(_biases_args(files, out, "--tol", "1e-6", "--json", "-", *extra)) == 0
    reports[name] = json.loads(capsys.readouterr().out)
  assert reports["warm"]["mode"] == "dense" and reports["warm"]["converged"]
  assert reports["warm"]["certified_error"] == reports["warm"]["error"] <= 1e-6
  assert reports["warm"]["passes"] < reports["cold"]["passes"]
  np.testing.assert_allclose(_centred(np.load(warm_out)), _centred(np.load(cold_out)),
                             atol=1e-4)


def test_column_fixed_point_starts_where_it_is_told(rng):
  bank, items = _problem(rng, n_bank=200, n_items=30)
  b = streaming.balanced_marginals(None, len(bank), len(items))

  def column_mass(g):
    return _dense_probs(bank, items, g, 0.05).sum(axis=0)

  solved = streaming.column_fixed_point(column_mass, b, tol=1e-8)
  again = streaming.column_fixed_point(column_mass, b, tol=1e-5, initial=solved.bias)
  assert again.iterations == 0 and again.error <= 1e-5   # already there: no update
  np.testing.assert_array_equal(again.bias, solved.bias)
  near = solved.bias + rng.normal(scale=0.05, size=len(items))
  nearby = streaming.column_fixed_point(column_mass, b, tol=1e-8, initial=near)
  assert 0 < nearby.iterations < solved.iterations   # started close: a shorter way
  np.testing.assert_allclose(_centred(nearby.bias), _centred(solved.bias), atol=1e-5)


def test_cli_bad_input_is_refused(files, tmp_path, rng):
  bank = np.load(files["bank"])
  bad = {
      "other_dim": _save(tmp_path / "d.npy", _unit(rng.normal(size=(5, 9)))),
      "nan": _save(tmp_path / "nan.npy", np.where(np.arange(8) == 2, np.nan, bank[:4])),
      "long": _save(tmp_path / "long.npy", bank * np.float32(1.25)),
      "empty": _save(tmp_path / "empty.npy", np.zeros((0, 8), np.float32)),
      "zero_bytes": str(tmp_path / "zero_bytes.npy"),
  }
  pathlib.Path(bad["zero_bytes"]).write_bytes(b"")
  out = str(tmp_path / "b.npy")
  base = ["biases", "--gallery", str(files["gallery"]), "--temperature", "0.05", "--out", out]
  cases = [
      (base + ["--bank", bad["other_dim"]], "dimension 9 but --gallery 8"),
      (base + ["--bank", bad["nan"]], "row 0 contains NaN or Inf"),
      (base + ["--bank", bad["long"]], r"has norm 1\.25 \(off by 0\.25"),
      (base + ["--bank", bad["empty"]], "is empty"),
      (base + ["--bank", bad["zero_bytes"]], r"--bank file .* is empty \(0 bytes\)"),
      (base[:-4] + ["--bank", str(files["bank"]), "--temperature", "1e-30", "--out", out],
       "--temperature 1e-30 is too small for float32 logits"),
      (base[:-4] + ["--bank", str(files["bank"]), "--temperature", "1e30", "--out", out],
       "--temperature 1e\\+30 is too large for float32 logits"),
      (base + ["--bank", str(files["bank"]), "--top_k", "20"], "below the gallery size 20"),
      (base + ["--bank", str(files["bank"]), "--json", str(files["bank"])], "already exists"),
      (base + ["--bank", str(files["bank"]), "--search", "ivf"], "add --top_k K"),
      (base + ["--bank", str(files["bank"]), "--top_k", "3", "--search", "ivf", "--nlist",
               "4", "--nprobe", "5"], r"--nprobe must lie in \[1, nlist = 4\]"),
      (base + ["--bank", str(files["bank"]), "--top_k", "3", "--bank_groups", "2"],
       "--bank_groups belongs to the dense mode"),
      (base + ["--bank", str(files["bank"]), "--certify", "sampled"], "belong to the sparse mode"),
      (base + ["--bank", str(files["bank"]), "--top_k", "3", "--confidence", "1.5"],
       "--confidence must lie strictly between 0 and 1"),
      (base + ["--bank", str(files["bank"]), "--top_k", "3", "--certify", "sampled",
               "--sample_rows", "0"], r"--sample_rows must be >= 0 \(>= 2 with --certify"),
      (base + ["--bank", str(files["bank"]), "--top_k", "3", "--initial_biases",
               str(files["bank"])], "--initial_biases belongs to the dense mode"),
      (base + ["--bank", str(files["bank"]), "--initial_biases", str(files["bank"])],
       r"--initial_biases .* must be 20 numbers \(one per gallery item\)"),
  ]
  for argv, message in cases:
    with pytest.raises(UserError, match=message):
      cli.main(argv)
  assert not os.path.exists(out)
  # Never overwrite: an existing --out keeps its bytes.
  before = pathlib.Path(files["queries"]).read_bytes()
  with pytest.raises(UserError, match="already exists"):
    cli.main(_biases_args(files, files["queries"]))
  assert pathlib.Path(files["queries"]).read_bytes() == before


def test_cli_refuses_an_index_from_another_gallery(files, tmp_path, rng):
  other = _save(tmp_path / "other.npy", _unit(rng.normal(size=(20, 8))))
  np.save(tmp_path / "zeros.npy", np.zeros(20, np.float32))
  cli.main(["index", "--gallery", other, "--biases", str(tmp_path / "zeros.npy"),
            "--temperature", "0.05", "--out", str(tmp_path / "index")])
  search = ["search", "--index", str(tmp_path / "index"), "--out", str(tmp_path / "t.npz")]
  with pytest.raises(UserError, match="another gallery"):
    cli.main(search + ["--queries", str(files["queries"]), "--gallery", str(files["gallery"])])
  wrong_dim = _save(tmp_path / "q9.npy", _unit(rng.normal(size=(3, 9))))
  with pytest.raises(UserError, match="dimension 9 but the index 8"):
    cli.main(search + ["--queries", wrong_dim])
  with pytest.raises(UserError, match=r"--k must lie in \[1, 20\]"):
    cli.main(search + ["--queries", str(files["queries"]), "--k", "21"])
  assert not (tmp_path / "t.npz").exists()


def test_cli_error_is_one_line_with_exit_code_2(files, tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "ncl_jax.gallery", *_biases_args(files, tmp_path / "b.npy"),
       "--top_k", "0"], cwd=REPO, capture_output=True, text=True, check=False)
  assert result.returncode == 2
  assert result.stderr.startswith("error: --top_k must be below") and result.stderr.count(
      "\n") == 1


# -- two processes x two devices -----------------------------------------------------------------


def _biases_on_two_processes(inputs, out, tmp_path, *flags) -> dict:
  """``biases`` on 2 processes x 2 CPU devices; process 0's JSON report."""
  # The coordinator-port retry of the training tests (a picked port can be taken before use).
  from multiprocess_testutils import env, run_on_free_port  # pylint: disable=g-import-not-at-top

  def start(port, logs):
    return [subprocess.Popen(
        [sys.executable, "-m", "ncl_jax.gallery", *_biases_args(inputs, out, *flags),
         "--coordinator_address", f"localhost:{port}", "--num_processes", "2", "--process_id",
         str(i), "--json", str(tmp_path / f"report{i}.json")],
        cwd=REPO, env=env(2), stdout=logs[i], stderr=subprocess.STDOUT, text=True)
        for i in range(2)]

  for code, output in run_on_free_port(start, tmp_path / "logs", timeout=180):
    assert code == 0, output
  return json.loads((tmp_path / "report0.json").read_text())


@pytest.mark.parametrize("bank_groups", [1, 2])
def test_two_processes_compute_the_same_biases(files, tmp_path, bank_groups):
  # 20 items over 4 devices: each process reads 10 gallery rows (bank_groups 1) or all 20 and
  # half of the bank (bank_groups 2: a group per process).
  out = tmp_path / "two.npy"
  report = _biases_on_two_processes(files, out, tmp_path, "--tol", "1e-6", "--bank_groups",
                                    str(bank_groups))
  assert report["processes"] == 2 and report["devices"] == 4 and report["converged"]
  assert report["bank_groups"] == bank_groups   # 2: each process streams half of the bank
  assert not (tmp_path / "report1.json").exists()  # process 0 writes the outputs
  bank, items = np.load(files["bank"]), np.load(files["gallery"])
  reference = normalize.ncl_biases(bank @ items.T, temperature=0.05, tol=1e-6, stream=True)
  np.testing.assert_allclose(_centred(np.load(out)), _centred(reference.bias), atol=1e-4)


def test_two_processes_split_the_sparse_bank(files, tmp_path, rng):
  """Sparse mode on 2 processes x 2 devices: each process searches and holds its block of the
  bank's rows (121 rows: 61 + 60, padded per device), column sums by one psum, certificates
  summed across processes: the one-process result."""
  bank = _problem(rng, n_bank=121, n_items=20, dim=8)[0]
  np.save(tmp_path / "bank121.npy", bank)
  out = tmp_path / "two.npy"
  report = _biases_on_two_processes(dict(files, bank=tmp_path / "bank121.npy"), out, tmp_path,
                                    "--tol", "1e-6", "--top_k", "5", "--sample_rows", "40",
                                    "--sample_seed", "3")
  assert report["mode"] == "sparse" and report["processes"] == 2 and report["devices"] == 4
  one = solve.sparse_biases(bank, np.load(files["gallery"]), temperature=0.05, top_k=5,
                            tol=1e-6, sample_rows=40, sample_seed=3)
  np.testing.assert_allclose(_centred(np.load(out)), _centred(one.bias), atol=1e-4)
  for key in ("certified_error", "omitted_mass_bound", "omitted_mass_mean",
              "sampled_certified_error", "sampled_omitted_mass_mean"):
    assert report[key] == pytest.approx(getattr(one, key), rel=1e-3, abs=1e-6), key
  assert report["sample_rows"] == 40 and report["confidence"] == 0.999


def test_process_blocks_cover_the_bank_once():
  for n_rows, processes in [(121, 2), (10, 3), (4, 4), (1000, 7)]:
    blocks = [sparse_mesh.process_block(n_rows, processes, i) for i in range(processes)]
    rows = np.concatenate([np.arange(n_rows)[b] for b in blocks])
    np.testing.assert_array_equal(rows, np.arange(n_rows))
    assert max(b.stop - b.start for b in blocks) == -(-n_rows // processes)


def test_ivf_search_width_can_change_after_building(rng):
  items = _unit(rng.normal(size=(400, 8)))
  index = index_lib.BiasedIndex.build(items, np.zeros(400), temperature=0.05, kind="ivf",
                                      nlist=8, nprobe=1)
  queries = _unit(rng.normal(size=(30, 8)))
  order, _ = _exact_ranking(queries, items, np.zeros(400), 0.05, 5)
  index.set_search_parameters(nprobe=8)  # every list: exact
  np.testing.assert_array_equal(index.search(queries, 5)[0], order)
  with pytest.raises(UserError, match="ef_search does not apply to the ivf index"):
    index.set_search_parameters(ef_search=10)
