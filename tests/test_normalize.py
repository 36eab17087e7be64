"""Tests for ncl_jax.normalize against POT, numpy transcriptions of DSL/QB-Norm, and real data."""

import json

import ml_collections
import numpy as np
import ot
import pytest
from scipy.special import logsumexp, softmax

from ncl_jax import evaluate
from ncl_jax import metrics
from ncl_jax import normalize as nz
from ncl_jax import posthoc
from ncl_jax import selection
from ncl_jax.errors import UserError

from normalize_testutils import hub_sims

TITLES = "msrvtt_cap4video/msrvtt_titles_matrix.npy"
VIDEO = "msrvtt_cap4video/msrvtt_video_matrix.npy"


def test_ncl_biases_match_pot_plan(rng):
  bank = hub_sims(rng, 40, 15)
  temperature = 0.1
  got = nz.ncl_biases(bank, temperature=temperature, tol=1e-6)
  logits = bank.astype(np.float64) / temperature
  plan = ot.sinkhorn(np.ones(40), np.full(15, 40 / 15), -logits, reg=1.0,
                     method="sinkhorn_log", stopThr=1e-12, numItermax=20000)
  # With unit row sums, the plan's rows are the normalized retrieval distributions.
  np.testing.assert_allclose(softmax(logits + got.bias, axis=1), plan, atol=2e-5)


@pytest.mark.parametrize("marginals", [False, True])
def test_streamed_equals_dense_iterates(rng, marginals):
  bank = hub_sims(rng, 150, 24)
  col = rng.integers(1, 4, 24).astype(np.float64) if marginals else None
  kwargs = dict(temperature=0.05, col_marginals=col, tol=0.0, max_iterations=25)
  dense = nz.ncl_biases(bank, stream=False, **kwargs)
  # 150 rows = 4 chunks of 32 + a padded tail; no acceleration, so the iterates are Sinkhorn's.
  streamed = nz.ncl_biases(bank, stream=True, chunk_rows=32, anderson=0, **kwargs)
  assert dense.iterations == streamed.iterations == 25
  np.testing.assert_allclose(streamed.bias, dense.bias, atol=2e-4)


def test_streamed_reaches_expected_counts_from_memmap(rng, tmp_path):
  """Multi-caption marginals through a memory-mapped bank: each video gets its caption count."""
  bank = hub_sims(rng, 300, 20)
  path = tmp_path / "bank.npy"
  np.save(path, bank)
  mapped = np.load(path, mmap_mode="r")
  counts = rng.integers(1, 5, 20).astype(np.float64)
  got = nz.streamed_ncl_biases(mapped, temperature=0.05, col_marginals=counts, tol=1e-5,
                               chunk_rows=64)
  in_memory = nz.streamed_ncl_biases(bank, temperature=0.05, col_marginals=counts, tol=1e-5,
                                     chunk_rows=64)
  np.testing.assert_array_equal(got.bias, in_memory.bias)
  assert got.error <= 1e-5
  mass = nz.candidate_mass(mapped, scale=1 / 0.05, bias=got.bias)
  np.testing.assert_allclose(mass, counts * 300 / counts.sum(), rtol=1e-4)


def test_streamed_survives_an_underflowing_column():
  # Column 0 sits 2000 logits below every row's best entry: its probability underflows to 0.
  bank = np.full((64, 6), 0.5, np.float32)
  bank[:, 1:] += np.linspace(0, 0.1, 5, dtype=np.float32)
  bank[:, 0] = -1.5
  got = nz.streamed_ncl_biases(bank, temperature=0.001, tol=1e-4, max_iterations=200,
                               chunk_rows=16)
  assert np.all(np.isfinite(got.bias))
  assert got.error <= 1e-4  # the floor slows the column's climb, it does not stop it


def test_dsl_matches_formula(rng):
  sims = hub_sims(rng, 30, 12)
  logits = sims.astype(np.float64) / 0.02
  expected = logits * 30 * softmax(logits / 2.0, axis=0)
  got = nz.dsl(sims, temperature=0.02, dsl_temperature=2.0, chunk_rows=7)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)


