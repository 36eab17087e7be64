"""The shared input pipeline: sharding, shuffling, resumable state, padded evaluation batches."""

import itertools
import json
import os

import numpy as np
import pytest

from ncl_jax.data import normalize_frames, sample_frame_indices
from ncl_jax.checkpointing import Checkpointer
from ncl_jax.data.pipeline import ArraySplit, RetrievalDataset, TrainIterator, augment_frames
from ncl_jax.errors import UserError


def _split(num_videos=13, captions_per_video=3, frames=False):
  """Captions whose token 0 is the caption id and videos whose value is the video id."""
  n_text = num_videos * captions_per_video
  tokens = np.zeros((n_text, 4), np.int32)
  tokens[:, 0] = np.arange(n_text)
  shape = (num_videos, 3, 4, 5, 3) if frames else (num_videos, 3, 2)
  dtype = np.uint8 if frames else np.float32
  video = (np.arange(num_videos).reshape((-1,) + (1,) * (len(shape) - 1))
           * np.ones(shape)).astype(dtype)
  if frames:
    video[..., 1, :] = 200   # A marked column (of 5) to see horizontal flips.
  mask = np.ones((num_videos, 3), bool)
  mask[::2, 2] = False
  return ArraySplit(text_tokens=tokens, video_array=video, frame_mask=mask,
                    caption_to_video=np.repeat(np.arange(num_videos, dtype=np.int32),
                                               captions_per_video))


def _ids(batch):
  return batch["text_tokens"][:, 0]


def _take(iterator, n):
  """Caption ids of the next n batches (copied out of Grain's shared memory)."""
  return np.stack([np.array(_ids(next(iterator))) for _ in range(n)])


def test_batches_are_static_consistent_and_cover_each_epoch_once():
  split = _split()
  it = TrainIterator(split, 8, seed=3)
  assert it.steps_per_epoch == 39 // 8
  seen = []
  for batch in itertools.islice(it, it.steps_per_epoch):
    assert batch["text_tokens"].shape == (8, 4) and batch["text_tokens"].dtype == np.int32
    assert batch["video"].shape == (8, 3, 2) and batch["frame_mask"].dtype == bool
    # Each caption comes with its own video and that video's frame mask.
    np.testing.assert_array_equal(batch["video"][:, 0, 0], split.caption_to_video[_ids(batch)])
    np.testing.assert_array_equal(batch["frame_mask"],
                                  split.frame_mask[split.caption_to_video[_ids(batch)]])
    seen.extend(_ids(batch))
  assert len(seen) == len(set(seen)) == 32   # Drop-remainder, no repeats within an epoch.
  next_epoch = _take(it, it.steps_per_epoch).ravel()
  assert len(set(next_epoch)) == 32 and not np.array_equal(next_epoch, seen)   # A new order.
  it.close()


def test_order_is_a_function_of_seed_and_epoch():
  first = _take(TrainIterator(_split(), 8, seed=3), 12)
  again = _take(TrainIterator(_split(), 8, seed=3, prefetch=0), 12)
  other = _take(TrainIterator(_split(), 8, seed=4), 12)
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  epochs = first.reshape(3, 4, 8)   # 4 steps per epoch
  assert all(not np.array_equal(epochs[0], epochs[e]) for e in (1, 2))
  # Random access by step gives the same batches, from any position: nothing carries over.
  it = TrainIterator(_split(), 8, seed=3, prefetch=0)
  for step in (9, 0, 5):
    np.testing.assert_array_equal(_ids(it.batch_at(step)), first[step])


