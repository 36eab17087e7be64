"""Hyper-parameter selection on the bank alone (ncl_jax.selection and posthoc --select bank)."""

import json
import statistics

import numpy as np
import pytest
from scipy.special import logsumexp, softmax

from ncl_jax import evaluate
from ncl_jax import metrics
from ncl_jax import normalize as nz
from ncl_jax import posthoc
from ncl_jax import selection
from ncl_jax import train
from ncl_jax.errors import UserError

import train_testutils as tu
from normalize_testutils import hub_sims

TITLES = "msrvtt_cap4video/msrvtt_titles_matrix.npy"
VIDEO = "msrvtt_cap4video/msrvtt_video_matrix.npy"


def _hub_bank(rng, n_rows=60, n_cols=12, dim=8):
  return hub_sims(rng, n_rows, n_cols, dim)


def test_balance_scores_match_a_numpy_reference(rng):
  """Each grid score is the two-fold mean relative error of held-out bank rows' summed mass."""
  bank = _hub_bank(rng)
  temperature = 0.05
  chosen = selection.select_on_bank("is", bank, temperature=temperature, seed=3)
  # The documented split: a seeded permutation, halves as pseudo-queries / pseudo-bank.
  order = np.random.default_rng(3).permutation(len(bank))
  halves = [bank[np.sort(order[:30])].astype(np.float64), bank[np.sort(order[30:])]]
  assert len(chosen.grid) == len(selection.grid("is")["beta"]) * len(selection.grid("is")["alpha"])
  for point in chosen.grid:
    beta, alpha = point["beta"], point["alpha"]
    errors = []
    for q in (0, 1):
      queries, pseudo_bank = halves[q], halves[1 - q].astype(np.float64)
      # Inverted softmax (Smith et al. 2017) on the model's logit scale, then the row softmax.
      logits = queries / temperature - alpha * logsumexp(beta * pseudo_bank, axis=0) / (
          beta * temperature)
      mass = softmax(logits, axis=1).sum(axis=0)
      errors.append(np.mean(np.abs(mass / (len(queries) / bank.shape[1]) - 1)))
    assert point["score"] == pytest.approx(np.mean(errors), rel=1e-4)
  best = min(chosen.grid, key=lambda p: p["score"])
  assert chosen.values == {"beta": best["beta"], "alpha": best["alpha"]}
  assert chosen.criterion == "balance"
  assert chosen.rows == 60


def test_recall_criterion_uses_the_bank_labels(rng):
  bank = _hub_bank(rng, n_rows=80)
  labels = np.argmax(bank + 0.05 * rng.standard_normal(bank.shape), axis=1)
  chosen = selection.select_on_bank("csls", bank, temperature=0.05, bank_gt=labels)
  assert chosen.criterion == "recall"
  # k <= the 40-row pseudo-bank
  assert sorted({p["k"] for p in chosen.grid}) == [1, 2, 5, 10, 20]
  best_recall = max(p["score"] for p in chosen.grid)
  assert next(p for p in chosen.grid if p["k"] == chosen.values["k"] and
              p["alpha"] == chosen.values["alpha"])["score"] == best_recall


def test_methods_without_knobs_and_dsl_without_labels(rng):
  bank = _hub_bank(rng)
  assert selection.select_on_bank("none", bank, temperature=0.05).values == {}
  with pytest.raises(ValueError, match="labelled bank"):
    selection.select_on_bank("dsl", bank, temperature=0.05)
  with pytest.raises(ValueError, match="at least 4 rows"):
    selection.select_on_bank("is", bank[:3], temperature=0.05)