def test_qbnorm_matches_numpy_transcription(rng):
  bank = hub_sims(rng, 12, 40)
  sims = hub_sims(rng, 25, 40)
  beta, k, temperature = 5.0, 2, 0.01
  got = nz.qbnorm(sims, bank, temperature=temperature, beta=beta, k=k, chunk_rows=8)
  # QB-Norm as published: activation set = union of the bank queries' top-k candidates;
  # a query whose top-1 is in it gets exp(beta s) / sum_bank exp(beta s_bank); others stay raw.
  active = np.unique(np.argsort(-bank, axis=1)[:, :k])
  gated = np.isin(np.argmax(sims, axis=1), active)
  inverted = np.exp(beta * sims.astype(np.float64)) / np.exp(beta * bank.astype(np.float64)).sum(0)
  assert 0 < gated.sum() < len(sims)  # both branches are exercised
  np.testing.assert_allclose(got[gated] * beta * temperature, np.log(inverted[gated]),
                             rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got[~gated] * temperature, sims[~gated], atol=1e-6)
  lse, mask = nz.qbnorm_biases(bank, beta=beta, k=k, chunk_rows=8)
  np.testing.assert_allclose(lse, logsumexp(beta * bank.astype(np.float64), axis=0), rtol=1e-6)
  np.testing.assert_array_equal(np.flatnonzero(mask), active)


def test_normalization_error_and_expected_mass():
  # Two equal candidates and one that no query prefers.
  logits = np.log(np.array([[0.5, 0.5, 1e-9], [0.5, 0.5, 1e-9]]))
  mass = nz.candidate_mass(logits)
  np.testing.assert_allclose(mass, [1, 1, 0], atol=1e-6)
  err = nz.normalization_error(mass, nz.expected_mass(2, 3), bins=4)
  assert err["mae"] == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 3, abs=1e-6)
  assert err["max"] == pytest.approx(2 / 3, abs=1e-6)
  assert sum(err["histogram"]["counts"]) == 3 and len(err["histogram"]["edges"]) == 5
  # Relative: |mass / expected - 1| with expected 2/3 each: |1.5 - 1|, |1.5 - 1|, |0 - 1|.
  assert err["relative_mae"] == pytest.approx((0.5 + 0.5 + 1) / 3, abs=1e-6)
  assert err["relative_max"] == pytest.approx(1.0, abs=1e-6)
  # Multi-caption: the same relative miss weighs the same whatever the share's size, while the
  # absolute error is dominated by the direction with large shares (MSVD: ~41 vs ~0.024).
  big = nz.normalization_error(np.array([41.0 * 1.5, 41.0 * 0.5]), np.array([41.0, 41.0]))
  small = nz.normalization_error(np.array([0.024 * 1.5, 0.024 * 0.5]), np.array([0.024, 0.024]))
  assert big["relative_mae"] == pytest.approx(small["relative_mae"]) == pytest.approx(0.5)
  assert big["mae"] / small["mae"] == pytest.approx(41 / 0.024)
  mapping = np.array([0, 0, 0, 1])
  np.testing.assert_array_equal(nz.expected_mass(4, 2, mapping, direction="t2v"), [3, 1])
  np.testing.assert_allclose(nz.expected_mass(2, 4, mapping, direction="v2t"),
                             [1 / 3, 1 / 3, 1 / 3, 1])


def test_normalize_dispatch_and_labels(rng):
  sims = hub_sims(rng, 20, 20)
  np.testing.assert_allclose(nz.normalize(sims, "none", temperature=0.5), sims / 0.5)
  with pytest.raises(ValueError, match="transductive"):
    nz.normalize(sims, "dsl", sims, temperature=0.01)
  with pytest.raises(ValueError, match="method"):
    nz.normalize(sims, "sinkhorn", temperature=0.01)
  with pytest.raises(ValueError, match="bank"):
    nz.normalize(sims, "ncl", sims[:, :5], temperature=0.01)
  assert nz.setting("ncl", bank_is_test=True) == "transductive"
  assert nz.setting("qbnorm", bank_is_test=False) == "inductive"
  assert nz.setting("dsl", bank_is_test=False) == "transductive"


