"""The retrieval explorer: its numbers, its JSON API, its command line and its page in Chromium.

References: the trainer's own evaluation of the same checkpoint (results.json: plain and NCL
metrics, normalization errors) and NumPy written from the definitions (cosine scores, softmax
mass per video, rank positions). The browser test drives Debian's Chromium through Playwright.
"""

import importlib.util
import io
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest

import bundle_testutils
from suite_testutils import require_module, unavailable

REPO = pathlib.Path(__file__).resolve().parents[1]
CHROMIUM = pathlib.Path("/usr/bin/chromium")
# Flags for Chromium in a sandbox without network or GPU (see .ci/run).
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"]
START_TIMEOUT_S = 180


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  return bundle_testutils.tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def explorer(run):
  from ncl_jax.explore import core
  return core.open_explorer(workdir=str(run))


@pytest.fixture(scope="module")
def results(run):
  return json.loads((run / "results.json").read_text())


def _env():
  return dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def _cli(*args, timeout=120):
  return subprocess.run([sys.executable, "-m", "ncl_jax.explore", *args], cwd=REPO, env=_env(),
                        capture_output=True, text=True, timeout=timeout, check=False)


# The numbers --------------------------------------------------------------------------------


def test_test_ranks_reproduce_the_runs_evaluation(explorer, results):
  for mode in ("plain", "ncl"):
    expected = results["eval"][mode]["t2v"]
    got = explorer.query_metrics[mode]
    for name in ("R@1", "R@5", "R@10", "MdR", "MnR"):
      assert got[name] == pytest.approx(expected[name], abs=1e-9), (mode, name)
    # The split's captions as queries: the evaluation's normalization error, t2v direction.
    for name in ("mae", "relative_mae"):
      error = explorer.masses["test"].error[mode][name]
      assert error == pytest.approx(results["normalization_error_detail"][mode]["t2v"][name],
                                    rel=1e-4), (mode, name)


def _softmax_mass(logits):
  logits = logits - logits.max(axis=1, keepdims=True)
  weights = np.exp(logits)
  return (weights / weights.sum(axis=1, keepdims=True)).sum(axis=0)


def test_search_scores_and_ranks_follow_their_definitions(explorer):
  caption = 3
  video_emb = explorer.gallery.embeddings
  cos = video_emb @ explorer.text_emb[caption]
  ncl = cos / explorer.bundle.temperature + explorer.biases.bias
  result = explorer.search(caption=caption, k=10)
  for mode, scores in (("plain", cos), ("ncl", ncl)):
    column = result[mode]
    assert [item["rank"] for item in column] == list(range(1, 11))
    assert [item["index"] for item in column] == list(np.argsort(-scores, kind="stable")[:10])
    np.testing.assert_allclose([item["score"] for item in column],
                               np.sort(scores)[::-1][:10], rtol=1e-5, atol=1e-5)
  place = {mode: {int(j): r + 1 for r, j in enumerate(np.argsort(-s, kind="stable"))}
           for mode, s in (("plain", cos), ("ncl", ncl))}
  for item in result["plain"] + result["ncl"]:
    assert item["plain_rank"] == place["plain"][item["index"]]
    assert item["ncl_rank"] == place["ncl"][item["index"]]
    assert item["id"] == explorer.video_ids[item["index"]]
    assert item["ground_truth"] == (item["index"] == explorer.caption_to_video[caption])
  gt = result["ground_truth"]
  assert gt["index"] == explorer.caption_to_video[caption]
  assert gt["plain_rank"] == place["plain"][gt["index"]]
  assert gt["ncl_rank"] == place["ncl"][gt["index"]]


def test_a_typed_caption_ranks_like_the_stored_one(explorer):
  for caption in (0, 5):
    typed = explorer.search(text=explorer.captions[caption], k=5)
    stored = explorer.search(caption=caption, k=5)
    for mode in ("plain", "ncl"):
      assert [i["index"] for i in typed[mode]] == [i["index"] for i in stored[mode]]
      np.testing.assert_allclose([i["score"] for i in typed[mode]],
                                 [i["score"] for i in stored[mode]], rtol=1e-4, atol=1e-5)
    assert typed["ground_truth"] is None