def test_choice_ignores_the_test_queries(shared_data_dir, tmp_path):
  """Inductive --select bank: other test queries, same banks -> the same hyper-parameters."""
  video = np.load(shared_data_dir / VIDEO)
  titles = np.load(shared_data_dir / TITLES)
  paths = {name: tmp_path / f"{name}.npy" for name in ("bank", "vbank", "a", "b")}
  np.save(paths["bank"], titles[:400])    # 400 text queries x the 1000 videos
  np.save(paths["vbank"], titles.T[:400])  # 400 video queries x the 1000 captions
  np.save(paths["a"], video)
  np.save(paths["b"], titles)             # every test row replaced by another one
  chosen = []
  for name in ("a", "b"):
    out = tmp_path / f"{name}.json"
    assert posthoc.main([str(paths[name]), "--method", "csls", "--select", "bank", "--bank",
                         str(paths["bank"]), "--v2t-bank", str(paths["vbank"]),
                         "--json", str(out)]) == 0
    chosen.append(json.loads(out.read_text()))
  assert chosen[0]["hyperparameters"] == chosen[1]["hyperparameters"]
  assert chosen[0]["selection"] == chosen[1]["selection"]
  assert chosen[0]["t2v"] != chosen[1]["t2v"]  # the test rows did change
  assert chosen[0]["selection"]["t2v"]["criterion"] == "balance"
  assert set(chosen[0]["hyperparameters"]["t2v"]) == {"k", "alpha"}


