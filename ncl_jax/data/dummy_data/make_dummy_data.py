"""Writes the tiny dummy copies of each data set's annotation files, and their videos.

`python ncl_jax/data/dummy_data/make_dummy_data.py` regenerates the committed annotation files
in this folder (real formats, a handful of videos each). Videos are not committed: tests call
:func:`write_videos` to create small real video files with PyAV (solid colours that encode the
video and the second, so decoded frames can be checked by value).
"""

from __future__ import annotations

import csv
import json
import os
import pickle

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
LONG_CAPTION = " ".join(f"word{i}" for i in range(40))   # Longer than any test context.

MSRVTT_TRAIN = [f"video{i}" for i in range(8)]
MSRVTT_TEST = ["video8", "video9"]
MSVD = {"train": ["vidA_1_5", "vidB_2_6", "vidC_3_7"], "val": ["vidD_4_8"],
        "test": ["vidE_5_9", "vidF_6_10"]}
ACTIVITYNET = {"train": ["v_aaa", "v_bbb", "v_ccc", "v_ddd"], "val_1": ["v_eee", "v_fff"]}
# Listed in train_ids.json / val_ids.json but absent from train.json / val_1.json, as 15 and 9
# ids of the public files are.
ACTIVITYNET_WITHOUT_CAPTIONS = {"train": ["v_D_XMD02v690"], "val_1": ["v_UBQfURrVB_Y"]}
# DiDeMo's lists name the original Flickr files: many containers, a bare trailing dot.
DIDEMO = {"train": ["11@N01_1_aa.mov", "12@N01_2_bb.3gp", "13@N01_3_cc.", "17@N01_7_gg.wmv",
                    "18@N01_8_hh.m2ts", "21@N01_1_kk."],
          "val": ["14@N01_4_dd.m4v"],
          "test": ["15@N01_5_ee.mts", "16@N01_6_ff.3g2", "19@N01_9_ii.avi", "20@N01_0_jj.MP4"]}
DIDEMO_WITHOUT_DESCRIPTIONS = {"train": ["99@N01_9_zz.mp4"]}
# The file each DiDeMo video is stored under, one per way real copies are named: the original
# name (download_videos.py), "<name>.mp4" (download_videos_AWS.py), other letter case, and a
# transcoded "<stem>.mp4".
DIDEMO_FILES = {"11@N01_1_aa.mov": "11@N01_1_aa.mov", "12@N01_2_bb.3gp": "12@N01_2_bb.3gp",
                "13@N01_3_cc.": "13@N01_3_cc..mp4", "17@N01_7_gg.wmv": "17@N01_7_gg.wmv",
                "18@N01_8_hh.m2ts": "18@N01_8_hh.M2TS", "21@N01_1_kk.": "21@N01_1_kk.",
                "14@N01_4_dd.m4v": "14@N01_4_dd.m4v", "15@N01_5_ee.mts": "15@N01_5_ee.mts",
                "16@N01_6_ff.3g2": "16@N01_6_ff.3g2", "19@N01_9_ii.avi": "19@N01_9_ii.mp4",
                "20@N01_0_jj.MP4": "20@N01_0_jj.mp4"}
BOM = "\ufeff"   # Some editors save UTF-8 with a byte-order mark; two fixture files have one.

