"""ClipTokenizer vs OpenAI's SimpleTokenizer on tricky strings, and CLIP4Clip's truncation."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import clip_reference as ref
from suite_testutils import require_module
from ncl_jax.errors import UserError
from ncl_jax.tokenizer import ClipTokenizer, clean_text, vocab_files

TRICKY = [
    "",
    "   ",
    "A man is playing a guitar.",
    "a cartoon character is talking about their day.",
    "Crème brûlée, naïve café, façade — résumé; Æsir ÅNGSTRÖM øre",
    "Straße ǅ ﬁnance İstanbul",  # case folding and ligatures
    "🎸🔥 a dog 🐶 runs!!! 👍🏽 👨‍👩‍👧",
    "日本語のテキスト 中文字符 한국어 текст العربية עברית हिन्दी",
    "he's, they're, we've, I'm, you'll, she'd, it'S ... can't won't",
    "&amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt; &quot;quoted&quot; &#39;x&#39; &amp;amp;",
    "Ã©tÃ© mojibake that ftfy repairs: schÃ¶n",
    "numbers 1234567 3.14159 1st 2nd 10,000 ½ ² ٣",
    "tabs\tand\nnew\r\nlines   and\u00a0nbsp\u2003em-space\u200bzero-width",
    "<|startoftext|> special <|endoftext|> tokens in text",
    "punctuation!?!?...;;::--__((()))[[]]{{}}@@##$$%%^^&&**~~``''\"\"",
    "control\x00\x01\x7f characters and soft\u00adhyphen",
    "MiXeD CaSe WoRdS and ALLCAPS",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    " ".join(["a person is slicing vegetables in a kitchen while talking"] * 20),
]


@pytest.fixture(scope="module")
def tokenizers():
  reference = ref.tokenizer_module().SimpleTokenizer(str(ref.vocab_path()))
  return reference, ClipTokenizer(ref.vocab_path())


def _reference_rows(reference, texts, context_length):
  """clip.tokenize(truncate=True), which is CLIP4Clip's max_words rule, on the reference's ids."""
  start, end = reference.encoder["<|startoftext|>"], reference.encoder["<|endoftext|>"]
  rows = np.zeros((len(texts), context_length), np.int64)
  for i, text in enumerate(texts):
    words = reference.encode(text)[:context_length - 2]
    tokens = [start] + words + [end]
    rows[i, :len(tokens)] = tokens
  return rows


def test_vocabulary_matches_the_reference(tokenizers):
  reference, ours = tokenizers
  assert ours.vocab_size == 49408 == len(reference.encoder)
  assert ours.encoder == reference.encoder
  assert (ours.start_id, ours.end_id) == (49406, 49407)


@pytest.mark.parametrize("text", TRICKY)
def test_ids_match_the_reference(tokenizers, text):
  reference, ours = tokenizers
  assert ours.encode(text) == reference.encode(text)


@pytest.mark.parametrize("context_length", [77, 32, 8, 2])
def test_rows_truncate_like_clip4clip(tokenizers, context_length):
  reference, ours = tokenizers
  rows = ours.encode_batch(TRICKY, context_length=context_length)
  assert rows.dtype == np.int32 and rows.shape == (len(TRICKY), context_length)
  np.testing.assert_array_equal(rows, _reference_rows(reference, TRICKY, context_length))
  long_row = rows[-1]
  assert long_row[0] == 49406 and long_row[-1] == 49407  # start, first max_words-2, end


def test_clip_tokenize_padding_layout(tokenizers):
  _, ours = tokenizers
  row = ours.encode_batch(["a diagram"], context_length=6)[0]
  assert row.tolist() == [49406, 320, 22697, 49407, 0, 0]
  assert ours.decode(row[1:3]) == "a diagram"


def test_too_long_without_truncation_is_a_user_error(tokenizers):
  _, ours = tokenizers
  with pytest.raises(UserError, match="more than context_length - 2"):
    ours.encode_batch([TRICKY[-1]], context_length=77, truncate=False)


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40))
def test_random_unicode_matches_the_reference(tokenizers, text):
  reference, ours = tokenizers
  assert ours.encode(text) == reference.encode(text)


def test_missing_vocabulary_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="not found"):
    ClipTokenizer(tmp_path)


@pytest.fixture(scope="module")
def hf_vocab_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("hf_tokenizer")
  ref.write_hf_tokenizer(directory)
  return directory


def test_hugging_face_vocab_and_merges_give_transformers_ids(tokenizers, hf_vocab_dir):
  """vocab.json + merges.txt load; ids equal transformers' CLIPTokenizer on every test string.

  transformers' tokenizer skips CLIP's ftfy and HTML clean-up (CLIP trained with it), so the
  comparison feeds it cleaned text; on raw text it may differ only where that clean-up changes
  more than case and whitespace (HTML entities, mojibake, ligatures, control characters).
  """
  transformers = require_module("transformers")
  _, openai_file = tokenizers
  ours = ClipTokenizer(hf_vocab_dir)
  assert ours.encoder == openai_file.encoder
  assert ClipTokenizer(hf_vocab_dir / "vocab.json").encoder == ours.encoder
  hf = transformers.CLIPTokenizer(str(hf_vocab_dir / "vocab.json"),
                                  str(hf_vocab_dir / "merges.txt"))
  raw_differs = []
  for text in TRICKY:
    want = hf(clean_text(text), add_special_tokens=False)["input_ids"]
    assert ours.encode(text) == want, text
    if hf(text, add_special_tokens=False)["input_ids"] != want:
      raw_differs.append(text)
      assert clean_text(text) != " ".join(text.lower().split()), text
  assert len(raw_differs) <= 4
  assert ours.encode_batch(["a dog"], context_length=6).tolist() == [
      [49406, 320, 1929, 49407, 0, 0]]


def test_vocab_files_lists_what_to_copy(hf_vocab_dir):
  """Bundles and converted directories copy these (the export copies every file listed)."""
  assert vocab_files(hf_vocab_dir) == [hf_vocab_dir / "vocab.json", hf_vocab_dir / "merges.txt"]
  assert vocab_files(ref.vocab_path()) == [ref.vocab_path()]


def test_vocab_json_needs_its_merges(tmp_path, hf_vocab_dir):
  (tmp_path / "vocab.json").write_bytes((hf_vocab_dir / "vocab.json").read_bytes())
  with pytest.raises(UserError, match="needs merges.txt beside it"):
    ClipTokenizer(tmp_path)