# ---------------------------------------------------------------------------------------------
# Real data: a trained model's MSR-VTT 1k-A scores.

@pytest.mark.parametrize("name", [TITLES, VIDEO])
def test_real_ncl_needs_the_temperature(shared_data_dir, name):
  sims = np.load(shared_data_dir / name)
  plain = metrics.retrieval_metrics(sims)
  t2v = nz.normalize(sims, "ncl", temperature=0.01)
  v2t = nz.normalize(sims.T, "ncl", temperature=0.01)
  # With the model's temperature, transductive NCL raises R@1 in both directions by > 2 points
  # and balances each video's summed retrieval probability.
  assert metrics.t2v_metrics(t2v)["R@1"] > plain["t2v"]["R@1"] + 2
  assert metrics.v2t_metrics(v2t)["R@1"] > plain["v2t"]["R@1"] + 2
  before = nz.normalization_error(nz.candidate_mass(sims, scale=100.0), 1.0)["mae"]
  after = nz.normalization_error(nz.candidate_mass(t2v), 1.0)["mae"]
  assert before > 0.4 and after < 1e-3
  # At temperature 1 the softmax is almost flat, so there is almost nothing to balance, and the
  # "normalized" scores lose t2v recall.
  flat = nz.normalization_error(nz.candidate_mass(sims, scale=1.0), 1.0)["mae"]
  assert flat < 0.02
  hot = nz.normalize(sims, "ncl", temperature=1.0)
  assert metrics.t2v_metrics(hot)["R@1"] < plain["t2v"]["R@1"]


def _leak_free_halves(sims):
  """Test = pairs 500-999 (captions x their videos); bank = captions 0-499 x the test videos,
  so the bank's own answers are not in the gallery (as training captions x test videos)."""
  return sims[500:, 500:], sims[:500, 500:]


def test_real_inductive_bank_and_streaming_agree(shared_data_dir):
  sims = np.load(shared_data_dir / TITLES)
  queries, bank = _leak_free_halves(sims)
  plain = metrics.t2v_metrics(queries)["R@1"]
  normalized, biases = nz.ncl(queries, bank, temperature=0.01)
  # A bank as small as the gallery: NCL's biases overfit it and cost recall (docs/normalization.md).
  assert metrics.t2v_metrics(normalized)["R@1"] < plain
  streamed = nz.ncl_biases(bank, temperature=0.01, stream=True, chunk_rows=96, tol=0.0,
                           max_iterations=biases.iterations, anderson=0)
  np.testing.assert_allclose(streamed.bias, biases.bias, atol=1e-3)


def test_real_anderson_acceleration_reaches_the_same_plan(shared_data_dir):
  sims = np.load(shared_data_dir / TITLES)
  logits = sims.astype(np.float64) / 0.01
  plain = nz.streamed_ncl_biases(sims, temperature=0.01, anderson=0)
  fast = nz.streamed_ncl_biases(sims, temperature=0.01)
  assert plain.error <= 1e-4 and fast.error <= 1e-4
  assert fast.iterations < plain.iterations / 2
  # The biases have nearly flat directions (a column that wins one query outright barely gains
  # mass when its bias grows), so compare the plans (retrieval distributions), not the biases.
  np.testing.assert_allclose(softmax(logits + fast.bias, axis=1),
                             softmax(logits + plain.bias, axis=1), atol=1e-2)
  assert metrics.t2v_metrics(logits + fast.bias) == pytest.approx(
      metrics.t2v_metrics(logits + plain.bias), abs=0.01)


