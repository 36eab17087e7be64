"""The run folder and the bundle folder: their layouts, and the readers of both.

A training run (``python -m ncl_jax.main --workdir RUN``) writes::

  RUN/config.json                the run's config, written on first use
  RUN/metrics.jsonl              one JSON object per logged step (:mod:`ncl_jax.logging_utils`)
  RUN/results.json               the test results and the selected step, when the run finishes
  RUN/checkpoints/<step>/state/  the train state pytree (params, opt_state, queues, step, rng);
                                 :mod:`ncl_jax.checkpointing` documents the other items

``tools/export.py`` turns one checkpoint into a bundle (layout in :mod:`ncl_jax.export`), which
:func:`ncl_jax.inference.load_bundle` reads; its file names are here too, so that neither module
needs the other's.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import pathlib
import sys
import traceback
from typing import Any, NamedTuple, Sequence

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from ncl_jax import tokenizer
from ncl_jax.errors import UserError

_log = logging.getLogger(__name__)

# The run folder.
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
RESULTS_FILE = "results.json"
CHECKPOINT_DIR = "checkpoints"
STATE_ITEM = "state"   # the checkpoint item holding the train state
# Files a trainer writes into the workdir: finding them without a config.json means the directory
# holds something the checkpointer cannot vouch for, so it is not taken over without ``overwrite``.
RUN_FILES = (METRICS_FILE, RESULTS_FILE)

# The bundle folder.
BUNDLE_FORMAT = "ncl_jax-bundle-v1"
MANIFEST_FILE = "manifest.json"
BUNDLE_CONFIG_FILE = "config.json"
PARAMS_DIR = "params"
BANK_FILE = "bank.npz"
TEXT_FN_FILE = "embed_text.jax_exported"
VIDEO_FN_FILE = "embed_video.jax_exported"
# The synthetic set's words, one a line (its captions' tokenizer; real sets bundle CLIP's BPE).
SYNTHETIC_VOCAB_FILE = "synthetic_vocab.txt"


class RunCheckpoint(NamedTuple):
  """What a bundle needs from a run: config, step, parameters, banks, results (or None)."""

  config: ml_collections.ConfigDict
  step: int
  params: Any
  text_bank: np.ndarray
  video_bank: np.ndarray
  results: dict | None


def _workdir(workdir: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(workdir).expanduser()
  if not (path / CONFIG_FILE).is_file() or not (path / CHECKPOINT_DIR).is_dir():
    raise UserError(f"--workdir {path} is not a training run (it needs {CONFIG_FILE} and "
                    f"{CHECKPOINT_DIR}/, as python -m ncl_jax.main --workdir writes them)")
  return path


def read_results(workdir: str | os.PathLike) -> dict | None:
  """The run's results.json, or None if the run has not finished."""
  path = pathlib.Path(workdir).expanduser() / RESULTS_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def available_steps(workdir: pathlib.Path) -> list[int]:
  """Steps of the complete checkpoints in the run, ascending."""
  root = workdir / CHECKPOINT_DIR
  return sorted(int(p.name) for p in root.iterdir()
                if p.name.isdigit() and (p / STATE_ITEM).is_dir())


def select_step(workdir: pathlib.Path, results: dict | None, step: int | None = None) -> int:
  """The checkpoint to export: ``step`` if given, else the run's selected (best) step, else the
  newest checkpoint of an unfinished run."""
  steps = available_steps(workdir)
  if not steps:
    raise UserError(f"{workdir / CHECKPOINT_DIR} holds no checkpoint yet; train first")
  if step is None:
    step = int(results["selected_step"]) if results and "selected_step" in results else steps[-1]
  if step not in steps:
    raise UserError(f"no checkpoint of step {step} in {workdir / CHECKPOINT_DIR} (kept: "
                    f"{', '.join(map(str, steps))}); pass one of them with --step")
  return step


def restore_params(path: str | os.PathLike, keys: Sequence[str] | None = None) -> Any:
  """Restores an orbax pytree checkpoint (or its top-level ``keys`` only) onto the first device.

  The target is built from the checkpoint's own metadata, so no model code is needed and the
  device count at save time does not matter. With ``keys`` (e.g. the parameters and queues of a
  train state) the other entries, such as the optimizer state, are never read.
  """
  path = pathlib.Path(path).resolve()
  with _no_step_metadata_warning(), ocp.StandardCheckpointer() as reader:
    tree = reader.metadata(path).item_metadata.tree
  if keys is not None:
    missing = [k for k in keys if k not in tree]
    if missing:
      raise UserError(f"{path} lacks {', '.join(missing)}; it is not an ncl_jax checkpoint")
    tree = {k: tree[k] for k in keys}
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
  restore_args = jax.tree.map(lambda _: ocp.ArrayRestoreArgs(sharding=device), target)
  with _no_step_metadata_warning(), ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as reader:
    return reader.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=keys is not None))


