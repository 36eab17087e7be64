"""Readers for the annotation files CLIP4Clip's instructions download, one per data set.

Each reader takes the folder holding the files (``--manual_dir``) and returns the splits as
lists of :class:`VideoEntry`: the video's id, its captions (several for MSR-VTT training and
MSVD; one paragraph for ActivityNet and DiDeMo), the file stems its video may have, and the
clip window. Where a data set has no validation split, a fixed list of training videos is held
out (:func:`holdout_ids`), so models are never selected on the test split.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import pickle

from ncl_jax.errors import UserError

INSTRUCTIONS_HINT = ("see `python -m ncl_jax.data.prepare --help` or docs/data.md, section "
                     "'Preparing datasets' for the files each data set needs")


@dataclasses.dataclass(frozen=True)
class VideoEntry:
  """One video of a split.

  Attributes:
    video_id: the id used in the annotations.
    captions: its captions (a paragraph counts as one caption).
    stems: file names without extension under which the video (or its .npy) may be stored.
    start, end: the clip window in seconds; end None means the end of the file.
    file_names: file names, extension included, that the data set's own download tools give
      the video (DiDeMo lists these); tried before ``stems``
      (:class:`ncl_jax.data.video.FileIndex` has the rules).
  """

  video_id: str
  captions: tuple[str, ...]
  stems: tuple[str, ...]
  start: float = 0.0
  end: float | None = None
  file_names: tuple[str, ...] = ()


@dataclasses.dataclass
class Annotations:
  """The splits of one data set, plus named subsets of the training split (video ids).

  ``without_captions`` names, per split, the ids its video list holds but its caption file
  lacks: they are left out of the split (as CLIP4Clip's loaders do) and reported.
  """

  splits: dict[str, list[VideoEntry]]
  subsets: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  without_captions: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def holdout_ids(ids, every: int) -> list[str]:
  """A fixed validation list: every ``every``-th id of the sorted ids, starting with the first."""
  return sorted(set(ids))[::every]


def _path(manual_dir: str, name: str) -> str:
  path = os.path.join(manual_dir, name)
  if not os.path.isfile(path):
    raise UserError(f"annotation file {path} is missing; {INSTRUCTIONS_HINT}")
  return path


# "utf-8-sig" reads UTF-8 with or without a byte-order mark (Windows editors add one).
ENCODING = "utf-8-sig"


def _open_text(path: str):
  return open(path, encoding=ENCODING, newline="")


def _undecodable(path: str, err: UnicodeDecodeError) -> UserError:
  return UserError(f"annotation file {path} is not UTF-8 text ({err}); save it as UTF-8 or "
                   f"download it again, {INSTRUCTIONS_HINT}")


def _read_lines(path: str) -> list[str]:
  try:
    with _open_text(path) as f:
      return [line.strip() for line in f if line.strip()]
  except UnicodeDecodeError as err:
    raise _undecodable(path, err) from err


def _read_json(path: str, expected_type: type | None = None, layout: str = ""):
  """The parsed JSON of ``path``; ``expected_type`` (dict or list) checks its top level."""
  try:
    with _open_text(path) as f:
      data = json.load(f)
  except UnicodeDecodeError as err:
    raise _undecodable(path, err) from err
  except json.JSONDecodeError as err:
    raise UserError(f"annotation file {path} is not valid JSON ({err}); download it again, "
                    f"{INSTRUCTIONS_HINT}") from err
  if expected_type is not None and not isinstance(data, expected_type):
    raise UserError(f"annotation file {path} holds a JSON {type(data).__name__}, expected "
                    f"{layout}; {INSTRUCTIONS_HINT}")
  return data


def _read_csv(path: str, columns: tuple[str, ...]) -> list[dict[str, str]]:
  """The rows of a CSV file with a header line that must hold ``columns``."""
  try:
    with _open_text(path) as f:
      reader = csv.DictReader(f)
      found = [name.strip() for name in reader.fieldnames or []]
      reader.fieldnames = found
      rows = list(reader)
  except UnicodeDecodeError as err:
    raise _undecodable(path, err) from err
  missing = [c for c in columns if c not in found]
  if missing:
    raise UserError(f"annotation file {path} lacks the column(s) {', '.join(missing)}: expected "
                    f"{', '.join(columns)}, found {', '.join(found) or 'no header line'}; "
                    f"{INSTRUCTIONS_HINT}")
  return rows


def _fields(path: str, record, fields: tuple[str, ...], what: str) -> tuple:
  """The values of ``fields`` of one JSON record, or a UserError naming the ones found."""
  if not isinstance(record, dict) or any(f not in record for f in fields):
    found = ", ".join(record) if isinstance(record, dict) else f"a {type(record).__name__}"
    raise UserError(f"annotation file {path}: {what} lacks fields: expected "
                    f"{', '.join(fields)}, found {found or 'none'}; {INSTRUCTIONS_HINT}")
  return tuple(record[f] for f in fields)


def _split_holdout(entries: list[VideoEntry], every: int):
  held = set(holdout_ids([e.video_id for e in entries], every))
  return ([e for e in entries if e.video_id not in held],
          [e for e in entries if e.video_id in held])


def _listed_with_captions(split: str, list_path: str, ids, caption_path: str, has_captions,
                          without: dict[str, list[str]]) -> list[str]:
  """The ids of a split's video list that have captions; the others go to ``without[split]``.

  Raises:
    UserError: the list is empty, or none of its ids has captions (the files do not belong
      together), so the split would be empty.
  """
  ids = list(ids)
  if not ids:
    raise UserError(f"the {split} split is empty: {list_path} lists no videos; "
                    f"{INSTRUCTIONS_HINT}")
  kept = [v for v in ids if has_captions(v)]
  without[split] = [v for v in ids if not has_captions(v)]
  if not kept:
    raise UserError(f"the {split} split is empty: none of the {len(ids)} videos of {list_path} "
                    f"(e.g. {ids[0]}) has captions in {caption_path}; the files do not belong "
                    f"together, {INSTRUCTIONS_HINT}")
  return kept


# MSR-VTT ------------------------------------------------------------------------------------

MSRVTT_FILES = ("MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv",
                "MSRVTT_JSFUSION_test.csv")
MSRVTT_VAL_EVERY = 18     # 500 of the 9,000 training videos.


def read_msrvtt(manual_dir: str) -> Annotations:
  """MSR-VTT: train = 9k minus a held-out val of 500 videos (all 20 captions each, one sample
  per caption); test = the 1k-A JSFusion list (1000 caption-video pairs); subset train_7k."""
  data_path, train9k_path, train7k_path, test_path = (_path(manual_dir, n) for n in MSRVTT_FILES)
  data = _read_json(data_path, dict, "an object with a 'sentences' list")
  if not isinstance(data.get("sentences"), list):
    raise UserError(f"annotation file {data_path} has no 'sentences' list (found: "
                    f"{', '.join(data) or 'nothing'}); {INSTRUCTIONS_HINT}")
  captions: dict[str, list[str]] = {}
  for sentence in data["sentences"]:
    video_id, caption = _fields(data_path, sentence, ("video_id", "caption"), "a sentence")
    captions.setdefault(video_id, []).append(caption.strip())
  without: dict[str, list[str]] = {}
  train_ids = _listed_with_captions(
      "train", train9k_path, [row["video_id"] for row in _read_csv(train9k_path, ("video_id",))],
      data_path, captions.__contains__, without)
  train = [VideoEntry(v, tuple(captions[v]), (v,)) for v in train_ids]
  train, val = _split_holdout(train, MSRVTT_VAL_EVERY)
  test_rows = _read_csv(test_path, ("video_id", "sentence"))
  if not test_rows:
    raise UserError(f"the test split is empty: {test_path} has no rows; {INSTRUCTIONS_HINT}")
  test = [VideoEntry(row["video_id"], (row["sentence"].strip(),), (row["video_id"],))
          for row in test_rows]
  kept = {e.video_id for e in train}
  train7k = [row["video_id"] for row in _read_csv(train7k_path, ("video_id",))
             if row["video_id"] in kept]
  return Annotations({"train": train, "val": val, "test": test}, {"train_7k": train7k}, without)


# MSVD ---------------------------------------------------------------------------------------

MSVD_FILES = ("raw-captions.pkl", "train_list.txt", "val_list.txt", "test_list.txt")


def read_msvd(manual_dir: str) -> Annotations:
  """MSVD: train 1200 / val 100 / test 670 videos with all their captions."""
  caption_path = _path(manual_dir, MSVD_FILES[0])
  try:
    with open(caption_path, "rb") as f:
      raw = pickle.load(f)
  except (pickle.UnpicklingError, EOFError, ValueError) as err:
    raise UserError(f"annotation file {caption_path} is not a pickle ({err}); download it "
                    f"again, {INSTRUCTIONS_HINT}") from err
  if not isinstance(raw, dict):
    raise UserError(f"annotation file {caption_path} holds a {type(raw).__name__}, expected a "
                    f"dict video id -> captions; {INSTRUCTIONS_HINT}")
  splits, without = {}, {}
  for split in ("train", "val", "test"):
    list_path = _path(manual_dir, f"{split}_list.txt")
    ids = _listed_with_captions(split, list_path, _read_lines(list_path), caption_path,
                                lambda v: bool(raw.get(v)), without)
    splits[split] = [VideoEntry(v, tuple(" ".join(tokens).strip() for tokens in raw[v]), (v,))
                     for v in ids]
  return Annotations(splits, without_captions=without)


# ActivityNet Captions -------------------------------------------------------------------------

ACTIVITYNET_FILES = ("train.json", "val_1.json", "train_ids.json", "val_ids.json")
ACTIVITYNET_VAL_EVERY = 20   # 501 of the 10,009 training videos.


def _activitynet_split(manual_dir: str, split: str, json_name: str, ids_name: str,
                       without: dict[str, list[str]]) -> list[VideoEntry]:
  """One split: the ids of ``ids_name`` that ``json_name`` has sentences for. The public
  train_ids.json lists 15 ids train.json lacks and val_ids.json 9 that val_1.json lacks."""
  data_path, ids_path = _path(manual_dir, json_name), _path(manual_dir, ids_name)
  data = _read_json(data_path, dict, "an object id -> {duration, timestamps, sentences}")
  ids = _read_json(ids_path, list, "a list of video ids")
  kept = _listed_with_captions(split, ids_path, ids, data_path, data.__contains__, without)
  entries = []
  for video_id in kept:
    sentences, = _fields(data_path, data[video_id], ("sentences",), f"video {video_id}")
    paragraph = " ".join(s.strip() for s in sentences)
    bare = video_id[2:] if video_id.startswith("v_") else video_id
    entries.append(VideoEntry(video_id, (paragraph,), (bare, video_id)))
  return entries


def read_activitynet(manual_dir: str) -> Annotations:
  """ActivityNet Captions, paragraph retrieval: train minus a held-out val of ~500 videos;
  val_1 is the test split. A paragraph joins a video's sentences over the whole video."""
  without: dict[str, list[str]] = {}
  train = _activitynet_split(manual_dir, "train", "train.json", "train_ids.json", without)
  test = _activitynet_split(manual_dir, "test", "val_1.json", "val_ids.json", without)
  train, val = _split_holdout(train, ACTIVITYNET_VAL_EVERY)
  return Annotations({"train": train, "val": val, "test": test}, without_captions=without)


# DiDeMo ----------------------------------------------------------------------------------------

DIDEMO_FILES = tuple(f"{s}_{kind}" for s in ("train", "val", "test")
                     for kind in ("data.json", "list.txt"))
DIDEMO_CLIP_END = 31.0   # CLIP4Clip's paragraph window is [0, 31] s (videos stop at 30 s).


def read_didemo(manual_dir: str) -> Annotations:
  """DiDeMo, paragraph retrieval: train / val / test; a paragraph joins a video's descriptions
  in annotation order over the window [0, 31] s.

  The lists name the original Flickr files (``X.mov``, ``X.3gp``, ``X.`` ...): each entry keeps
  that name as its file name and the part before the last dot as its stem, so the original
  download, the ``<name>.mp4`` AWS copies and transcoded ``X.mp4`` files are all found.
  """
  splits, without = {}, {}
  for split in ("train", "val", "test"):
    list_path = _path(manual_dir, f"{split}_list.txt")
    data_path = _path(manual_dir, f"{split}_data.json")
    texts: dict[str, list[str]] = {}
    for item in _read_json(data_path, list, "a list of {video, description, times, ...}"):
      video, description = _fields(data_path, item, ("video", "description"), "a moment")
      texts.setdefault(video, []).append(description.strip())
    # CLIP4Clip also keeps only listed videos that have descriptions.
    wanted = _listed_with_captions(split, list_path, _read_lines(list_path), data_path,
                                   texts.__contains__, without)
    splits[split] = [VideoEntry(v, (" ".join(texts[v]),), (os.path.splitext(v)[0],), 0.0,
                                DIDEMO_CLIP_END, file_names=(v,)) for v in wanted]
  return Annotations(splits, without_captions=without)


READERS = {"msrvtt": read_msrvtt, "msvd": read_msvd, "activitynet": read_activitynet,
           "didemo": read_didemo}
REQUIRED_FILES = {"msrvtt": MSRVTT_FILES, "msvd": MSVD_FILES,
                  "activitynet": ACTIVITYNET_FILES, "didemo": DIDEMO_FILES}