def test_hub_masses_follow_the_softmax_definition(explorer):
  temperature = explorer.bundle.temperature
  video_emb = explorer.gallery.embeddings
  bank = explorer.bundle.text_bank @ video_emb.T
  share = explorer.share / explorer.share.sum()
  plain = _softmax_mass(bank / temperature) / (share * len(bank))
  ncl = _softmax_mass(bank / temperature + explorer.biases.bias) / (share * len(bank))
  table = explorer.masses["bank"]
  np.testing.assert_allclose(table.relative["plain"], plain, rtol=1e-4)
  np.testing.assert_allclose(table.relative["ncl"], ncl, rtol=1e-4)
  # Sinkhorn on this bank gives every video its share (to the solver's tolerance).
  assert np.abs(ncl - 1).max() < 0.01
  hubs = explorer.hubs(k=5, over="bank")
  assert [i["index"] for i in hubs["plain"]] == list(np.argsort(-plain, kind="stable")[:5])
  assert sum(hubs["histogram"]["plain"]) == sum(hubs["histogram"]["ncl"]) == len(video_emb)
  assert hubs["hubs"]["plain"] == int(np.sum(plain > 2))
  least = explorer.hubs(k=5, over="test", order="asc")
  values = [i["plain"] for i in least["plain"]]
  assert values == sorted(values)


def test_queries_list_ranks_and_their_distribution(explorer):
  page = explorer.queries(limit=7)
  assert page["total"] == explorer.num_texts and len(page["queries"]) == 7
  for row in page["queries"]:
    assert row["text"] == explorer.captions[row["index"]]
    assert row["plain_rank"] == explorer.query_ranks["plain"][row["index"]]
  for mode in ("plain", "ncl"):
    assert sum(page["rank_distribution"][mode]) == explorer.num_texts
  assert page["rank_distribution"]["plain"][0] == np.sum(explorer.query_ranks["plain"] == 1)
  improved = explorer.queries(order="improved", limit=1000)["queries"]
  gains = [r["plain_rank"] - r["ncl_rank"] for r in improved]
  assert gains == sorted(gains, reverse=True)
  word = explorer.captions[0].split()[0]
  matched = explorer.queries(contains=word.upper())
  assert matched["matched"] == sum(word in c.lower() for c in explorer.captions)


def test_bad_queries_are_refused_with_a_reason(explorer):
  from ncl_jax.errors import UserError
  with pytest.raises(UserError, match="unknown word"):
    explorer.search(text="c0_0 hello")
  with pytest.raises(UserError, match="empty"):
    explorer.search(text="   ")
  with pytest.raises(UserError, match="at most"):
    explorer.search(text="c0_0 " * 100)
  with pytest.raises(UserError, match="either"):
    explorer.search(text="c0_0", caption=1)
  with pytest.raises(UserError, match="caption must lie"):
    explorer.search(caption=explorer.num_texts)
  with pytest.raises(UserError, match="k must lie"):
    explorer.search(caption=0, k=0)
  with pytest.raises(UserError, match="over must be"):
    explorer.hubs(over="train")


def test_a_bundle_serves_the_same_numbers(tmp_path_factory, explorer):
  from ncl_jax.explore import core
  from_bundle = core.open_explorer(bundle_dir=str(bundle_testutils.tiny_bundle(tmp_path_factory)))
  assert from_bundle.source["step"] == explorer.source["step"]
  assert from_bundle.query_metrics == explorer.query_metrics


def test_thumbnails_are_small_jpegs_of_the_first_frame():
  from PIL import Image
  from ncl_jax.explore import core
  frames = np.zeros((3, 2, 40, 60, 3), np.uint8)
  frames[:, 0] = (200, 30, 30)   # first frames red, the rest black
  frames[1, 0] = (30, 30, 200)   # video 1 blue
  collect = core.ThumbnailCollector(pixels=32)
  collect({"video": frames, "mask": np.array([True, True, False])})
  assert len(collect.jpegs) == 2  # the padding row is skipped
  images = [np.asarray(Image.open(io.BytesIO(j))) for j in collect.jpegs]
  assert images[0].shape == (21, 32, 3)  # aspect ratio kept, longest side 32
  np.testing.assert_allclose(images[0].reshape(-1, 3).mean(0), (200, 30, 30), atol=8)
  np.testing.assert_allclose(images[1].reshape(-1, 3).mean(0), (30, 30, 200), atol=8)


class _NumberTokenizer:
  """Words -> ids 1..n (a stand-in for CLIP's BPE in a model with a tiny vocabulary)."""

  def __init__(self, vocab_size):
    self.size = vocab_size

  def encode_batch(self, texts, context_length):
    rows = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
      ids = [1 + sum(map(ord, w)) % (self.size - 3) for w in text.split()][:context_length - 2]
      rows[i, :len(ids) + 2] = [self.size - 2, *ids, self.size - 1]
    return rows


