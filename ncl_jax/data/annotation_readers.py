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
  """

  video_id: str
  captions: tuple[str, ...]
  stems: tuple[str, ...]
  start: float = 0.0
  end: float | None = None


@dataclasses.dataclass
class Annotations:
  """The splits of one data set, plus named subsets of the training split (video ids)."""

  splits: dict[str, list[VideoEntry]]
  subsets: dict[str, list[str]] = dataclasses.field(default_factory=dict)


def holdout_ids(ids, every: int) -> list[str]:
  """A fixed validation list: every ``every``-th id of the sorted ids, starting with the first."""
  return sorted(set(ids))[::every]


def _path(manual_dir: str, name: str) -> str:
  path = os.path.join(manual_dir, name)
  if not os.path.isfile(path):
    raise UserError(f"annotation file {path} is missing; {INSTRUCTIONS_HINT}")
  return path


def _read_lines(path: str) -> list[str]:
  with open(path, encoding="utf-8") as f:
    return [line.strip() for line in f if line.strip()]


def _read_json(path: str):
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as err:
    raise UserError(f"annotation file {path} is not valid JSON ({err}); download it again, "
                    f"{INSTRUCTIONS_HINT}") from err


def _read_csv_column(path: str, column: str) -> list[dict[str, str]]:
  with open(path, encoding="utf-8", newline="") as f:
    rows = list(csv.DictReader(f))
  if rows and column not in rows[0]:
    raise UserError(f"annotation file {path} has no column {column!r} (columns: "
                    f"{', '.join(rows[0])}); {INSTRUCTIONS_HINT}")
  return rows


def _split_holdout(entries: list[VideoEntry], every: int):
  held = set(holdout_ids([e.video_id for e in entries], every))
  return ([e for e in entries if e.video_id not in held],
          [e for e in entries if e.video_id in held])


# MSR-VTT ------------------------------------------------------------------------------------

MSRVTT_FILES = ("MSRVTT_data.json", "MSRVTT_train.9k.csv", "MSRVTT_train.7k.csv",
                "MSRVTT_JSFUSION_test.csv")
MSRVTT_VAL_EVERY = 18     # 500 of the 9,000 training videos.


def read_msrvtt(manual_dir: str) -> Annotations:
  """MSR-VTT: train = 9k minus a held-out val of 500 videos (all 20 captions each, one sample
  per caption); test = the 1k-A JSFusion list (1000 caption-video pairs); subset train_7k."""
  data_path, train9k_path, train7k_path, test_path = (_path(manual_dir, n) for n in MSRVTT_FILES)
  data = _read_json(data_path)
  if "sentences" not in data:
    raise UserError(f"{data_path} has no 'sentences' list; {INSTRUCTIONS_HINT}")
  captions: dict[str, list[str]] = {}
  for sentence in data["sentences"]:
    captions.setdefault(sentence["video_id"], []).append(sentence["caption"].strip())
  train_ids = [row["video_id"] for row in _read_csv_column(train9k_path, "video_id")]
  missing = [v for v in train_ids if v not in captions]
  if missing:
    raise UserError(f"{len(missing)} videos of {train9k_path} (e.g. {missing[0]}) have no "
                    f"caption in {data_path}; the files do not belong together")
  train = [VideoEntry(v, tuple(captions[v]), (v,)) for v in train_ids]
  train, val = _split_holdout(train, MSRVTT_VAL_EVERY)
  test = [VideoEntry(row["video_id"], (row["sentence"].strip(),), (row["video_id"],))
          for row in _read_csv_column(test_path, "sentence")]
  held = {e.video_id for e in val}
  train7k = [row["video_id"] for row in _read_csv_column(train7k_path, "video_id")
             if row["video_id"] not in held]
  return Annotations({"train": train, "val": val, "test": test}, {"train_7k": train7k})


# MSVD ---------------------------------------------------------------------------------------

MSVD_FILES = ("raw-captions.pkl", "train_list.txt", "val_list.txt", "test_list.txt")


def read_msvd(manual_dir: str) -> Annotations:
  """MSVD: train 1200 / val 100 / test 670 videos with all their captions."""
  caption_path = _path(manual_dir, MSVD_FILES[0])
  with open(caption_path, "rb") as f:
    raw = pickle.load(f)
  splits = {}
  for split in ("train", "val", "test"):
    list_path = _path(manual_dir, f"{split}_list.txt")
    entries = []
    for video_id in _read_lines(list_path):
      if video_id not in raw:
        raise UserError(f"video {video_id} of {list_path} has no captions in {caption_path}")
      texts = tuple(" ".join(tokens).strip() for tokens in raw[video_id])
      entries.append(VideoEntry(video_id, texts, (video_id,)))
    splits[split] = entries
  return Annotations(splits)


# ActivityNet Captions -------------------------------------------------------------------------

ACTIVITYNET_FILES = ("train.json", "val_1.json", "train_ids.json", "val_ids.json")
ACTIVITYNET_VAL_EVERY = 20   # 501 of the 10,009 training videos.


def _activitynet_split(manual_dir: str, json_name: str, ids_name: str) -> list[VideoEntry]:
  data_path, ids_path = _path(manual_dir, json_name), _path(manual_dir, ids_name)
  data, ids = _read_json(data_path), _read_json(ids_path)
  entries = []
  for video_id in ids:
    if video_id not in data:
      raise UserError(f"video {video_id} of {ids_path} is not in {data_path}")
    paragraph = " ".join(s.strip() for s in data[video_id]["sentences"])
    bare = video_id[2:] if video_id.startswith("v_") else video_id
    entries.append(VideoEntry(video_id, (paragraph,), (bare, video_id)))
  return entries


def read_activitynet(manual_dir: str) -> Annotations:
  """ActivityNet Captions, paragraph retrieval: train minus a held-out val of ~500 videos;
  val_1 is the test split. A paragraph joins a video's sentences over the whole video."""
  train = _activitynet_split(manual_dir, "train.json", "train_ids.json")
  test = _activitynet_split(manual_dir, "val_1.json", "val_ids.json")
  train, val = _split_holdout(train, ACTIVITYNET_VAL_EVERY)
  return Annotations({"train": train, "val": val, "test": test})