def test_real_dsl_raises_recall(shared_data_dir):
  sims = np.load(shared_data_dir / VIDEO)
  plain = metrics.t2v_metrics(sims)["R@1"]
  assert metrics.t2v_metrics(nz.dsl(sims, temperature=0.01))["R@1"] > plain + 2


# ---------------------------------------------------------------------------------------------
# Inverted softmax and CSLS against numpy transcriptions of their papers' formulas.

def test_inverted_softmax_matches_smith_et_al(rng):
  bank = hub_sims(rng, 30, 20)
  sims = hub_sims(rng, 12, 20)
  beta, temperature = 30.0, 0.02
  got = nz.inverted_softmax(sims, bank, temperature=temperature, beta=beta, chunk_rows=16)
  # Smith et al. 2017, eq. 5: P(y -> x) = exp(beta S_yx) / sum_x' exp(beta S_yx'), normalised
  # over the sources (the bank queries) for each target (candidate).
  s64, b64 = sims.astype(np.float64), bank.astype(np.float64)
  probability = np.exp(beta * s64) / np.exp(beta * b64).sum(axis=0, keepdims=True)
  np.testing.assert_allclose(got * beta * temperature, np.log(probability), rtol=1e-5, atol=1e-4)
  # Default beta = 1/T: the bias is NCL's Sinkhorn column potential after zero iterations
  # (UCoFiA's b <- 1/colsum(K) step), so the bank is balanced to first order.
  default = nz.inverted_softmax_biases(bank, temperature=temperature)
  np.testing.assert_allclose(default.bias, -np.log(np.exp(b64 / temperature).sum(0)),
                             rtol=1e-5)
  # Transductive: the queries are their own bank.
  np.testing.assert_allclose(nz.normalize(sims, "is", temperature=temperature, beta=beta),
                             nz.inverted_softmax(sims, sims, temperature=temperature, beta=beta))


def test_csls_matches_conneau_et_al(rng):
  bank = hub_sims(rng, 40, 25)
  sims = hub_sims(rng, 15, 25)
  k, temperature = 4, 0.01
  got = nz.csls(sims, bank, temperature=temperature, k=k, chunk_rows=16)  # 3 chunks
  # Conneau et al. 2018, eq. 6: CSLS(x, y) = 2 cos(x, y) - r_T(x) - r_S(y), r = mean cosine of
  # the k nearest neighbours in the other domain (here: the candidate's k nearest bank queries).
  s64, b64 = sims.astype(np.float64), bank.astype(np.float64)
  r_candidate = np.sort(b64, axis=0)[-k:].mean(axis=0)
  r_query = np.sort(s64, axis=1)[:, -k:].mean(axis=1)
  reference = 2 * s64 - r_query[:, None] - r_candidate[None, :]
  # The per-query term shifts each row by a constant: same ranking, same row softmax.
  np.testing.assert_allclose(got - reference / (2 * temperature),
                             np.repeat(r_query[:, None] / (2 * temperature), 25, axis=1),
                             rtol=1e-5, atol=2e-3)
  np.testing.assert_array_equal(np.argsort(-got, axis=1, kind="stable")[:, 0],
                                np.argmax(reference, axis=1))
  with pytest.raises(ValueError, match="k must lie"):
    nz.csls(sims, bank, temperature=temperature, k=41)


def test_real_leaky_half_split_favours_the_queries_answers(shared_data_dir):
  """Why the old split (bank = captions 0-499 x all 1000 videos) inflated every bank method:
  the bank pushes its own answers (videos 0-499) down, a head start for the queries' videos."""
  sims = np.load(shared_data_dir / VIDEO)
  biases = nz.ncl_biases(sims[:500], temperature=0.01).bias
  assert biases[500:].mean() > biases[:500].mean() + 1.0


