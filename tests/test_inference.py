"""ncl_jax.inference on the tiny synthetic run's bundle: embedding round trip, gallery search with
plain and NCL scores against references computed here, bias caching, inputs and errors."""

import json
import pathlib
import re
import shutil

import numpy as np
import pytest

import bundle_testutils
import train_testutils
from ncl_jax import inference, metrics, normalize
from ncl_jax.data import get_dataset, synthetic
from ncl_jax.errors import UserError


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  return bundle_testutils.tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
  return inference.load_bundle(bundle_testutils.tiny_bundle(tmp_path_factory))


@pytest.fixture(scope="module")
def test_split(bundle):
  data = get_dataset(bundle.config.data).eval_data("test")
  tokens = np.concatenate([b["text_tokens"][b["mask"]] for b in data.text_batches(16)])
  batches = list(data.video_batches(16))
  videos = np.concatenate([b["video"][b["mask"]] for b in batches])
  masks = np.concatenate([b["frame_mask"][b["mask"]] for b in batches])
  return tokens, videos, masks, data.caption_to_video


def _numpy_ncl_biases(bank_sims, temperature, iterations=5000):
  """Sinkhorn by hand in float64: rows sum to 1, columns to n_bank / n_candidates."""
  logits = bank_sims.astype(np.float64) / temperature
  n_bank, n_cols = logits.shape
  target = np.full(n_cols, n_bank / n_cols)
  g = np.zeros(n_cols)
  for _ in range(iterations):
    z = logits + g
    z -= z.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    g += np.log(target) - np.log(p.sum(axis=0))
  return g - g.mean()


def test_search_reproduces_the_runs_metrics(run_dir, bundle, test_split):
  tokens, videos, masks, caption_to_video = test_split
  text = bundle.embed_texts(tokens, batch_size=16)
  video = bundle.embed_videos(videos, masks, batch_size=16)
  results = json.loads((run_dir / "results.json").read_text())["eval"]
  gallery = bundle.gallery(video)
  for mode in ("plain", "ncl"):
    scores = gallery.scores(text, normalization=mode)
    got = metrics.t2v_metrics(scores, caption_to_video)
    for key, value in results[mode]["t2v"].items():
      assert got[key] == pytest.approx(value, abs=1e-9), (mode, key)
  # Video-to-text through a text gallery and the video bank.
  scores = bundle.gallery(text, kind="text").scores(video, normalization="ncl")
  got = metrics.v2t_metrics(scores, caption_to_video)
  for key, value in results["ncl"]["v2t"].items():
    assert got[key] == pytest.approx(value, abs=1e-9), key


def test_ncl_scores_match_a_numpy_sinkhorn(bundle, test_split):
  _, videos, masks, _ = test_split
  video = bundle.embed_videos(videos, masks)
  gallery = bundle.gallery(video)
  queries = bundle.text_bank[:5]
  want_bias = _numpy_ncl_biases(bundle.text_bank @ video.T, bundle.temperature)
  got = gallery.scores(queries, normalization="ncl")
  want = (queries @ video.T) / bundle.temperature + want_bias
  # Biases are defined up to a constant: compare after centring each row.
  np.testing.assert_allclose(got - got.mean(1, keepdims=True),
                             want - want.mean(1, keepdims=True), atol=2e-3)
  top, top_scores = gallery.search(queries, k=3, normalization="ncl")
  np.testing.assert_array_equal(top, np.argsort(-got, axis=1, kind="stable")[:, :3])
  np.testing.assert_allclose(top_scores, np.take_along_axis(got, top, 1))
  plain_top, _ = gallery.search(queries, k=1, normalization="plain")
  np.testing.assert_array_equal(plain_top[:, 0], np.argmax(queries @ video.T, axis=1))


