"""The synthetic set: determinism, layout, multi-caption maps, learnability and hubness."""

import numpy as np
import pytest
from scipy import stats

from ncl_jax.data import EvalData, default_data_config, get_dataset, synthetic
from ncl_jax.errors import UserError


def _small(**overrides):
  cfg = default_data_config("synthetic")
  cfg.update(dict(num_train_videos=300, num_val_videos=60, num_test_videos=200), **overrides)
  return cfg


def _all(eval_data):
  tokens = np.concatenate([b["text_tokens"][b["mask"]] for b in eval_data.text_batches(64)])
  videos, masks = [], []
  for b in eval_data.video_batches(64):
    videos.append(b["video"][b["mask"]])
    masks.append(b["frame_mask"][b["mask"]])
  return tokens, np.concatenate(videos), np.concatenate(masks)


def test_same_seed_same_data_and_other_seed_differs():
  a, b = get_dataset(_small()), get_dataset(_small())
  c = get_dataset(_small(seed=1))
  for split in ("train", "val", "test"):
    ta, va, ma = _all(a.eval_data(split))
    tb, vb, mb = _all(b.eval_data(split))
    np.testing.assert_array_equal(ta, tb)
    np.testing.assert_array_equal(va, vb)
    np.testing.assert_array_equal(ma, mb)
  assert not np.array_equal(_all(a.eval_data("test"))[1], _all(c.eval_data("test"))[1])


def test_one_split_alone_is_that_split_of_the_whole_set():
  cfg = _small()
  whole = get_dataset(cfg)
  for split in ("val", "test"):
    alone = EvalData(synthetic.make_split(cfg, split), split)
    for a, b in zip(_all(alone), _all(whole.eval_data(split))):
      np.testing.assert_array_equal(a, b)
    assert alone.video_ids == whole.eval_data(split).video_ids
  with pytest.raises(UserError, match="no split"):
    synthetic.make_split(cfg, "dev")


def test_vocabulary_names_every_token_and_reads_them_back():
  cfg = _small()
  vocab = synthetic.SyntheticVocabulary(cfg)
  assert len(vocab.words) == cfg.vocab_size and len(set(vocab.words)) == cfg.vocab_size
  # Layout of the module docstring: concept k's synonym s, then attributes, then noise words.
  assert vocab.words[1 + 3 * cfg.words_per_concept + 2] == "c3_2"
  assert vocab.words[1 + cfg.num_concepts * cfg.words_per_concept + 5] == "a5"
  assert vocab.words[cfg.vocab_size - 3].startswith("w")
  tokens, _, _ = _all(get_dataset(cfg).eval_data("test"))
  text = [vocab.decode(row) for row in tokens]
  np.testing.assert_array_equal(vocab.encode_batch(text, cfg.max_words), tokens)
  assert vocab.encode_batch(["C0_1,  a3"], 5).tolist() == [
      [vocab.start_id, vocab.ids["c0_1"], vocab.ids["a3"], vocab.end_id, 0]]
  assert vocab.encode_batch(["w0 w1 w2 w3"], 4)[0, 1:3].tolist() == [vocab.ids["w0"],
                                                                     vocab.ids["w1"]]
  for bad in ("c0_1 dog", "", "<end>"):
    with pytest.raises(UserError):
      vocab.encode_batch([bad], cfg.max_words)


def test_token_and_frame_layout():
  cfg = _small()
  ds = get_dataset(cfg)
  assert ds.eval_splits == ("val", "test") and ds.validation_split == "val"
  assert ds.num_train_examples == 300
  tokens, videos, masks = _all(ds.eval_data("test"))
  assert tokens.shape == (200, cfg.max_words) and tokens.dtype == np.int32
  assert videos.shape == (200, cfg.max_frames, cfg.feature_dim) and videos.dtype == np.float32
  sot, eot = cfg.vocab_size - 2, cfg.vocab_size - 1
  assert (tokens[:, 0] == sot).all()
  assert (tokens.max(axis=1) == eot).all()          # CLIP-style argmax pooling finds the end.
  end = tokens.argmax(axis=1)
  positions = np.arange(cfg.max_words)[None, :]
  assert (tokens[positions > end[:, None]] == 0).all()
  assert (tokens[(positions > 0) & (positions < end[:, None])] > 0).all()
  frames = masks.sum(axis=1)
  assert frames.min() >= cfg.min_frames and frames.max() <= cfg.max_frames
  assert (masks == (np.arange(cfg.max_frames)[None] < frames[:, None])).all()  # Prefix masks.
  assert (np.abs(videos).sum(-1) > 0)[masks].all()
  assert (videos[~masks] == 0).all()