@pytest.mark.parametrize("method", ["ncl", "is", "csls"])
def test_real_leak_free_bank_of_gallery_size_does_not_raise_recall(shared_data_dir, method):
  """On the leak-free halves with a 500-caption bank, the bank methods at full strength do not
  beat plain t2v R@1 (the video matrix; the measured table is in docs/normalization.md), and
  strength 0 gives the plain ranking back."""
  queries, bank = _leak_free_halves(np.load(shared_data_dir / VIDEO))
  plain = metrics.t2v_metrics(queries)["R@1"]
  options = {"k": 10} if method == "csls" else {}
  full = nz.normalize(queries, method, bank, temperature=0.01, **options)
  assert metrics.t2v_metrics(full)["R@1"] <= plain
  off = nz.normalize(queries, method, bank, temperature=0.01, alpha=0.0, **options)
  assert metrics.t2v_metrics(off)["R@1"] == plain


# ---------------------------------------------------------------------------------------------
# The registry: one function and one row make a method known to normalize(), selection and
# posthoc.

def _mean_shift(sims, bank=None, *, temperature, col_marginals=None, strength=1.0):
  """A toy normalizer: each candidate's mean bank similarity, scaled, subtracted."""
  del col_marginals
  bank = sims if bank is None else bank
  mean = np.asarray(bank, np.float64).mean(axis=0)
  return ((np.asarray(sims, np.float64) - strength * mean) / temperature).astype(np.float32)