def test_cli_dsl_selects_on_labelled_banks_only(shared_data_dir, tmp_path, capsys):
  video = np.load(shared_data_dir / VIDEO)
  paths = {name: tmp_path / f"{name}.npy" for name in ("sims", "bank", "vbank", "gt")}
  np.save(paths["sims"], video[500:, 500:])  # test: the last 500 captions and videos
  np.save(paths["bank"], video[:500, 500:])  # other captions x the test videos
  np.save(paths["vbank"], video.T[:500, 500:])
  np.save(paths["gt"], np.arange(500))  # a stand-in labelling, for the interface only
  base = [str(paths["sims"]), "--method", "dsl", "--select", "bank"]
  with pytest.raises(UserError, match="--bank-gt"):
    posthoc.main(base)
  with pytest.raises(UserError, match="never used for selection"):
    posthoc.main([str(paths["sims"]), "--method", "is", "--bank-gt", str(paths["gt"])])
  out = tmp_path / "dsl.json"
  assert posthoc.main(base + ["--bank", str(paths["bank"]), "--bank-gt", str(paths["gt"]),
                              "--v2t-bank", str(paths["vbank"]), "--v2t-bank-gt",
                              str(paths["gt"]), "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert result["selection"]["t2v"]["criterion"] == "recall"
  temperature = result["hyperparameters"]["t2v"]["dsl_temperature"]
  assert temperature in selection.grid("dsl")["dsl_temperature"]
  # DSL still normalizes over the test queries: the bank served the selection only.
  expected = nz.dsl(np.load(paths["sims"]), temperature=0.01, dsl_temperature=temperature)
  assert result["t2v"] == metrics.t2v_metrics(expected)
  assert "selection bank:" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# Training runs: selection on the validation split (ncl_jax.evaluate).

def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _numpy_csls_logits(sims, bank_sims, k, temperature, alpha=1.0):
  """CSLS (Conneau et al. 2018) without the per-query term, on the logit scale, bias x alpha."""
  r = np.sort(bank_sims, axis=0)[-k:].mean(axis=0)
  return (sims - alpha * r[None, :] / 2) / temperature


def _guarded(points, ranks, level=0.05):
  """The documented rule: the best (R@1, -MnR) point (first in grid order among equals), kept
  only if it fixes significantly more top-1 hits than the first strength-0 point breaks (a
  one-sided sign test, Bonferroni-corrected over the other grid points)."""
  z = statistics.NormalDist().inv_cdf(1 - level / (len(points) - 1))
  keys = [(np.mean(r <= 1), -np.mean(r)) for r in ranks]
  best = max(range(len(points)), key=lambda i: (keys[i], -i))
  plain = next(i for i, p in enumerate(points) if p.get("alpha", p.get("lambda")) == 0)
  wins = np.sum((ranks[best] <= 1) & (ranks[plain] > 1))
  losses = np.sum((ranks[best] > 1) & (ranks[plain] <= 1))
  return points[best] if wins - losses >= z * np.sqrt(wins + losses) else points[plain]


def test_validation_selection_then_test_report():
  rng = np.random.default_rng(5)
  d, scale = 8, 50.0
  hub = _unit(rng.normal(size=d))

  def split(n):  # pairs where some videos lie near a shared direction (hubs)
    video = _unit(rng.normal(size=(n, d)) + 2 * rng.random((n, 1)) * hub)
    return _unit(video + 0.9 * rng.normal(size=(n, d))), video

  (val_t, val_v), (test_t, test_v), (bank_t, bank_v) = split(40), split(30), split(60)
  config = tu.load_config("synthetic").eval
  chosen, report = evaluate.select_hyperparameters(
      val_t, val_v, np.arange(40), logit_scale=scale, text_bank=bank_t, video_bank=bank_v,
      methods=("csls",), eval_config=config)
  # Independent reference: validation ranks of each (k, alpha) with numpy CSLS, bank x val
  # videos (k outer, alpha inner, k <= the 60-row bank), then the guarded rule.
  sims = val_t @ val_v.T
  points = [{"k": k, "alpha": a} for k in selection.grid("csls")["k"] if k <= 60
            for a in selection.grid("csls")["alpha"]]
  ranks = [metrics.t2v_ranks(_numpy_csls_logits(sims, bank_t @ val_v.T, p["k"], 1 / scale,
                                                p["alpha"])) for p in points]
  assert chosen["csls"]["t2v"] == _guarded(points, ranks)
  k, alpha = chosen["csls"]["t2v"]["k"], chosen["csls"]["t2v"]["alpha"]
  assert report["csls"]["t2v"]["criterion"] == "validation"
  # The test split is then normalized at the chosen k with the same kind of bank.
  out = evaluate.retrieval_results(test_t, test_v, np.arange(30), logit_scale=scale,
                                   text_bank=bank_t, video_bank=bank_v, eval_config=config,
                                   methods=chosen)
  expected = metrics.t2v_metrics(_numpy_csls_logits(test_t @ test_v.T, bank_t @ test_v.T, k,
                                                    1 / scale, alpha))
  assert out["methods"]["csls"]["t2v"] == pytest.approx(expected)
  assert out["methods"]["csls"]["hyperparameters"] == chosen["csls"]


def test_unknown_extra_method_is_a_user_error():
  config = tu.load_config("synthetic").eval
  config.methods = "is, sinkhorn"
  with pytest.raises(UserError, match="unknown normalizer 'sinkhorn'"):
    evaluate.extra_methods(config)
  config.methods = "ncl,qbnorm,is,csls,nnn,dn,dsl"
  assert evaluate.extra_methods(config) == ("ncl", "qbnorm", "is", "csls", "nnn", "dn", "dsl")
  config.methods = "dualis"  # needs a gallery bank, which a training run does not keep
  with pytest.raises(UserError, match="unknown normalizer 'dualis'"):
    evaluate.extra_methods(config)


@pytest.mark.slow
def test_training_run_reports_methods_selected_on_validation(tmp_path):
  config = tu.tiny_config("ncl", total_steps=2, eval_every_steps=0)
  config.eval.methods = "ncl,is,dsl"
  with tu.fast_compile():
    results = train.train_and_evaluate(config, str(tmp_path))
  assert results["hyperparameter_selection"]["split"] == "val"
  for method, knob in (("ncl", "alpha"), ("is", "beta"), ("dsl", "dsl_temperature")):
    block = results["eval"]["methods"][method]
    for direction in ("t2v", "v2t"):
      assert 0 <= block[direction]["R@1"] <= block[direction]["R@5"] <= 100
      value = block["hyperparameters"][direction][knob]
      assert value in selection.grid(method)[knob]
      report = results["hyperparameter_selection"]["report"][method][direction]
      assert report["values"][knob] == value
      assert report["values"] == block["hyperparameters"][direction]


# ---------------------------------------------------------------------------------------------
# posthoc --select val: options chosen on a validation split, applied to the test split.

def _thirds(sims):
  """Leak-free roles from one 1k matrix: validation pairs 0-299, test pairs 300-599, and bank
  captions / videos 600-899 (their own answers in neither gallery)."""
  val, test, bank = slice(0, 300), slice(300, 600), slice(600, 900)
  return {"val": sims[val, val], "val_bank": sims[bank, val], "val_vbank": sims[val, bank].T,
          "test": sims[test, test], "bank": sims[bank, test], "vbank": sims[test, bank].T}


def test_select_val_never_reads_the_test_labels(shared_data_dir, tmp_path):
  """Other test queries (rows replaced), same validation data -> the same choice."""
  titles, video = np.load(shared_data_dir / TITLES), np.load(shared_data_dir / VIDEO)
  parts = _thirds(titles)
  parts["other"] = _thirds(video)["test"]  # every test row replaced by another one
  paths = {name: tmp_path / f"{name}.npy" for name in parts}
  for name, array in parts.items():
    np.save(paths[name], np.ascontiguousarray(array))
  results = []
  for test in ("test", "other"):
    out = tmp_path / f"{test}.json"
    assert posthoc.main([str(paths[test]), "--method", "ncl", "--select", "val", "--bank",
                         str(paths["bank"]), "--v2t-bank", str(paths["vbank"]), "--val",
                         str(paths["val"]), "--val-bank", str(paths["val_bank"]),
                         "--val-v2t-bank", str(paths["val_vbank"]), "--json", str(out)]) == 0
    results.append(json.loads(out.read_text()))
  assert results[0]["hyperparameters"] == results[1]["hyperparameters"]
  assert results[0]["selection"] == results[1]["selection"]
  assert results[0]["t2v"] != results[1]["t2v"]
  assert results[0]["selection"]["rule"] == "val"
  # The chosen alpha follows the guarded rule on the validation ranks.
  grid = results[0]["selection"]["t2v"]["grid"]
  points = [{"alpha": a} for a in selection.grid("ncl")["alpha"]]
  assert [p["alpha"] for p in grid] == [p["alpha"] for p in points]
  ranks = [metrics.t2v_ranks(nz.normalize(parts["val"], "ncl", parts["val_bank"],
                                          temperature=0.01, alpha=p["alpha"])) for p in points]
  assert [p["score"] for p in grid] == pytest.approx([100 * np.mean(r <= 1) for r in ranks])
  assert results[0]["hyperparameters"]["t2v"] == _guarded(points, ranks)


def test_guard_keeps_plain_unless_the_winner_is_clear(rng):
  """select_on_queries: a one-query win over the strength-0 point is refused, a clear one kept."""
  queries, bank = hub_sims(rng, 16, 16), hub_sims(rng, 20, 16)
  plain_logits = queries / 0.05
  ranks_plain = np.array([1, 1] + [2] * 14)
  small = np.array([1, 1, 1] + [2] * 13)  # 1 win: z = 2.24 for 5 grid points wants 2.24
  for other, expected in ((small, 0.0), (np.array([1] * 12 + [2] * 4), 0.25)):  # 10 wins

    def ranks(logits, other=other):  # every non-plain point scores alike: the first one wins
      return ranks_plain if np.allclose(logits, plain_logits, atol=1e-4) else other

    chosen = selection.select_on_queries("ncl", queries, bank, temperature=0.05, ranks=ranks)
    assert chosen.values == {"alpha": expected}
    assert chosen.grid[1]["wins"] == int(np.sum((other <= 1) & (ranks_plain > 1)))
  unguarded = selection.select_on_queries(
      "ncl", queries, bank, temperature=0.05, guard=None,
      ranks=lambda logits: ranks_plain if np.allclose(logits, plain_logits, atol=1e-4) else small)
  assert unguarded.values == {"alpha": 0.25}



@pytest.mark.parametrize("argv, message", [
    (["--select", "val"], "needs --val"),
    (["--val", "{test}"], "serves --select val only"),
    (["--select", "val", "--val", "{test}", "--bank", "{bank}"], "needs --val-bank"),
    (["--select", "val", "--val", "{test}", "--val-bank", "{bank}"], "needs a --bank file"),
    (["--method", "dualis"], "needs --gallery-bank"),
    (["--method", "is", "--gallery-bank", "{bank}"], "serves methods with a gallery bank"),
])
def test_select_val_and_gallery_bank_mistakes(tmp_path, rng, argv, message):
  paths = {"test": tmp_path / "test.npy", "bank": tmp_path / "bank.npy"}
  np.save(paths["test"], hub_sims(rng, 8, 8))
  np.save(paths["bank"], hub_sims(rng, 20, 8))
  with pytest.raises(UserError, match=message):
    posthoc.main([str(paths["test"]), "--method", "ncl"] +
                 [a.format(**paths) for a in argv])


def test_dualis_through_posthoc_with_gallery_banks(tmp_path, rng):
  sims, bank, vbank = hub_sims(rng, 10, 10), hub_sims(rng, 30, 10), hub_sims(rng, 30, 10)
  gbank, vgbank = hub_sims(rng, 20, 10), hub_sims(rng, 20, 10)
  paths = {}
  for name, array in (("sims", sims), ("bank", bank), ("vbank", vbank), ("gbank", gbank),
                      ("vgbank", vgbank)):
    paths[name] = tmp_path / f"{name}.npy"
    np.save(paths[name], array)
  out = tmp_path / "out.json"
  assert posthoc.main([str(paths["sims"]), "--method", "dualis", "--bank", str(paths["bank"]),
                       "--v2t-bank", str(paths["vbank"]), "--gallery-bank", str(paths["gbank"]),
                       "--v2t-gallery-bank", str(paths["vgbank"]), "--dualis-beta1", "20",
                       "--select", "bank", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  t2v = result["hyperparameters"]["t2v"]
  assert set(t2v) == {"beta1", "beta2"}
  expected = nz.normalize(sims, "dualis", bank, temperature=0.01, gallery_bank=gbank, **t2v)
  assert result["t2v"] == pytest.approx(metrics.t2v_metrics(expected))
  # --select val: the validation split brings its own query and gallery banks.
  val_argv = ["--select", "val", "--val", str(paths["sims"]), "--val-bank", str(paths["bank"]),
              "--val-v2t-bank", str(paths["vbank"]), "--val-gallery-bank", str(paths["gbank"]),
              "--val-v2t-gallery-bank", str(paths["vgbank"])]
  base = [str(paths["sims"]), "--method", "dualis", "--bank", str(paths["bank"]), "--v2t-bank",
          str(paths["vbank"]), "--gallery-bank", str(paths["gbank"]), "--v2t-gallery-bank",
          str(paths["vgbank"])]
  with pytest.raises(UserError, match="needs --val-gallery-bank"):
    posthoc.main(base + val_argv[:-4])
  out = tmp_path / "val.json"
  assert posthoc.main(base + val_argv + ["--json", str(out)]) == 0
  selected = json.loads(out.read_text())
  assert selected["selection"]["rule"] == "val"
  grid = selected["selection"]["t2v"]["grid"]
  assert len(grid) == 16 and "wins" not in grid[0]  # no plain point in dualis's grid: no guard
  best = max(grid, key=lambda p: p["score"])["score"]
  chosen = selected["hyperparameters"]["t2v"]
  assert next(p for p in grid if p["beta1"] == chosen["beta1"] and
              p["beta2"] == chosen["beta2"])["score"] == best
