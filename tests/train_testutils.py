"""Tiny configs and helpers shared by the trainer tests (test_train*, test_sharding, ...)."""

import contextlib
import importlib.util
import json
import pathlib

import jax

from ncl_jax import logging_utils

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO_ROOT / "configs"
CONFIG_FILES = ("synthetic", "msrvtt", "msvd", "activitynet", "didemo")

# The demo config shrunk to a few seconds: (dotted key, value) pairs, usable in-process and as
# --config.key=value command-line overrides.
TINY_OVERRIDES = (
    ("data.num_train_videos", 96),
    ("data.num_val_videos", 20),
    ("data.num_test_videos", 28),
    ("data.num_concepts", 12),
    ("data.num_attributes", 16),
    ("data.vocab_size", 120),
    ("data.max_words", 8),
    ("data.max_frames", 4),
    ("data.min_frames", 2),
    ("data.feature_dim", 16),
    ("data.prefetch", 0),
    ("model.feature_dim", 16),
    ("model.embed_dim", 16),
    ("model.max_frames", 4),
    ("model.text.width", 16),
    ("model.text.layers", 1),
    ("model.text.heads", 2),
    ("model.text.vocab_size", 120),
    ("model.text.context_length", 8),
    ("global_batch_size", 16),
    ("ncl.queue_size", 32),
    ("total_steps", 4),
    ("eval.batch_size", 16),
    ("eval_every_steps", 2),
)


def load_config(name: str, arg: str | None = None):
  """``configs/<name>.py``'s ``get_config(arg)`` (unlocked), loaded by path like config_flags."""
  spec = importlib.util.spec_from_file_location(f"test_cfg_{name}", CONFIG_DIR / f"{name}.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def set_key(config, dotted: str, value) -> None:
  *parents, leaf = dotted.split(".")
  for p in parents:
    config = config[p]
  config[leaf] = value


def tiny_config(loss: str = "ncl", **overrides):
  """The synthetic demo config shrunk by TINY_OVERRIDES, then ``overrides`` (``a__b=v``)."""
  config = load_config("synthetic")
  config.loss = loss
  for key, value in TINY_OVERRIDES:
    set_key(config, key, value)
  for key, value in overrides.items():
    set_key(config, key.replace("__", "."), value)
  return config


def cli_overrides(**overrides) -> list[str]:
  """TINY_OVERRIDES (and ``overrides``) as ``--config.key=value`` flags."""
  merged = dict(TINY_OVERRIDES)
  merged.update({k.replace("__", "."): v for k, v in overrides.items()})
  return [f"--config.{k}={v}" for k, v in merged.items()]


@contextlib.contextmanager
def fast_compile():
  """Turns off most XLA optimisations (tests compile much faster) and restores the setting."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", previous)


# The metrics.jsonl keys that carry wall-clock rates: they differ between any two runs.
WALL_CLOCK_KEYS = frozenset(logging_utils.Throughput(1.0, 1.0).summary())


def deterministic_logs(workdir) -> tuple[list[dict], dict]:
  """A run's metrics.jsonl records and results.json without the wall-clock rates (steps/s,
  TFLOP/s, MFU and the results' throughput summary), which differ between any two runs."""
  workdir = pathlib.Path(workdir)
  records = [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK_KEYS}
             for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  results = json.loads((workdir / "results.json").read_text())
  results.pop("throughput", None)
  return records, results