def test_frames_mode_shows_the_first_frame_of_each_video():
  import jax
  import jax.numpy as jnp
  import train_testutils
  from ncl_jax import inference
  from ncl_jax.data.pipeline import ArraySplit, EvalData
  from ncl_jax.explore import core
  from ncl_jax.models.dual_encoder import DualEncoder
  from PIL import Image

  config = train_testutils.tiny_config()
  config.data.name = "msrvtt"
  config.data.image_size = 8
  config.data.max_frames = 2
  config.model.input_mode = "frames"
  config.model.max_frames = 2
  config.model.vision.update(dict(width=16, layers=1, heads=2, patch_size=4, image_size=8))
  rng = np.random.default_rng(0)
  frames = rng.integers(0, 256, size=(5, 2, 8, 8, 3)).astype(np.uint8)
  colours = rng.integers(20, 236, size=(5, 3))
  frames[:, 0] = colours[:, None, None, :]  # a plain first frame per video
  split = ArraySplit(text_tokens=_NumberTokenizer(120).encode_batch(["a b"] * 5, 8),
                     video_array=frames, frame_mask=np.ones((5, 2), bool),
                     caption_to_video=np.arange(5, dtype=np.int32),
                     video_ids=[f"clip{i}" for i in range(5)])
  with train_testutils.fast_compile():
    params = jax.jit(DualEncoder(config.model).init)(
        jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 2, 8, 8, 3)),
        jnp.ones((1, 2), bool))["params"]
    bank = rng.standard_normal((12, config.model.embed_dim)).astype(np.float32)
    bank /= np.linalg.norm(bank, axis=1, keepdims=True)
    bundle = inference.Bundle(config, params, bank, bank, tokenizer=_NumberTokenizer(120))
    explorer = core.Explorer(bundle, EvalData(split, "test"), source={"bundle": "x", "step": 1},
                             batch_size=4)
    result = explorer.search(text="a b c", k=3)
  assert explorer.info()["thumbnails"] is True
  for item in result["plain"]:
    assert item["thumbnail"] == f"/api/thumbnail/{item['index']}"
  for i in range(5):
    image = np.asarray(Image.open(io.BytesIO(explorer.thumbnail(i))))
    np.testing.assert_allclose(image.reshape(-1, 3).mean(0), colours[i], atol=6)
  from ncl_jax.errors import UserError
  with pytest.raises(UserError, match="video index"):
    explorer.thumbnail(5)


