"""The built-in synthetic retrieval set: token-id captions and per-frame video features.

It exists so that the demo and the tests can train and evaluate a retrieval model in seconds
without downloading anything, through exactly the interface of the real data sets.

Generative story (all draws from ``np.random.default_rng(seed)``-derived streams):

1. A *world* shared by every split: ``num_concepts`` concepts, each with a unit feature
   direction in R^D and ``words_per_concept`` synonym words; ``num_attributes`` instance
   attributes ("red", "at night", ...), each with a direction and one word; a common offset
   shared by all frames (real CLIP features have a large common component); and a pool of noise
   words ("a", "the", ...).
2. A video draws 1..``max_concepts_per_video`` distinct concepts with Zipf-like popularity
   ``p_k ∝ (k + 1) ** -zipf_exponent`` and one attribute (uniform). It has ``min_frames`` to
   ``max_frames`` frames; in each frame every concept is visible with probability
   ``frame_concept_prob``. Frame feature = sum of visible concept directions
   + ``attribute_strength`` · attribute direction + common offset + Gaussian noise with a
   per-video scale ``noise_scale · LogNormal(0, noise_spread)`` (clean and noisy clips).
3. A caption names each of its video's concepts with probability ``mention_prob`` (at least
   one), using a random synonym; names the attribute with probability ``attribute_mention_prob``;
   adds 1..``max_noise_words`` Zipf-distributed noise words; the words are shuffled and wrapped
   in start/end tokens.

Why hubs appear: popular concepts occur in many videos and many captions, so a caption about
a popular concept has many plausible videos, and the videos that show several popular concepts
in clean frames (low noise) lie close to the centre of the data and score well against a large
share of all queries: they become the top-1 result of many queries while noisy videos of rare
concepts are never retrieved. This mirrors the concept-frequency and centrality causes of
hubness in real retrieval data. Concept words alone cannot tell apart the many videos that share
a popular concept, and the attribute is named only half the time, so recall stays well below
100% even for a perfect model.

Token layout (vocabulary ``vocab_size``): 0 is padding; concept words, attribute words and
noise words follow; ``vocab_size - 2`` is the start token and ``vocab_size - 1`` the end token,
the largest id, so CLIP-style "pool at argmax token" finds the end of every caption.
:class:`SyntheticVocabulary` names the tokens (``c<concept>_<synonym>``, ``a<attribute>``,
``w<noise word>``) so that captions can be shown and typed as words.
"""

from __future__ import annotations

import re

import numpy as np
from ml_collections import ConfigDict

from ncl_jax.data.pipeline import ArraySplit, RetrievalDataset
from ncl_jax.errors import UserError

SPLITS = ("train", "val", "test")


def default_config() -> ConfigDict:
  """Generator parameters of the synthetic set (the demo's defaults)."""
  return ConfigDict(dict(
      name="synthetic",
      data_dir="",
      input_mode="features",
      seed=0,
      max_words=16,              # L: tokens per caption, including start and end tokens.
      max_frames=8,              # T: frames per video (videos have min_frames..max_frames).
      min_frames=4,
      feature_dim=64,            # D: per-frame feature size.
      vocab_size=1000,
      num_concepts=64,
      words_per_concept=4,
      num_attributes=200,
      zipf_exponent=1.0,         # Concept popularity p_k ∝ (k + 1) ** -zipf_exponent.
      max_concepts_per_video=3,
      frame_concept_prob=0.7,
      attribute_strength=0.7,
      noise_scale=1.0,           # Per-frame noise norm for a typical video.
      noise_spread=0.5,          # Log-normal spread of the per-video noise scale.
      mention_prob=0.9,
      attribute_mention_prob=0.5,
      max_noise_words=5,
      captions_per_video=1,      # 1: one-caption variant; >1: multi-caption variant.
      num_train_videos=2000,
      num_val_videos=250,
      num_test_videos=500,
      prefetch=2,
      augment=False,
      num_workers=0,             # Grain worker processes; the set is in memory, nothing to decode.
  ))


class _World:
  """The concept, attribute and vocabulary layout shared by all splits."""

  def __init__(self, cfg: ConfigDict, rng: np.random.Generator):
    k, d = cfg.num_concepts, cfg.feature_dim
    self.concept_dirs = _unit_rows(rng.standard_normal((k, d)))
    self.attribute_dirs = _unit_rows(rng.standard_normal((cfg.num_attributes, d)))
    self.offset = _unit_rows(rng.standard_normal((1, d)))[0]
    popularity = (np.arange(k) + 1.0) ** -cfg.zipf_exponent
    self.popularity = popularity / popularity.sum()
    first_attr = 1 + k * cfg.words_per_concept
    first_noise = first_attr + cfg.num_attributes
    self.concept_words = np.arange(1, first_attr).reshape(k, cfg.words_per_concept)
    self.attribute_words = np.arange(first_attr, first_noise)
    self.noise_words = np.arange(first_noise, cfg.vocab_size - 2)
    noise_pop = (np.arange(len(self.noise_words)) + 1.0) ** -1.0
    self.noise_popularity = noise_pop / noise_pop.sum()
    self.sot, self.eot = cfg.vocab_size - 2, cfg.vocab_size - 1


