"""The annotation readers on the ways real files differ from tidy ones: ids without captions,
byte-order marks, missing columns or fields, and splits that end up empty."""

import json
import pathlib
import pickle
import shutil

import pytest

from ncl_jax.data import annotation_readers as readers
from ncl_jax.errors import UserError

DUMMY = pathlib.Path(__file__).resolve().parents[1] / "ncl_jax" / "data" / "dummy_data"


def _copy(dataset, tmp_path):
  folder = tmp_path / dataset
  shutil.copytree(DUMMY / dataset, folder)
  return folder


def _ids(split):
  return [e.video_id for e in split]


def test_activitynet_ids_without_captions_are_left_out_and_named():
  # The fixture lists, like the public train_ids.json / val_ids.json, ids that the caption
  # files lack; val_ids.json also starts with a byte-order mark.
  assert (DUMMY / "activitynet" / "val_ids.json").read_bytes().startswith(b"\xef\xbb\xbf")
  annotations = readers.read_activitynet(str(DUMMY / "activitynet"))
  assert annotations.without_captions == {"train": ["v_D_XMD02v690"], "test": ["v_UBQfURrVB_Y"]}
  assert _ids(annotations.splits["test"]) == ["v_eee", "v_fff"]
  assert sorted(_ids(annotations.splits["train"]) + _ids(annotations.splits["val"])) == [
      "v_aaa", "v_bbb", "v_ccc", "v_ddd"]
  assert annotations.splits["test"][0].captions == ("v_eee first sentence. v_eee second sentence.",)


def test_didemo_keeps_listed_names_as_file_names():
  annotations = readers.read_didemo(str(DUMMY / "didemo"))
  assert annotations.without_captions == {"train": ["99@N01_9_zz.mp4"], "val": [], "test": []}
  bare = next(e for e in annotations.splits["train"] if e.video_id == "13@N01_3_cc.")
  assert (bare.file_names, bare.stems, bare.end) == (("13@N01_3_cc.",), ("13@N01_3_cc",), 31.0)


def test_msrvtt_and_msvd_follow_the_same_rule(tmp_path):
  msrvtt = _copy("msrvtt", tmp_path)
  with open(msrvtt / "MSRVTT_train.9k.csv", "a") as f:
    f.write("video77\n")
  annotations = readers.read_msrvtt(str(msrvtt))
  assert annotations.without_captions == {"train": ["video77"]}
  assert "video77" not in _ids(annotations.splits["train"]) + _ids(annotations.splits["val"])
  # The committed test CSV starts with a byte-order mark and still reads.
  assert (DUMMY / "msrvtt" / "MSRVTT_JSFUSION_test.csv").read_bytes()[:3] == b"\xef\xbb\xbf"
  assert _ids(annotations.splits["test"]) == ["video8", "video9"]
  msvd = _copy("msvd", tmp_path)
  with open(msvd / "test_list.txt", "a") as f:
    f.write("vidZ_no_captions\n")
  annotations = readers.read_msvd(str(msvd))
  assert annotations.without_captions["test"] == ["vidZ_no_captions"]
  assert _ids(annotations.splits["test"]) == ["vidE_5_9", "vidF_6_10"]


def test_bom_in_every_text_format(tmp_path):
  didemo = _copy("didemo", tmp_path)
  for name in ("test_list.txt", "test_data.json"):
    path = didemo / name
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
  assert _ids(readers.read_didemo(str(didemo)).splits["test"])[0] == "15@N01_5_ee.mts"


def test_missing_columns_and_fields_name_file_expected_and_found(tmp_path):
  msrvtt = _copy("msrvtt", tmp_path)
  test_csv = msrvtt / "MSRVTT_JSFUSION_test.csv"
  test_csv.write_text("key,vid_key,video_id\nret0,msr8,video8\n")
  with pytest.raises(UserError) as err:
    readers.read_msrvtt(str(msrvtt))
  message = str(err.value)
  assert str(test_csv) in message and "lacks the column(s) sentence" in message
  assert "expected video_id, sentence, found key, vid_key, video_id" in message
  test_csv.write_text("")
  with pytest.raises(UserError, match="found no header line"):
    readers.read_msrvtt(str(msrvtt))
  didemo = _copy("didemo", tmp_path)
  (didemo / "val_data.json").write_text(json.dumps([{"video": "14@N01_4_dd.m4v", "desc": "x"}]))
  with pytest.raises(UserError, match=r"val_data.json: a moment lacks fields: expected video, "
                                      r"description, found video, desc"):
    readers.read_didemo(str(didemo))
  (didemo / "val_data.json").write_text(json.dumps({"video": "x"}))
  with pytest.raises(UserError, match="holds a JSON dict, expected a list"):
    readers.read_didemo(str(didemo))
  (didemo / "val_data.json").write_bytes(b"\xff\xfe[]")
  with pytest.raises(UserError, match="is not UTF-8 text"):
    readers.read_didemo(str(didemo))


def test_splits_that_would_be_empty_stop_with_the_reason(tmp_path):
  msvd = _copy("msvd", tmp_path)
  (msvd / "val_list.txt").write_text("\n")
  with pytest.raises(UserError, match=r"the val split is empty: .*val_list.txt lists no videos"):
    readers.read_msvd(str(msvd))
  activitynet = _copy("activitynet", tmp_path)
  # Id lists swapped with the caption files: nothing matches.
  shutil.copy(activitynet / "val_ids.json", activitynet / "train_ids.json")
  with pytest.raises(UserError, match=r"the train split is empty: none of the 3 videos of "
                                      r".*train_ids.json \(e.g. v_eee\) has captions in "
                                      r".*train.json; the files do not belong together"):
    readers.read_activitynet(str(activitynet))
  with open(msvd / "raw-captions.pkl", "wb") as f:
    pickle.dump(["not", "a", "dict"], f)
  with pytest.raises(UserError, match="expected a dict"):
    readers.read_msvd(str(msvd))