class _StepMetadataFilter(logging.Filter):
  """Drops orbax's "Metadata file does not exist: .../_CHECKPOINT_METADATA" warning: a train
  state is an item folder (checkpoints/<step>/state) whose step metadata lives one level up,
  and restoring the item does not need it, so the warning is only noise for the user."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    return not (message.startswith("Metadata file does not exist")
                and message.endswith("_CHECKPOINT_METADATA"))


@contextlib.contextmanager
def _no_step_metadata_warning():
  absl_logger, quiet = logging.getLogger("absl"), _StepMetadataFilter()
  absl_logger.addFilter(quiet)
  try:
    yield
  finally:
    absl_logger.removeFilter(quiet)


def checkpoint_damage(step_dir: str | os.PathLike) -> str | None:
  """Why a checkpoint folder cannot be read on its own terms, or None when it reads.

  Checks the JSON files orbax and Grain write (the state's ``_METADATA``, the ``extra`` item, the
  data iterator's per-process state) and then reads the whole train state with a target built
  from its own metadata, so a truncated or missing array file shows too. Meant for a checkpoint
  whose restore failed: it tells damage from a restore target that does not fit.
  """
  quiet_abandoned_checkpoint_reads()
  try:
    return _first_damage(pathlib.Path(step_dir))
  finally:
    gc.collect()  # finalise the failed restores' abandoned reads while they are quiet


def _first_damage(step_dir: pathlib.Path) -> str | None:
  state_dir = step_dir / STATE_ITEM
  if not state_dir.is_dir():
    return f"{STATE_ITEM}/ is missing"
  json_files = [state_dir / "_METADATA", step_dir / "extra" / "metadata",
                *sorted((step_dir / "data").glob("process_*.json"))]
  for path in json_files:
    if not path.exists():
      continue
    try:
      json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
      relative = path.relative_to(step_dir)
      return f"{relative} is empty" if _is_empty(path) else f"{relative} is not valid JSON"
  try:
    restore_params(state_dir)
  except Exception as err:  # pylint: disable=broad-except  (any failure to read is damage)
    return f"its train state cannot be read ({_first_line(err)})"
  return None


def quiet_abandoned_checkpoint_reads() -> None:
  """Logs the leftovers of a failed checkpoint read at debug level instead of as tracebacks.

  When one array of a damaged checkpoint fails to read, orbax abandons the other reads. Python
  then prints "Exception ignored in: <coroutine ...>" with a traceback for each abandoned read
  coroutine when it collects them, and TensorStore reports each read that completes after
  orbax closed its event loop as a bare "RuntimeError: Event loop is closed" traceback. The
  damage is reported once, in words, by the caller, so these repeats are dropped; every other
  unraisable exception still reaches the previous hook. Installed once, before a restore that
  may meet a damaged checkpoint.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_reads", False):
    return

  def hook(unraisable):
    if _is_abandoned_read(unraisable):
      _log.debug("abandoned read of a damaged checkpoint: %s", unraisable.exc_value)
      return
    previous(unraisable)

  hook.drops_abandoned_reads = True
  sys.unraisablehook = hook


def _is_abandoned_read(unraisable) -> bool:
  code = getattr(unraisable.object, "cr_code", None)
  if code is not None:
    return f"{os.sep}orbax{os.sep}" in code.co_filename
  error = unraisable.exc_value
  if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
    return False
  frames = traceback.extract_tb(error.__traceback__)
  return any(frame.name == "call_soon_threadsafe" and f"{os.sep}asyncio{os.sep}" in frame.filename
             for frame in frames)


def _is_empty(path: pathlib.Path) -> bool:
  try:
    return path.stat().st_size == 0
  except OSError:
    return False


def _first_line(err: BaseException) -> str:
  text = str(err).strip().splitlines()
  return (text[0] if text else type(err).__name__)[:200]


def _valid_rows(queue: dict) -> np.ndarray:
  embeddings = np.asarray(queue["embeddings"], np.float32)
  return embeddings[np.asarray(queue["valid"], bool)]


def restore_run(workdir: str | os.PathLike, step: int | None = None) -> RunCheckpoint:
  """Reads a run's config, results and one checkpoint's parameters and query queues.

  Raises:
    UserError: ``workdir`` is not a run, has no checkpoint, or lacks ``step``.
  """
  path = _workdir(workdir)
  config = ml_collections.ConfigDict(json.loads((path / CONFIG_FILE).read_text()))
  results = read_results(path)
  step = select_step(path, results, step)
  step_dir = path / CHECKPOINT_DIR / str(step)
  quiet_abandoned_checkpoint_reads()
  try:
    state = restore_params(step_dir / STATE_ITEM, keys=("params", "text_queue", "video_queue"))
  except UserError:
    raise
  except Exception as err:  # pylint: disable=broad-except
    raise UserError(_damaged_message(path, step, checkpoint_damage(step_dir) or
                                     f"it cannot be read ({_first_line(err)})")) from None
  return RunCheckpoint(config, step, state["params"], _valid_rows(state["text_queue"]),
                       _valid_rows(state["video_queue"]), results)


def _damaged_message(workdir: pathlib.Path, step: int, problem: str) -> str:
  others = [s for s in available_steps(workdir) if s != step]
  choose = (f"choose another with --step N (the run keeps {', '.join(map(str, others))}): "
            f"python tools/export.py --workdir {workdir} --out BUNDLE --step N, and for the "
            "explorer pass --bundle BUNDLE" if others else
            "the run keeps no other checkpoint; train again in a new --workdir")
  return f"checkpoint {workdir / CHECKPOINT_DIR / str(step)} is damaged: {problem}; {choose}"


def find_vocabulary(config: ml_collections.ConfigDict) -> pathlib.Path | None:
  """CLIP's vocabulary file for a real-data run: next to its CLIP weights, else the installed
  reference package's copy (what the trainer's default tokenizer used). None for the synthetic
  set, whose captions are token ids."""
  if config.data.name == "synthetic":
    return None
  for candidate in ([config.clip_dir] if config.get("clip_dir") else []) + [None]:
    try:
      return tokenizer.find_vocab(os.path.expanduser(candidate) if candidate else None)
    except UserError:
      continue
  return None