# DiDeMo ----------------------------------------------------------------------------------------

DIDEMO_FILES = tuple(f"{s}_{kind}" for s in ("train", "val", "test")
                     for kind in ("data.json", "list.txt"))
DIDEMO_CLIP_END = 31.0   # CLIP4Clip's paragraph window is [0, 31] s (videos stop at 30 s).


def read_didemo(manual_dir: str) -> Annotations:
  """DiDeMo, paragraph retrieval: train / val / test; a paragraph joins a video's descriptions
  in annotation order over the window [0, 31] s."""
  splits = {}
  for split in ("train", "val", "test"):
    list_path = _path(manual_dir, f"{split}_list.txt")
    data_path = _path(manual_dir, f"{split}_data.json")
    wanted = _read_lines(list_path)
    texts: dict[str, list[str]] = {}
    for item in _read_json(data_path):
      texts.setdefault(item["video"], []).append(item["description"].strip())
    entries = []
    for video in wanted:
      if video not in texts:
        continue   # CLIP4Clip also keeps only listed videos that have descriptions.
      stems = (video, os.path.splitext(video)[0])
      entries.append(VideoEntry(video, (" ".join(texts[video]),), stems, 0.0, DIDEMO_CLIP_END))
    if not entries:
      raise UserError(f"no video of {list_path} has a description in {data_path}")
    splits[split] = entries
  return Annotations(splits)


READERS = {"msrvtt": read_msrvtt, "msvd": read_msvd, "activitynet": read_activitynet,
           "didemo": read_didemo}
REQUIRED_FILES = {"msrvtt": MSRVTT_FILES, "msvd": MSVD_FILES,
                  "activitynet": ACTIVITYNET_FILES, "didemo": DIDEMO_FILES}
