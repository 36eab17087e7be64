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
DIDEMO = {"train": ["11@N01_1_aa.mov", "12@N01_2_bb.mp4", "13@N01_3_cc.mp4"],
          "val": ["14@N01_4_dd.mp4"], "test": ["15@N01_5_ee.mp4", "16@N01_6_ff.mp4"]}


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
  with open(os.path.join(root, "MSRVTT_JSFUSION_test.csv"), "w", newline="") as f:
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
    with open(os.path.join(root, ids_name), "w") as f:
      json.dump(ids, f)


def _didemo(root: str) -> None:
  for split, videos in DIDEMO.items():
    items = [{"video": v, "description": f"{v} moment {j}", "times": [[j, j]],
              "annotation_id": j} for v in videos for j in range(2)]
    with open(os.path.join(root, f"{split}_data.json"), "w") as f:
      json.dump(items, f)
    with open(os.path.join(root, f"{split}_list.txt"), "w") as f:
      # One listed video without descriptions: CLIP4Clip drops it, so must we.
      f.write("\n".join(videos + ([f"99@N01_9_zz.mp4"] if split == "train" else [])) + "\n")


def write_annotations(root: str = HERE) -> None:
  for name, writer in (("msrvtt", _msrvtt), ("msvd", _msvd), ("activitynet", _activitynet),
                       ("didemo", _didemo)):
    os.makedirs(os.path.join(root, name), exist_ok=True)
    writer(os.path.join(root, name))


def frame_colour(video_index: int, second: int) -> np.ndarray:
  """The RGB colour of every pixel of video ``video_index`` during second ``second``."""
  return np.array([10 + 40 * second, 20 + 20 * (video_index % 10), 200], np.uint8)


def write_video(path: str, video_index: int, seconds: float = 3.0, fps: int = 4,
                width: int = 32, height: int = 24) -> None:
  """A small real video whose frames are solid :func:`frame_colour` colours."""
  import av  # pylint: disable=g-import-not-at-top
  codec = {".webm": "libvpx", ".mkv": "libx264"}.get(os.path.splitext(path)[1], "mpeg4")
  with av.open(path, "w") as container:
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    for i in range(int(seconds * fps)):
      image = np.broadcast_to(frame_colour(video_index, i // fps), (height, width, 3))
      frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
      for packet in stream.encode(frame):
        container.mux(packet)
    for packet in stream.encode():
      container.mux(packet)


def video_files(dataset: str) -> list[str]:
  """The file names under which the dummy videos of ``dataset`` are written."""
  if dataset == "msrvtt":
    return [f"{v}.mp4" for v in MSRVTT_TRAIN + MSRVTT_TEST]
  if dataset == "msvd":
    return [f"{v}.avi" for ids in MSVD.values() for v in ids]
  if dataset == "activitynet":
    ids = [v for ids in ACTIVITYNET.values() for v in ids]
    # Both naming conventions occur in the wild: with and without the "v_" prefix.
    return [f"{v}.webm" if i % 2 else f"{v[2:]}.mp4" for i, v in enumerate(ids)]
  if dataset == "didemo":
    return [os.path.splitext(v)[0] + ".mp4" for ids in DIDEMO.values() for v in ids]
  raise ValueError(dataset)


def write_videos(dataset: str, videos_dir: str, seconds: float = 3.0) -> dict[str, int]:
  """Writes every dummy video of ``dataset``; returns file stem -> colour index."""
  os.makedirs(videos_dir, exist_ok=True)
  stems = {}
  for index, name in enumerate(video_files(dataset)):
    write_video(os.path.join(videos_dir, name), index, seconds)
    stems[os.path.splitext(name)[0]] = index
  return stems


if __name__ == "__main__":
  write_annotations()