def test_biases_are_computed_once_per_gallery(bundle, test_split, monkeypatch):
  _, videos, masks, _ = test_split
  calls = []
  original = normalize.ncl_biases
  monkeypatch.setattr(normalize, "ncl_biases",
                      lambda *a, **k: calls.append(1) or original(*a, **k))
  gallery = bundle.gallery(bundle.embed_videos(videos, masks))
  first = gallery.search(bundle.text_bank[:3], k=2)
  second = gallery.search(bundle.text_bank[3:9], k=2)
  assert len(calls) == 1 and first[0].shape == (3, 2) and second[0].shape == (6, 2)
  bundle.gallery(gallery.embeddings[:5]).search(bundle.text_bank[:1])
  assert len(calls) == 2   # a new gallery gets its own biases


def test_variable_length_videos_and_short_token_rows(bundle, test_split):
  tokens, videos, masks, _ = test_split
  lengths = masks.sum(1)
  clips = [v[:n] for v, n in zip(videos[:4], lengths[:4])]
  np.testing.assert_allclose(bundle.embed_videos(clips), bundle.embed_videos(videos[:4], masks[:4]),
                             atol=1e-6)
  # Longer clips are subsampled uniformly to max_frames, as in training.
  t = bundle.max_frames
  long_clip = np.concatenate([videos[0][:lengths[0]]] * 3)
  keep = np.linspace(0, len(long_clip) - 1, t).astype(int)
  np.testing.assert_allclose(bundle.embed_videos([long_clip]),
                             bundle.embed_videos(long_clip[keep][None]), atol=1e-6)
  # Token rows shorter than max_words are zero-padded.
  short = tokens[:3, :5].copy()
  padded = np.zeros((3, bundle.max_words), np.int32)
  padded[:, :5] = short
  np.testing.assert_allclose(bundle.embed_texts(short), bundle.embed_texts(padded), atol=1e-6)


def test_bad_inputs_raise_user_errors(bundle, tmp_path):
  with pytest.raises(UserError, match="unknown word 'a'"):  # the synthetic words only
    bundle.embed_texts(["a caption"])
  without_vocabulary = inference.Bundle(bundle.config, bundle.params, bundle.text_bank,
                                        bundle.video_bank)
  with pytest.raises(UserError, match="no tokenizer"):
    without_vocabulary.embed_texts(["c0_1"])
  with pytest.raises(UserError, match="videos must be"):
    bundle.embed_videos(np.zeros((2, 3, 5), np.float32))
  with pytest.raises(UserError, match="normalization must be"):
    bundle.gallery(np.eye(4, bundle.embed_dim, dtype=np.float32)).scores(
        np.ones((1, bundle.embed_dim)), normalization="dsl")
  with pytest.raises(UserError, match="not an ncl_jax bundle"):
    inference.load_bundle(tmp_path)
  with pytest.raises(UserError, match="backend must be"):
    inference.Bundle(bundle.config, bundle.params, bundle.text_bank, bundle.video_bank,
                     backend="onnx")


def test_bundle_from_workdir_and_bundled_vocabulary(run_dir, bundle, tmp_path):
  from_run = inference.bundle_from_run(run_dir)
  np.testing.assert_array_equal(from_run.text_bank, bundle.text_bank)
  tokens = np.ones((2, bundle.max_words), np.int32)
  np.testing.assert_allclose(from_run.embed_texts(tokens), bundle.embed_texts(tokens), atol=1e-6)
  # Real-data runs bundle CLIP's vocabulary from their CLIP directory.
  from ncl_jax import export
  from ncl_jax import runs
  from ncl_jax import tokenizer
  vocab = tokenizer.find_vocab(None)
  clip_dir = tmp_path / "clip"
  clip_dir.mkdir()
  shutil.copyfile(vocab, clip_dir / tokenizer.VOCAB_FILE)
  config = bundle.config.copy_and_resolve_references()
  config.data.name, config.clip_dir = "msvd", str(clip_dir)
  assert runs.find_vocabulary(config) == clip_dir / tokenizer.VOCAB_FILE
  # A run whose config says so gets the vocabulary in its bundle, and strings are tokenized.
  run = tmp_path / "run"
  shutil.copytree(run_dir, run)
  stored = json.loads((run / "config.json").read_text())
  stored["data"]["name"], stored["clip_dir"] = "msvd", str(clip_dir)
  (run / "config.json").write_text(json.dumps(stored))
  with train_testutils.fast_compile():
    manifest = export.export_bundle(run, tmp_path / "bundle", platforms=("cpu",))
  assert manifest["tokenizer"] == tokenizer.VOCAB_FILE
  assert (tmp_path / "bundle" / tokenizer.VOCAB_FILE).read_bytes() == vocab.read_bytes()
  loaded = inference.load_bundle(tmp_path / "bundle")
  want = tokenizer.ClipTokenizer(vocab).encode_batch(["A dog, surfing!"], loaded.max_words)
  np.testing.assert_array_equal(loaded.tokenize(["A dog, surfing!"]), want)