# The server ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(run, tmp_path_factory):
  """``python -m ncl_jax.explore --workdir RUN --port 0``: its address and start-up time."""
  started = time.perf_counter()
  cache = tmp_path_factory.mktemp("jax_cache")  # not the user's ~/.cache
  process = subprocess.Popen(
      [sys.executable, "-m", "ncl_jax.explore", "--workdir", str(run), "--port", "0",
       "--compile_cache", str(cache)], cwd=REPO, env=_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  try:
    line = process.stdout.readline()  # blocks until the "serving ..." line or the exit
    if not line.startswith("serving http://127.0.0.1:"):
      process.kill()
      pytest.fail(f"the explorer did not start: {line!r} {process.stderr.read()[-2000:]}")
    url = line.split()[1]
    yield {"url": url, "seconds": time.perf_counter() - started, "pid": process.pid}
  finally:
    process.terminate()
    try:
      process.wait(timeout=20)
    except subprocess.TimeoutExpired:
      process.kill()


def _get(url, headers=None):
  """(status, headers, body) of a GET; JSON bodies decoded."""
  request = urllib.request.Request(url, headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=30) as response:
      status, head, body = response.status, response.headers, response.read()
  except urllib.error.HTTPError as err:
    status, head, body = err.code, err.headers, err.read()
  if head.get("content-type", "").startswith("application/json"):
    body = json.loads(body)
  return status, head, body


def _api(server, path, **params):
  return _get(server["url"] + path.lstrip("/") + "?" + urllib.parse.urlencode(params))


def test_api_info(server, explorer):
  status, head, info = _api(server, "/api/info")
  assert status == 200
  assert info["num_videos"] == explorer.num_videos and info["num_texts"] == explorer.num_texts
  assert info["source"]["step"] == explorer.source["step"]
  assert info["split"] == "test" and info["dataset"] == "synthetic"
  assert "default-src 'none'" in head["content-security-policy"]
  assert head["x-content-type-options"] == "nosniff"


def test_api_search(server, explorer):
  query = explorer.captions[2]
  status, _, result = _api(server, "/api/search", q=query, k=10)
  assert status == 200 and result["query"] == query
  expected = explorer.search(text=query, k=10)
  for mode in ("plain", "ncl"):
    assert len(result[mode]) == 10
    assert {"id", "score", "rank"} <= set(result[mode][0])
    assert [i["id"] for i in result[mode]] == [i["id"] for i in expected[mode]]
    scores = [i["score"] for i in result[mode]]
    assert scores == sorted(scores, reverse=True)
  status, _, by_caption = _api(server, "/api/search", caption=2, k=3)
  assert status == 200 and len(by_caption["ncl"]) == 3
  assert by_caption["ground_truth"]["id"] == explorer.video_ids[explorer.caption_to_video[2]]


def test_api_hubs_and_queries(server, explorer):
  status, _, hubs = _api(server, "/api/hubs", k=4)
  assert status == 200 and hubs["over"] == "test" and len(hubs["plain"]) == 4
  assert hubs["plain"][0]["id"] == explorer.hubs(k=1)["plain"][0]["id"]
  assert len(hubs["histogram"]["edges"]) == len(hubs["histogram"]["plain"]) + 1
  status, _, queries = _api(server, "/api/queries", limit=5, order="worsened")
  assert status == 200 and len(queries["queries"]) == 5
  assert queries["metrics"] == json.loads(json.dumps(explorer.query_metrics))
  status, _, _ = _api(server, "/api/thumbnail/0")
  assert status == 404  # a features-mode model has no frames


def test_api_refuses_bad_input(server):
  status, _, body = _api(server, "/api/search", q="c0_0 " * 70)
  assert status == 422 and "300" in body["error"]
  assert _api(server, "/api/search", q="nonsense")[0] == 400
  assert _api(server, "/api/search", q="c0_0", k=0)[0] == 422
  assert _api(server, "/api/search", q="c0_0", k=101)[0] == 422
  assert _api(server, "/api/search")[0] == 400
  assert _api(server, "/api/hubs", over="../../etc/passwd")[0] == 422
  assert _api(server, "/api/queries", order="__import__('os')")[0] == 422
  for path in ("static/../setup.cfg", "static/%2e%2e/setup.cfg", "etc/passwd",
               "ncl_jax/explore/core.py", "api/thumbnail/..%2f..%2fsetup.cfg"):
    assert _get(server["url"] + path)[0] == 404, path
  # A rebinding site's Host header is refused; the loopback names are served.
  assert _get(server["url"] + "api/info", {"Host": "evil.example"})[0] == 400
  port = urllib.parse.urlparse(server["url"]).port
  assert _get(server["url"] + "api/info", {"Host": f"localhost:{port}"})[0] == 200


# A short soak here; benchmarks/explore_soak.py runs the same one for 30 s (docs/explorer.md).
SOAK_SECONDS = 4
SOAK_MAX_RSS_GROWTH_MIB = 64


def _soak_module():
  path = REPO / "benchmarks" / "explore_soak.py"
  spec = importlib.util.spec_from_file_location("explore_soak", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_sixteen_concurrent_clients_get_no_errors_and_memory_stays_bounded(server):
  result = _soak_module().soak(server["url"], server["pid"], clients=16, seconds=SOAK_SECONDS)
  assert result["errors"] == 0, result["error_examples"]
  assert result["requests"] >= 32, result  # every client got answers, not one each
  assert result["rss_growth_mib"] < SOAK_MAX_RSS_GROWTH_MIB, result
  assert _api(server, "/api/info")[0] == 200  # still serving


def _playwright():
  """Playwright's sync API, or ``unavailable`` where no browser is installed (.ci/run installs
  Chromium and sets NCL_JAX_REQUIRE_ALL, which turns the skip into a failure)."""
  if not CHROMIUM.exists():
    unavailable(f"no {CHROMIUM} (apt-get install chromium; .ci/run installs it)")
  return require_module("playwright.sync_api")


def test_page_in_chromium(server, tmp_path):
  """Chromium loads the page, a typed query fills both columns, the hubs view draws Fig. 2."""
  sync_api = _playwright()
  bank_size = _api(server, "/api/info")[2]["bank_size"]
  problems = []
  with sync_api.sync_playwright() as playwright:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
    try:
      page = browser.new_page(viewport={"width": 1280, "height": 900})
      page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
      page.on("pageerror", lambda err: problems.append(str(err)))
      page.goto(server["url"])
      page.wait_for_function("document.getElementById('source').textContent.includes('videos')")
      # The page says what NCL is: the bias, the bank it comes from, the rank arrows.
      about = page.text_content("#about-ncl")
      for words in ("cos / T + bias", "bias per video", "fair share", "bank",
                    f"{bank_size} training queries", "▲3", "three places"):
        assert words in about, words
      page.fill("#query", "c0_0 c1_1 a3")
      page.press("#query", "Enter")
      page.wait_for_selector("#ncl-results .result")
      assert page.locator("#plain-results .result").count() == 10
      assert page.locator("#ncl-results .result").count() == 10
      assert page.locator("#ncl-results .change").count() == 10  # the rank change is marked
      assert urllib.parse.parse_qs(urllib.parse.urlparse(page.url).query) == {
          "q": ["c0_0 c1_1 a3"]}  # the search is in the URL
      page.screenshot(path=str(tmp_path / "search.png"))
      page.click("button[data-view=queries]")
      page.wait_for_selector("#queries-table tbody tr")
      page.click("#queries-table tbody tr:nth-child(1)")
      page.wait_for_selector("#detail-ncl-results .result.gt, #detail-plain-results .result")
      assert "ranks #" in page.text_content("#query-detail-ranks")
      assert page.locator("#rank-chart rect").count() == 12  # 6 rank groups, plain and NCL
      page.click("button[data-view=hubs]")
      page.wait_for_selector("#hub-histogram rect")
      assert page.locator("#hub-histogram rect").count() >= 2
      assert page.locator("#hubs-plain tbody tr").count() == 20
      assert page.url.endswith("#hubs")
      # The hubs view opens on the split's captions (over the bank NCL is 1.000 by construction).
      assert page.input_value("#hubs-over") == "test"
      assert "captions of the split" in page.text_content("#hubs-summary")
      page.screenshot(path=str(tmp_path / "hubs.png"), full_page=True)

      # A linked search is restored from the URL: the query, its k, both columns.
      linked = browser.new_page(viewport={"width": 1280, "height": 900})
      linked.on("pageerror", lambda err: problems.append(str(err)))
      linked.goto(server["url"] + "?" + urllib.parse.urlencode({"q": "c0_1 a3", "k": 5}))
      linked.wait_for_selector("#ncl-results .result")
      assert linked.input_value("#query") == "c0_1 a3"
      assert linked.locator("#plain-results .result").count() == 5
      assert linked.locator("#ncl-results .result").count() == 5
      # ... and a linked view: #hubs opens the hubs view directly.
      linked.goto(server["url"] + "#hubs")
      linked.wait_for_selector("#hubs-plain tbody tr")
      assert linked.locator("#view-hubs").is_visible()
      assert not linked.locator("#view-search").is_visible()
    finally:
      browser.close()
  assert not problems, problems  # e.g. a script error or a Content-Security-Policy violation
  assert (tmp_path / "search.png").stat().st_size > 10_000


# The command line ---------------------------------------------------------------------------


def _one_error_line(result):
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
  return lines[0]


def test_cli_missing_workdir(tmp_path):
  line = _one_error_line(_cli("--workdir", str(tmp_path / "nope"), "--port", "0"))
  assert "does not exist" in line


def test_cli_run_without_a_selected_checkpoint(run, tmp_path):
  unfinished = tmp_path / "unfinished"
  shutil.copytree(run, unfinished)
  (unfinished / "results.json").unlink()
  line = _one_error_line(_cli("--workdir", str(unfinished), "--port", "0"))
  assert "no selected checkpoint" in line


def test_cli_port_in_use(run):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    started = time.perf_counter()
    line = _one_error_line(_cli("--workdir", str(run), "--port", str(port)))
    assert "--port" in line and str(port) in line
    assert time.perf_counter() - started < 60  # refused before the model is loaded


def test_a_damaged_checkpoint_is_named_with_how_to_choose_another(run, tmp_path):
  from ncl_jax.explore import core
  from ncl_jax.errors import UserError
  damaged_run = tmp_path / "run"
  shutil.copytree(run, damaged_run)
  step = json.loads((run / "results.json").read_text())["selected_step"]
  (damaged_run / "checkpoints" / str(step) / "data" / "process_0-of-1.json").write_bytes(b"")
  (damaged_run / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{")
  with pytest.raises(UserError, match=rf"checkpoint .*/checkpoints/{step} is damaged: state/"
                                      r"_METADATA is not valid JSON; .* tools/export.py .* "
                                      r"--step N, and for the explorer pass --bundle BUNDLE"):
    core.open_explorer(workdir=str(damaged_run))


def test_cli_not_a_bundle(tmp_path):
  line = _one_error_line(_cli("--bundle", str(tmp_path)))
  assert "not an ncl_jax bundle" in line