def _msrvtt(root: str) -> None:
  sentences = []
  for vid in MSRVTT_TRAIN + MSRVTT_TEST:
    for j in range(3):
      sentences.append({"video_id": vid, "caption": f"{vid} caption {j}", "sen_id": len(sentences)})
  sentences.append({"video_id": "video1", "caption": LONG_CAPTION, "sen_id": len(sentences)})
  with open(os.path.join(root, "MSRVTT_data.json"), "w") as f:
    json.dump({"info": {}, "videos": [], "sentences": sentences}, f)
  for name, ids in (("MSRVTT_train.9k.csv", MSRVTT_TRAIN), ("MSRVTT_train.7k.csv",
                                                            MSRVTT_TRAIN[:5])):
    with open(os.path.join(root, name), "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(["video_id"])
      writer.writerows([v] for v in ids)
  with open(os.path.join(root, "MSRVTT_JSFUSION_test.csv"), "w", newline="",
            encoding="utf-8") as f:
    f.write(BOM)
    writer = csv.writer(f)
    writer.writerow(["key", "vid_key", "video_id", "sentence"])
    writer.writerow(["ret0", "msr8", "video8", "video8 caption 1"])
    writer.writerow(["ret1", "msr9", "video9", LONG_CAPTION])

def _msvd(root: str) -> None:
  captions = {}
  for split, ids in MSVD.items():
    for k, vid in enumerate(ids):
      captions[vid] = [[vid, "does", "thing", str(j)] for j in range(2 + k)]
    with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
      f.write("\n".join(ids) + "\n")
  with open(os.path.join(root, "raw-captions.pkl"), "wb") as f:
    pickle.dump(captions, f, protocol=4)


def _activitynet(root: str) -> None:
  for split, ids in ACTIVITYNET.items():
    data = {vid: {"duration": 3.0, "timestamps": [[0.0, 1.5], [1.5, 3.0]],
                  "sentences": [f"{vid} first sentence. ", f" {vid} second sentence."]}
            for vid in ids}
    with open(os.path.join(root, f"{split}.json"), "w") as f:
      json.dump(data, f)
    ids_name = "train_ids.json" if split == "train" else "val_ids.json"
    listed = ids[:1] + ACTIVITYNET_WITHOUT_CAPTIONS[split] + ids[1:]
    with open(os.path.join(root, ids_name), "w", encoding="utf-8") as f:
      f.write(BOM if split == "val_1" else "")
      json.dump(listed, f)


def _didemo(root: str) -> None:
  for split, videos in DIDEMO.items():
    items = [{"video": v, "description": f"{v} moment {j}", "times": [[j, j]],
              "annotation_id": j} for v in videos for j in range(2)]
    with open(os.path.join(root, f"{split}_data.json"), "w") as f:
      json.dump(items, f)
    with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
      # Listed videos without descriptions: CLIP4Clip drops them, so must we.
      f.write("\n".join(videos + DIDEMO_WITHOUT_DESCRIPTIONS.get(split, [])) + "\n")

def write_annotations(root: str = HERE) -> None:
  for name, writer in (("msrvtt", _msrvtt), ("msvd", _msvd), ("activitynet", _activitynet),
                       ("didemo", _didemo)):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    writer(os.path.join(root, name))


def frame_colour(video_index: int, second: int) -> np.ndarray:
  """The RGB colour of every pixel of video ``video_index`` during second ``second``."""
  return np.array([10 + 40 * second, 20 + 20 * (video_index % 10), 200], np.uint8)


# (container format, codec) by lower-case extension; PyAV guesses the rest from the name. A
# bare trailing dot names no format: such DiDeMo originals are mostly MP4/QuickTime.
CONTAINERS = {".webm": (None, "libvpx"), ".mkv": (None, "libx264"), ".m4v": ("ipod", "mpeg4"),
              ".3gp": ("3gp", "mpeg4"), ".3g2": ("3g2", "mpeg4"), ".wmv": ("asf", "wmv2"),
              ".mts": ("mpegts", "libx264"), ".m2ts": ("mpegts", "libx264"),
              ".": ("mp4", "mpeg4")}


def write_video(path: str, video_index: int, seconds: float = 3.0, fps: int = 4,
                width: int = 32, height: int = 24) -> None:
  """A small real video whose frames are solid :func:`frame_colour` colours."""
  import av  # pylint: disable=g-import-not-at-top
  ext = os.path.splitext(path)[1].lower() or ("." if path.endswith(".") else "")
  container_format, codec = CONTAINERS.get(ext, (None, "mpeg4"))
  with av.open(path, "w", format=container_format) as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(int(seconds * fps)):
      image = np.broadcast_to(frame_colour(video_index, i // fps), (height, width, 3))
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def video_files(dataset: str) -> list[tuple[str, str]]:
  """(video id, file name) of every dummy video of ``dataset`` that tests write."""
  if dataset == "msrvtt":
    return [(v, f"{v}.mp4") for v in MSRVTT_TRAIN + MSRVTT_TEST]
  if dataset == "msvd":
    return [(v, f"{v}.avi") for ids in MSVD.values() for v in ids]
  if dataset == "activitynet":
    ids = [v for ids in ACTIVITYNET.values() for v in ids]
    # Both naming conventions occur in the wild: with and without the "v_" prefix.
    return [(v, f"{v}.webm" if i % 2 else f"{v[2:]}.mp4") for i, v in enumerate(ids)]
  if dataset == "didemo":
    return [(v, DIDEMO_FILES[v]) for ids in DIDEMO.values() for v in ids]
  raise ValueError(dataset)


def write_videos(dataset: str, videos_dir: str, seconds: float = 3.0) -> dict[str, int]:
  """Writes every dummy video of ``dataset``; returns video id -> colour index."""
  os.makedirs(videos_dir, exist_ok=True)
  colours = {}
  for index, (video_id, name) in enumerate(video_files(dataset)):
    write_video(os.path.join(videos_dir, name), index, seconds)
    colours[video_id] = index
  return colours


if __name__ == "__main__":
  write_annotations()
