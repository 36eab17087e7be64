"""docs/data.md's recipes run as written: a small data set of one's own (prepared as MSVD) and
training on precomputed features.

Each test takes the documented snippet and commands, replaces only the example paths (and
appends a small frame size or a tiny model, so a run takes seconds), and checks what they
produce: the prepared splits and captions, and a finished training run on features.
"""

import json
import os
import pathlib
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

from ncl_jax.data import default_data_config, get_dataset

from data_testutils import DUMMY, SIZE, WordTokenizer, dummy

REPO = pathlib.Path(__file__).resolve().parents[1]
DOC = (REPO / "docs" / "data.md").read_text()

# A tiny model and a 2-step run, appended to the documented training command.
TINY_TRAINING = {
    "clip_dir": "", "global_batch_size": 4, "total_steps": 2, "eval_every_steps": 2,
    "checkpoint_every_steps": 0, "max_to_keep": 1, "ncl.queue_size": 8, "eval.batch_size": 8,
    "data.max_words": 8, "data.max_frames": 4, "data.num_workers": 0, "model.max_frames": 4,
    "model.embed_dim": 16, "model.text.width": 16, "model.text.layers": 1,
    "model.text.heads": 2, "model.text.context_length": 8,
}

pytestmark = pytest.mark.slow


def _block(marker: str, language: str) -> str:
  return re.search(rf"<!-- {marker} -->\n```{language}\n(.*?)```", DOC, re.S).group(1)


def _commands(marker: str, paths: dict[str, str]) -> list[list[str]]:
  """The documented commands of a block, with ``paths`` replaced (longest first)."""
  text = _block(marker, "bash")
  for old in sorted(paths, key=len, reverse=True):
    text = text.replace(old, paths[old])
  commands = [shlex.split(line) for line in text.strip().splitlines()]
  assert all(c[0] == "python" for c in commands), text
  return [[sys.executable, *c[1:]] for c in commands]


def _run(command, extra=()):
  proc = subprocess.run([*command, *extra], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, (command, proc.stdout[-2000:], proc.stderr[-3000:])
  return proc


def _overrides(settings: dict) -> list[str]:
  return [f"--config.{key}={value}" for key, value in settings.items()]


def _check_run(workdir: pathlib.Path, input_mode: str):
  results = json.loads((workdir / "results.json").read_text())
  assert results["step"] == 2 and np.isfinite(results["loss"])
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["input_mode"] == config["model"]["input_mode"] == input_mode
  return results


def test_own_data_set_recipe(tmp_path):
  root = tmp_path / "mine"
  snippet = _block("own-dataset-snippet", "python")
  assert '"~/data/mine"' in snippet
  namespace = {}
  exec(snippet.replace('"~/data/mine"', repr(str(root))), namespace)  # pylint: disable=exec-used
  captions, splits = namespace["captions"], namespace["splits"]
  for index, video in enumerate(captions):  # small real videos under the documented names
    (root / "videos").mkdir(exist_ok=True)
    dummy.write_video(str(root / "videos" / f"{video}.mp4"), index)

  prepare, train = _commands("own-dataset-commands", {
      "~/data/mine": str(root), "~/ncl_jax_data_mine": str(tmp_path / "prepared"),
      "runs/mine": str(tmp_path / "run")})
  _run(prepare, ["--image_size", str(SIZE)])
  config = default_data_config("msvd")
  config.update(dict(data_dir=str(tmp_path / "prepared"), image_size=SIZE, max_words=12,
                     prefetch=0, num_workers=0))
  dataset = get_dataset(config, WordTokenizer())
  for split in ("val", "test"):
    data = dataset.eval_data(split)
    assert data.num_videos == len(splits[split])
    assert sorted(data.captions) == sorted(t for v in splits[split] for t in captions[v])
  assert dataset.num_train_examples == sum(len(captions[v]) for v in splits["train"])

  # Training reads that copy with the MSVD config (test_features_recipe runs that config).
  assert f"--config.data.data_dir={tmp_path / 'prepared'}" in train
  assert train[1:4] == ["-m", "ncl_jax.main", "--config=configs/msvd.py"]


def test_features_recipe(tmp_path):
  features = tmp_path / "clip_features"
  features.mkdir()
  rng = np.random.default_rng(0)
  feature_dim = int(re.search(r"--config\.model\.feature_dim=(\d+)",
                              _block("features-commands", "bash")).group(1))
  for videos in dummy.MSVD.values():
    for video in videos:
      np.save(features / f"{video}.npy", rng.normal(size=(5, feature_dim)).astype(np.float32))
  prepare, train = _commands("features-commands", {
      "~/data/msvd/clip_features": str(features), "~/data/msvd": str(DUMMY / "msvd"),
      "~/ncl_jax_data": str(tmp_path / "prepared"), "runs/msvd_features": str(tmp_path / "run")})
  _run(prepare)
  assert (tmp_path / "prepared" / "msvd").is_dir()
  _run(train, _overrides({**TINY_TRAINING, "data.data_dir": tmp_path / "prepared"}))
  _check_run(tmp_path / "run", "features")
  # Without the model's side of the recipe the run stops at once and names the field.
  model_side = [a for a in train if not a.startswith("--config.model.")]
  proc = subprocess.run([*model_side, *_overrides({**TINY_TRAINING,
                                                   "data.data_dir": tmp_path / "prepared"}),
                         f"--workdir={tmp_path / 'run2'}"], cwd=REPO,
                        env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 2 and "model.input_mode" in proc.stderr, proc.stderr[-2000:]