def _synthetic_ids(cfg, concept, synonym, attribute, noise):
  """Token ids by the layout in ncl_jax/data/synthetic.py's docstring: 0 padding, then
  concept synonyms, attributes, noise words; start and end are the last two ids."""
  first_attribute = 1 + cfg.num_concepts * cfg.words_per_concept
  first_noise = first_attribute + cfg.num_attributes
  return [cfg.vocab_size - 2, 1 + concept * cfg.words_per_concept + synonym,
          first_attribute + attribute, first_noise + noise, cfg.vocab_size - 1]


def test_synthetic_bundle_embeds_the_sets_words(run_dir, bundle):
  cfg = bundle.config.data
  row = np.zeros((1, bundle.max_words), np.int32)
  ids = _synthetic_ids(cfg, 0, 1, 7, 3)
  row[0, :len(ids)] = ids
  want = bundle.embed_texts(row)
  np.testing.assert_allclose(bundle.embed_texts(["c0_1 a7 w3"]), want, atol=1e-6)
  np.testing.assert_allclose(inference.bundle_from_run(run_dir).embed_texts(["c0_1 a7 w3"]),
                             want, atol=1e-6)
  # The demo's own vocabulary (200 attributes) round-trips through the bundle's file.
  demo = synthetic.default_config()
  path = pathlib.Path(run_dir).parent / "demo_vocab.txt"
  synthetic.SyntheticVocabulary(demo).save(path)
  loaded = synthetic.SyntheticVocabulary.load(path)
  np.testing.assert_array_equal(loaded.encode_batch(["c0_1 a17 w3"], 6)[0],
                                _synthetic_ids(demo, 0, 1, 17, 3) + [0])


def test_docs_snippet_runs_on_the_demo_bundle(tmp_path_factory, capsys):
  """docs/inference.md's Python snippet, as written, on the tiny run's bundle."""
  doc = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()
  snippet = re.search(r"<!-- inference-snippet -->\n```python\n(.*?)```", doc, re.S).group(1)
  assert '"/tmp/ncl_bundle"' in snippet
  bundle_dir = bundle_testutils.tiny_bundle(tmp_path_factory)
  namespace = {}
  exec(snippet.replace('"/tmp/ncl_bundle"', repr(str(bundle_dir))), namespace)  # pylint: disable=exec-used
  top, scores = namespace["top"], namespace["scores"]
  assert top.shape == scores.shape == (1, 10)
  assert np.all(np.diff(scores[0]) <= 0)  # best first
  assert len(set(top[0].tolist())) == 10
  assert capsys.readouterr().out.startswith("best test videos:")


def test_reading_a_run_logs_no_orbax_metadata_warning(run_dir, caplog):
  """explore, export and embed read a run's train state (checkpoints/N/state), whose step
  metadata lives one level up; orbax's warning about it is noise and is filtered."""
  from ncl_jax import runs
  with caplog.at_level("WARNING"):
    run = runs.restore_run(run_dir)
  assert run.params is not None
  assert not [r for r in caplog.records if "_CHECKPOINT_METADATA" in r.getMessage()]