def test_a_method_added_through_the_registry_alone(monkeypatch, rng, tmp_path):
  row = nz.Normalizer("shift", _mean_shift, "shift (a test method)", knobs=(
      nz.Knob("strength", "--shift-strength", 1.0, "shift: strength", check="nonnegative",
              grid=(0.0, 0.5, 1.0)),))
  monkeypatch.setitem(nz.REGISTRY, "shift", row)
  sims, bank = hub_sims(rng, 10, 10), hub_sims(rng, 40, 10)
  expected = (sims.astype(np.float64) - 0.5 * bank.astype(np.float64).mean(0)) / 0.05
  np.testing.assert_allclose(nz.normalize(sims, "shift", bank, temperature=0.05, strength=0.5),
                             expected, rtol=1e-5)
  assert nz.setting("shift", bank_is_test=False) == "inductive"
  chosen = selection.select_on_bank("shift", bank, temperature=0.05)
  assert [p["strength"] for p in chosen.grid] == [0.0, 0.5, 1.0]
  assert chosen.values["strength"] in (0.0, 0.5, 1.0)
  assert evaluate.extra_methods(ml_collections.ConfigDict({"methods": "shift"})) == ("shift",)
  paths = {name: tmp_path / f"{name}.npy" for name in ("sims", "bank")}
  np.save(paths["sims"], sims)
  np.save(paths["bank"], bank)
  out = tmp_path / "out.json"
  assert posthoc.main([str(paths["sims"]), "--method", "shift", "--bank", str(paths["bank"]),
                       "--shift-strength", "0.5", "--temperature", "0.05", "--json",
                       str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["hyperparameters"]["t2v"] == {"strength": 0.5}
  assert result["t2v"] == pytest.approx(metrics.t2v_metrics(expected))
  with pytest.raises(UserError, match="--shift-strength must be a number >= 0"):
    posthoc.main([str(paths["sims"]), "--method", "shift", "--shift-strength", "-1"])
  assert posthoc.main([str(paths["sims"]), "--method", "shift", "--bank", str(paths["bank"]),
                       "--select", "bank", "--temperature", "0.05", "--json",
                       str(tmp_path / "selected.json")]) == 0
  selected = json.loads((tmp_path / "selected.json").read_text())
  assert selected["selection"]["t2v"]["grid"] == chosen.as_json()["grid"]


# ---------------------------------------------------------------------------------------------
# The strength knob alpha, and NNN, DN, DualIS against numpy written from their papers.

def test_alpha_scales_every_bias_and_zero_is_plain(rng):
  sims, bank = hub_sims(rng, 14, 12), hub_sims(rng, 50, 12)
  temperature = 0.02
  biases = nz.ncl_biases(bank, temperature=temperature)
  np.testing.assert_allclose(nz.normalize(sims, "ncl", bank, temperature=temperature, alpha=0.5),
                             sims / temperature + 0.5 * biases.bias, rtol=1e-5, atol=1e-4)
  plain = np.argsort(-sims, axis=1, kind="stable")
  for method, options in (("ncl", {}), ("qbnorm", {"beta": 50.0}), ("is", {"beta": 50.0}),
                          ("csls", {"k": 3}), ("nnn", {"k": 3})):
    full = nz.normalize(sims, method, bank, temperature=temperature, alpha=1.0, **options)
    half = nz.normalize(sims, method, bank, temperature=temperature, alpha=0.5, **options)
    zero = nz.normalize(sims, method, bank, temperature=temperature, alpha=0.0, **options)
    np.testing.assert_array_equal(np.argsort(-zero, axis=1, kind="stable"), plain)
    # Bias-linear: the half-strength logits are the mean of the plain and full ones.
    np.testing.assert_allclose(half, 0.5 * (zero + full), rtol=1e-5, atol=1e-3)


def test_nnn_matches_chowdhury_et_al(rng):
  sims, bank = hub_sims(rng, 15, 25), hub_sims(rng, 40, 25)
  k, alpha, temperature = 6, 0.75, 0.01
  got = nz.normalize(sims, "nnn", bank, temperature=temperature, k=k, alpha=alpha, chunk_rows=16)
  # s'(q, j) = s(q, j) - alpha * mean of the k largest bank similarities of candidate j.
  s64, b64 = sims.astype(np.float64), bank.astype(np.float64)
  reference = s64 - alpha * np.sort(b64, axis=0)[-k:].mean(axis=0)[None, :]
  np.testing.assert_allclose(got * temperature, reference, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="k must lie"):
    nz.normalize(sims, "nnn", bank, temperature=temperature, k=41)


def test_dn_matches_zhou_et_al_in_embedding_space(rng):
  """DN subtracts lambda x the bank queries' mean embedding from each query embedding."""
  queries, bank_queries = rng.standard_normal((10, 8)), rng.standard_normal((30, 8))
  videos = rng.standard_normal((12, 8))
  strength, temperature = 0.5, 0.05
  got = nz.normalize((queries @ videos.T).astype(np.float32), "dn",
                     (bank_queries @ videos.T).astype(np.float32), temperature=temperature,
                     **{"lambda": strength})
  reference = (queries - strength * bank_queries.mean(axis=0)) @ videos.T
  np.testing.assert_allclose(got * temperature, reference, rtol=1e-5, atol=1e-5)


def test_dualis_matches_wang_et_al(rng):
  sims, bank, gallery_bank = hub_sims(rng, 12, 20), hub_sims(rng, 30, 20), hub_sims(rng, 25, 20)
  beta1, beta2, temperature = 30.0, 60.0, 0.01
  got = nz.normalize(sims, "dualis", bank, temperature=temperature, gallery_bank=gallery_bank,
                     beta1=beta1, beta2=beta2)
  # DualIS: exp(b1 s) / sum_b exp(b1 bank_b) * exp(b2 s) / sum_g exp(b2 gallery_bank_g).
  s64 = sims.astype(np.float64)
  score = (np.exp(beta1 * s64) / np.exp(beta1 * bank.astype(np.float64)).sum(axis=0) *
           np.exp(beta2 * s64) / np.exp(beta2 * gallery_bank.astype(np.float64)).sum(axis=0))
  np.testing.assert_allclose(got * (beta1 + beta2) * temperature, np.log(score), rtol=1e-5,
                             atol=1e-3)
  with pytest.raises(ValueError, match="needs a gallery bank"):
    nz.normalize(sims, "dualis", bank, temperature=temperature)
  with pytest.raises(ValueError, match="takes no gallery bank"):
    nz.normalize(sims, "is", bank, temperature=temperature, gallery_bank=gallery_bank)