def _unit_rows(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _check(cfg: ConfigDict) -> None:
  reserved = 3 + cfg.num_concepts * cfg.words_per_concept + cfg.num_attributes
  if cfg.vocab_size <= reserved:
    raise UserError(f"synthetic vocab_size {cfg.vocab_size} leaves no noise words: it must exceed "
                    f"3 + num_concepts * words_per_concept + num_attributes = {reserved}")
  if cfg.max_words < 3:
    raise UserError(f"synthetic max_words {cfg.max_words} must be at least 3 (start, word, end)")
  if not 1 <= cfg.min_frames <= cfg.max_frames:
    raise UserError(f"synthetic frames need 1 <= min_frames ({cfg.min_frames}) <= max_frames "
                    f"({cfg.max_frames})")
  if not 1 <= cfg.max_concepts_per_video <= cfg.num_concepts:
    raise UserError("synthetic max_concepts_per_video must be in [1, num_concepts]")
  if cfg.captions_per_video < 1:
    raise UserError("synthetic captions_per_video must be at least 1")
  if cfg.input_mode != "features":
    raise UserError("the synthetic set has per-frame features only; set data.input_mode='features'")


def _make_videos(world: _World, cfg: ConfigDict, n: int, rng: np.random.Generator):
  """Draws n videos: (concepts list, attribute [n], features [n, T, D], frame_mask [n, T])."""
  t, d = cfg.max_frames, cfg.feature_dim
  features = np.zeros((n, t, d), np.float32)
  mask = np.zeros((n, t), bool)
  concepts, attributes = [], rng.integers(0, cfg.num_attributes, size=n)
  for i in range(n):
    count = rng.integers(1, cfg.max_concepts_per_video + 1)
    chosen = rng.choice(cfg.num_concepts, size=count, replace=False, p=world.popularity)
    concepts.append(chosen)
    frames = rng.integers(cfg.min_frames, cfg.max_frames + 1)
    visible = rng.random((frames, count)) < cfg.frame_concept_prob
    noise_scale = cfg.noise_scale * rng.lognormal(0.0, cfg.noise_spread)
    noise = rng.standard_normal((frames, d)) * (noise_scale / np.sqrt(d))
    features[i, :frames] = (visible @ world.concept_dirs[chosen]
                            + cfg.attribute_strength * world.attribute_dirs[attributes[i]]
                            + world.offset + noise)
    mask[i, :frames] = True
  return concepts, attributes, features, mask


def _make_caption(world: _World, cfg: ConfigDict, concepts: np.ndarray, attribute: int,
                  rng: np.random.Generator) -> np.ndarray:
  """One caption of a video: int32 [max_words], start + shuffled words + end, zero-padded."""
  mentioned = rng.random(len(concepts)) < cfg.mention_prob
  if not mentioned.any():
    mentioned[rng.integers(len(concepts))] = True
  words = [world.concept_words[c, rng.integers(cfg.words_per_concept)]
           for c in concepts[mentioned]]
  if rng.random() < cfg.attribute_mention_prob:
    words.append(world.attribute_words[attribute])
  num_noise = rng.integers(1, cfg.max_noise_words + 1)
  words.extend(rng.choice(world.noise_words, size=num_noise, p=world.noise_popularity))
  words = rng.permutation(np.asarray(words))[:cfg.max_words - 2]
  tokens = np.zeros(cfg.max_words, np.int32)
  tokens[0], tokens[1:len(words) + 1], tokens[len(words) + 1] = world.sot, words, world.eot
  return tokens


def _make_split(world: _World, cfg: ConfigDict, n: int, rng: np.random.Generator,
                prefix: str) -> ArraySplit:
  concepts, attributes, features, mask = _make_videos(world, cfg, n, rng)
  per_video = cfg.captions_per_video
  tokens = np.stack([_make_caption(world, cfg, concepts[i], attributes[i], rng)
                     for i in range(n) for _ in range(per_video)])
  return ArraySplit(text_tokens=tokens, video_array=features, frame_mask=mask,
                    caption_to_video=np.repeat(np.arange(n, dtype=np.int32), per_video),
                    video_ids=[f"{prefix}{i:05d}" for i in range(n)])


def _world_and_split_seeds(cfg: ConfigDict):
  world_seed, *split_seeds = np.random.SeedSequence(int(cfg.seed)).spawn(1 + len(SPLITS))
  return _World(cfg, np.random.default_rng(world_seed)), dict(zip(SPLITS, split_seeds))


def _split_size(cfg: ConfigDict, name: str) -> int:
  return {"train": cfg.num_train_videos, "val": cfg.num_val_videos,
          "test": cfg.num_test_videos}[name]


def make_synthetic(cfg: ConfigDict) -> RetrievalDataset:
  """Generates the synthetic set in memory (train / val / test) from ``cfg`` (see
  :func:`default_config`); the same seed gives the same arrays."""
  _check(cfg)
  world, seeds = _world_and_split_seeds(cfg)
  splits = {name: _make_split(world, cfg, _split_size(cfg, name),
                              np.random.default_rng(seeds[name]), name)
            for name in SPLITS}
  return RetrievalDataset(
      "synthetic", splits, input_mode="features", eval_splits=("val", "test"),
      validation_split="val", prefetch=cfg.prefetch, augment=cfg.augment,
      num_workers=cfg.get("num_workers", 0),
      info={"seed": int(cfg.seed), "captions_per_video": int(cfg.captions_per_video),
            "concept_popularity": world.popularity.tolist()})


def make_split(cfg: ConfigDict, name: str) -> ArraySplit:
  """One split of :func:`make_synthetic` (the same arrays), without generating the others:
  each split has its own random stream, so e.g. the test split alone is 1/5 of the work."""
  _check(cfg)
  if name not in SPLITS:
    raise UserError(f"the synthetic set has no split {name!r}; available: {', '.join(SPLITS)}")
  world, seeds = _world_and_split_seeds(cfg)
  return _make_split(world, cfg, _split_size(cfg, name), np.random.default_rng(seeds[name]), name)


class SyntheticVocabulary:
  """Readable names for the synthetic token ids, and a tokenizer over them.

  Concept ``k``'s synonym ``s`` is ``c<k>_<s>`` (concept 0 is the most popular), attribute
  ``j`` is ``a<j>``, noise word ``m`` is ``w<m>`` (``w0`` the most frequent). The layout is a
  function of the config alone (see the module docstring), so no generated data is needed.
  ``encode_batch`` has the interface of :class:`ncl_jax.tokenizer.ClipTokenizer`'s.
  """

  def __init__(self, cfg: ConfigDict):
    _check(cfg)
    first_attribute = 1 + cfg.num_concepts * cfg.words_per_concept
    first_noise = first_attribute + cfg.num_attributes
    words = ["<pad>"]
    words += [f"c{k}_{s}" for k in range(cfg.num_concepts) for s in range(cfg.words_per_concept)]
    words += [f"a{j}" for j in range(cfg.num_attributes)]
    words += [f"w{m}" for m in range(cfg.vocab_size - 2 - first_noise)]
    words += ["<start>", "<end>"]
    self._set_words(words)

  def _set_words(self, words: list[str]) -> None:
    self.words = list(words)
    self.ids = {word: i for i, word in enumerate(self.words)}
    self.start_id, self.end_id = len(self.words) - 2, len(self.words) - 1

  def save(self, path) -> None:
    """Writes the words, one a line, line i holding token id i (an inference bundle's copy)."""
    with open(path, "w", encoding="utf-8") as f:
      f.write("\n".join(self.words) + "\n")

  @classmethod
  def load(cls, path) -> "SyntheticVocabulary":
    """The vocabulary :meth:`save` wrote."""
    with open(path, encoding="utf-8") as f:
      words = f.read().splitlines()
    if len(words) < 3 or words[0] != "<pad>" or words[-2:] != ["<start>", "<end>"]:
      raise UserError(f"{path} is not a synthetic vocabulary (<pad>, words, <start>, <end>, "
                      "one a line)")
    vocabulary = cls.__new__(cls)
    vocabulary._set_words(words)  # pylint: disable=protected-access
    return vocabulary

  def decode(self, ids) -> str:
    """The words of a token row, without start, end and padding tokens."""
    return " ".join(self.words[int(i)] for i in ids
                    if int(i) not in (0, self.start_id, self.end_id))

  def encode_batch(self, texts: list[str], context_length: int) -> np.ndarray:
    """Token rows [N, context_length] int32: start, word ids, end, zero padding.

    Words are separated by spaces or commas; captions longer than ``context_length - 2`` words
    keep their first words, as CLIP4Clip truncates.

    Raises:
      UserError: a word that is not in the vocabulary, or a caption without words.
    """
    rows = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
      words = [w for w in re.split(r"[\s,]+", text.strip().lower()) if w]
      unknown = [w for w in words if w not in self.ids or w.startswith("<")]
      if unknown:
        raise UserError(f"unknown word {unknown[0][:40]!r}: synthetic captions are made of "
                        "c<concept>_<synonym>, a<attribute> and w<noise> words, e.g. 'c0_1 a17 w3'")
      if not words:
        raise UserError("the caption has no words; type e.g. 'c0_1 a17'")
      ids = [self.ids[w] for w in words][:context_length - 2]
      row = [self.start_id, *ids, self.end_id]
      rows[i, :len(row)] = row
    return rows