def test_multi_caption_variant_maps_captions_to_videos():
  ds = get_dataset(_small(captions_per_video=5))
  test = ds.eval_data("test")
  assert (test.num_texts, test.num_videos) == (1000, 200)
  np.testing.assert_array_equal(test.caption_to_video, np.repeat(np.arange(200), 5))
  assert ds.num_train_examples == 1500
  tokens = _all(test)[0]
  # Captions of one video are independent draws, so they differ, yet share concept words.
  assert not np.array_equal(tokens[0], tokens[1])


def _bag_of_words_scores(cfg, ds, split):
  """An independent 'oracle' scorer from the generator's world: caption words → directions."""
  seq = np.random.SeedSequence(int(cfg.seed)).spawn(4)[0]
  world = synthetic._World(cfg, np.random.default_rng(seq))
  table = np.zeros((cfg.vocab_size, cfg.feature_dim))
  for k in range(cfg.num_concepts):
    table[world.concept_words[k]] = world.concept_dirs[k]
  table[world.attribute_words] = cfg.attribute_strength * world.attribute_dirs
  tokens, videos, masks = _all(ds.eval_data(split))
  text = table[tokens].sum(axis=1)
  video = (videos * masks[..., None]).sum(axis=1) / masks.sum(axis=1, keepdims=True) - world.offset
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  video /= np.linalg.norm(video, axis=1, keepdims=True)
  return text @ video.T


def test_learnable_but_not_trivial_and_hubs_appear():
  cfg = default_data_config("synthetic")
  ds = get_dataset(cfg)
  scores = _bag_of_words_scores(cfg, ds, "test")
  gt = ds.eval_data("test").caption_to_video
  ranks = 1 + (scores > scores[np.arange(len(gt)), gt][:, None]).sum(axis=1)
  recall1 = (ranks == 1).mean()
  # The words carry the signal (chance is 1/500), but shared popular concepts and unnamed
  # attributes keep even this oracle far from perfect.
  assert 0.3 < recall1 < 0.9
  top1_counts = np.bincount(scores.argmax(axis=1), minlength=scores.shape[1])
  # Hubness: the top-1 occurrence distribution is strongly right-skewed (uniform would give
  # skewness ~1 for Poisson(1) counts) and many videos are never retrieved.
  assert stats.skew(top1_counts) > 3
  assert top1_counts.max() >= 10
  assert (top1_counts == 0).mean() > 0.2


def test_concept_popularity_is_zipf_like():
  cfg = _small(num_train_videos=2000)
  ds = get_dataset(cfg)
  seq = np.random.SeedSequence(int(cfg.seed)).spawn(4)[0]
  world = synthetic._World(cfg, np.random.default_rng(seq))
  tokens = _all(ds.eval_data("train"))[0]
  word_to_concept = np.full(cfg.vocab_size, -1)
  for k in range(cfg.num_concepts):
    word_to_concept[world.concept_words[k]] = k
  concepts = word_to_concept[tokens]
  counts = np.bincount(concepts[concepts >= 0], minlength=cfg.num_concepts)
  rho = stats.spearmanr(counts, -np.arange(cfg.num_concepts)).statistic
  assert rho > 0.8
  assert counts[0] > 10 * counts[-8:].mean()


@pytest.mark.parametrize("override", [dict(vocab_size=400), dict(input_mode="frames"),
                                      dict(min_frames=9), dict(captions_per_video=0)])
def test_bad_settings_are_user_errors(override):
  with pytest.raises(UserError):
    get_dataset(_small(**override))


def test_default_configs_and_unknown_names():
  from ncl_jax.data import DATASETS
  for name in DATASETS:
    cfg = default_data_config(name)
    assert cfg.name == name
    for field in ("data_dir", "max_words", "max_frames", "input_mode", "seed"):
      assert field in cfg, (name, field)
  with pytest.raises(UserError, match="unknown data set"):
    default_data_config("kinetics")
  cfg = default_data_config("synthetic")
  cfg.name = "kinetics"
  with pytest.raises(UserError, match="unknown data set"):
    get_dataset(cfg)