@pytest.mark.parametrize("hosts", [2, 3])
def test_each_host_gets_its_rows_of_the_same_global_batch(hosts):
  split = _split()
  single = _take(TrainIterator(split, 12, seed=0), 7)
  blocks = [_take(TrainIterator(split, 12, seed=0, process_index=p, process_count=hosts), 7)
            for p in range(hosts)]
  assert all(b.shape == (7, 12 // hosts) for b in blocks)
  # Hosts' blocks, in host order, are the single-host global batch row for row.
  np.testing.assert_array_equal(np.concatenate(blocks, axis=1), single)


def test_worker_processes_change_nothing_and_their_state_resumes():
  """2 Grain worker processes: the same batches as in-process, and a restored iterator replays
  the uninterrupted run (the state crosses the epoch boundary after 4 steps)."""
  split = _split(frames=True)
  reference = [next(TrainIterator(split, 8, seed=7, augment=True, prefetch=0))]
  reference_ids = _take(TrainIterator(split, 8, seed=7, augment=True), 11)
  it = TrainIterator(split, 8, seed=7, augment=True, num_workers=2)
  try:
    first = next(it)
    np.testing.assert_array_equal(first["video"], reference[0]["video"])   # Same augmentation.
    np.testing.assert_array_equal(_take(it, 5), reference_ids[1:6])
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  # Grain keeps one position per worker: another worker count is refused by name (Grain's own
  # KeyError for 0, a silently wrong position for some other counts).
  for other in (0, 1):
    with pytest.raises(UserError, match=f"data.num_workers=2, but this iterator has "
                                        f"num_workers={other}"):
      TrainIterator(split, 8, seed=7, num_workers=other, prefetch=0).set_state(state)
  resumed = TrainIterator(split, 8, seed=7, augment=True, num_workers=2)
  try:
    resumed.set_state(state)
    np.testing.assert_array_equal(_take(resumed, 5), reference_ids[6:])
  finally:
    resumed.close()


@pytest.mark.parametrize("prefetch", [0, 3])
def test_restored_iterator_replays_the_uninterrupted_run(prefetch):
  split = _split()
  reference = _take(TrainIterator(split, 8, seed=7), 11)
  it = TrainIterator(split, 8, seed=7, prefetch=prefetch)
  _take(it, 6)   # Crosses the epoch boundary after 4 steps.
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  resumed = TrainIterator(split, 8, seed=7, prefetch=prefetch)
  resumed.set_state(state)
  np.testing.assert_array_equal(_take(resumed, 5), reference[6:])
  # Moving an iterator that already prefetched ahead also lands on the saved position.
  resumed.set_state(state)
  np.testing.assert_array_equal(_take(resumed, 1), reference[6:7])
  resumed.close()


def test_iterator_state_travels_in_the_orbax_checkpoint(tmp_path):
  split = _split()
  reference = _take(TrainIterator(split, 8, seed=5), 9)
  it = TrainIterator(split, 8, seed=5)
  state = {"w": np.arange(3.0, dtype=np.float32)}
  with Checkpointer(tmp_path, config={"seed": 5}) as ckpt:
    _take(it, 6)
    ckpt.save(6, state, {"note": 1}, data_iterator=it.grain_iterator)
    _take(it, 2)   # The saved position is the one at save time.
  it.close()
  resumed = TrainIterator(split, 8, seed=5)
  with Checkpointer(tmp_path, config={"seed": 5}) as ckpt:
    restored, extra = ckpt.restore_latest(state, data_iterator=resumed.grain_iterator)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert extra == {"note": 1}
  np.testing.assert_array_equal(_take(resumed, 3), reference[6:])
  resumed.close()
  # An iterator with worker processes cannot take the in-process position: named, not KeyError.
  with_workers = TrainIterator(split, 8, seed=5, num_workers=1)
  with Checkpointer(tmp_path, config={"seed": 5}) as ckpt:
    with pytest.raises(UserError, match=r"checkpoint .*/6 holds the data-iterator position of "
                                        r"data.num_workers=0, but this iterator has num_workers=1"):
      ckpt.restore_latest(state, data_iterator=with_workers.grain_iterator)
  with_workers.close()


@pytest.mark.parametrize("kwargs", [dict(global_batch_size=40), dict(global_batch_size=9,
                                    process_count=2), dict(global_batch_size=8, process_index=2,
                                    process_count=2), dict(global_batch_size=8, seed=-1),
                                    dict(global_batch_size=8, num_workers=-1)])
def test_bad_batch_settings_are_user_errors(kwargs):
  size = kwargs.pop("global_batch_size")
  kwargs.setdefault("seed", 0)
  with pytest.raises(UserError):
    TrainIterator(_split(), size, **kwargs)


def test_errors_in_the_pipeline_reach_the_caller():
  split = _split()

  def broken(ids, rngs=None, out=None):
    raise RuntimeError("decoder exploded")

  split.videos = broken
  it = TrainIterator(split, 8, seed=0, prefetch=2)
  with pytest.raises(RuntimeError, match="decoder exploded"):
    next(it)
  it.close()


def test_eval_batches_pad_and_mask_and_drop_nothing():
  split = _split(num_videos=13, captions_per_video=3)
  ds = RetrievalDataset("toy", {"train": split, "test": split}, input_mode="features",
                        eval_splits=("test",), validation_split=None)
  data = ds.eval_data("test")
  assert (data.num_texts, data.num_videos) == (39, 13)
  texts = list(data.text_batches(16))
  assert [b["text_tokens"].shape for b in texts] == [(16, 4)] * 3
  assert [b["mask"].sum() for b in texts] == [16, 16, 7]
  assert (texts[-1]["text_tokens"][7:] == 0).all()
  np.testing.assert_array_equal(
      np.concatenate([_ids(b)[b["mask"]] for b in texts]), np.arange(39))
  videos = list(data.video_batches(5))
  assert [b["video"].shape for b in videos] == [(5, 3, 2)] * 3
  assert [b["mask"].sum() for b in videos] == [5, 5, 3]
  assert not videos[-1]["frame_mask"][3:].any()
  np.testing.assert_array_equal(
      np.concatenate([b["video"][b["mask"]][:, 0, 0] for b in videos]), np.arange(13))
  with pytest.raises(UserError, match="no split 'val'"):
    ds.eval_data("val")


def test_dataset_counts():
  ds = RetrievalDataset("toy", {"train": _split(), "val": _split(4)}, input_mode="features",
                        eval_splits=("val",))
  assert ds.num_train_examples == 39 and ds.steps_per_epoch(8) == 4
  assert (ds.max_words, ds.max_frames) == (4, 3)


def test_frames_augmentation_is_a_seeded_clip_level_flip():
  split = _split(frames=True)
  plain = next(TrainIterator(split, 8, seed=1, prefetch=0))
  assert (plain["video"][..., 1, :] == 200).all()
  augmented = [next(TrainIterator(split, 8, seed=1, prefetch=0, augment=True))["video"]
               for _ in range(2)]
  # Augmentation draws do not depend on the host count either.
  halves = [next(TrainIterator(split, 8, seed=1, prefetch=0, augment=True, process_index=p,
                               process_count=2))["video"] for p in range(2)]
  np.testing.assert_array_equal(np.concatenate(halves), augmented[0])
  np.testing.assert_array_equal(augmented[0], augmented[1])
  flipped = (augmented[0][:, :, :, 1, :] != 200).all(axis=(1, 2, 3))
  assert 0 < flipped.sum() < 8
  np.testing.assert_array_equal(augmented[0][flipped], plain["video"][flipped][:, :, :, ::-1])
  np.testing.assert_array_equal(augmented[0][~flipped], plain["video"][~flipped])
  frames = np.arange(2 * 2 * 3 * 3, dtype=np.uint8).reshape(2, 2, 3, 3)
  out = augment_frames(frames, np.random.default_rng(0))
  assert out.shape == frames.shape


def test_normalize_frames_matches_clip_constants():
  frames = np.array([[[[0, 128, 255]]]], np.uint8)
  expected = (np.array([0, 128, 255]) / 255.0 - np.array([0.48145466, 0.4578275, 0.40821073])) \
      / np.array([0.26862954, 0.26130258, 0.27577711])
  out = normalize_frames(frames)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)


def test_sample_frame_indices_uniform_like_clip4clip():
  np.testing.assert_array_equal(sample_frame_indices(5, 12), np.arange(5))
  np.testing.assert_array_equal(sample_frame_indices(10, 4), [0, 3, 6, 9])
  idx = sample_frame_indices(100, 12)
  assert len(idx) == 12 and idx[0] == 0 and idx[-1] == 99 and (np.diff(idx) > 0).all()


def test_eval_batches_split_across_hosts_cover_everything_once():
  split = _split(num_videos=13, captions_per_video=3)
  data = RetrievalDataset("toy", {"train": split, "test": split}, input_mode="features",
                          eval_splits=("test",), validation_split=None).eval_data("test")
  hosts = [list(data.text_batches(16, process_index=p, process_count=4)) for p in range(4)]
  assert {len(h) for h in hosts} == {3}   # Same number of batches on every host.
  assert all(b["text_tokens"].shape == (4, 4) for h in hosts for b in h)
  ids = [_ids(b)[b["mask"]] for step in range(3) for h in hosts for b in [h[step]]]
  np.testing.assert_array_equal(np.concatenate(ids), np.arange(39))
  videos = [list(data.video_batches(8, process_index=p, process_count=4)) for p in range(4)]
  seen = [b["video"][b["mask"]][:, 0, 0] for step in range(2) for h in videos for b in [h[step]]]
  np.testing.assert_array_equal(np.concatenate(seen), np.arange(13))
  # The second global batch holds videos 8..12: host 2 gets one, host 3 only padding.
  assert [v[1]["mask"].sum() for v in videos] == [2, 2, 1, 0]
  assert videos[3][1]["video"].shape == (2, 3, 2)
  with pytest.raises(UserError):
    next(data.text_batches(10, process_index=0, process_count=4))


def test_damaged_frame_records_are_user_errors():
  from ncl_jax.data.prepared import RecordSplit   # pylint: disable=g-import-not-at-top
  split = RecordSplit([], [], [], [], None, {"input_mode": "frames", "image_size": 4},
                      max_words=4, max_frames=2)
  out = np.zeros((2, 4, 4, 3), np.uint8)
  with pytest.raises(UserError, match="'v1'.*prepare"):
    split._fill_video({"frames": [b"not a jpeg"], "video_id": "v1"}, None, out)


class _DyingSplit(ArraySplit):
  """A split whose reader kills its process, as the OS does to a worker out of memory."""

  def videos(self, video_ids, rngs=None, out=None):
    os._exit(9)


def test_a_dead_worker_process_is_a_user_error():
  s = _split()
  it = TrainIterator(_DyingSplit(s.text_tokens, s.video_array, s.frame_mask, s.caption_to_video),
                     8, seed=0, num_workers=1)
  try:
    with pytest.raises(UserError, match="worker process died.*num_workers"):
      next(it)
  finally:
    it.close()
