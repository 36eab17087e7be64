"""Checkpoints, automatic resume, the workdir config guard and SIGTERM (preemption) handling.

This is the only module that writes checkpoints with orbax (:mod:`ncl_jax.runs` reads them back
without model code). A run directory (``workdir``, layout constants in :mod:`ncl_jax.runs`) looks
like::

  workdir/config.json            the run's config, written on first use
  workdir/checkpoints/<step>/    one orbax step directory per checkpoint:
      state/                     the train state pytree (params, opt_state, queues, step, rng)
      extra/                     a JSON dict (last loss, seed and the like)
      data/                      the Grain data iterator's state, one JSON file per process
                                 (Grain's own orbax handler), when the trainer passes one
      metrics/                   the validation metrics, only for checkpoints saved with metrics

Typical use in a trainer::

  ckpt = Checkpointer(workdir, config=config.to_dict(), best_metric="val/t2v/R@1")
  abstract = jax.eval_shape(init_fn, ...)          # leaves carry the target shardings
  restored = ckpt.restore_latest(abstract, data_iterator=it)   # also moves the Grain iterator
  state, extra = restored if restored else (init_fn(...), {})
  with PreemptionWatcher() as watcher:
    for step in ...:
      state = train_step(state, batch)
      if watcher.should_stop():                    # collective when processes > 1
        ckpt.save(step, state, extra, force=True, data_iterator=it)
        break
      if step % every == 0:
        ckpt.save(step, state, extra, metrics=maybe_eval_metrics, data_iterator=it)
  ckpt.close()

Retention keeps the last ``max_to_keep`` checkpoints *plus* the best one on ``best_metric``
(orbax's own ``best_fn`` with ``max_to_keep`` would keep the N best instead, dropping the latest
checkpoint that resume needs).

Faults (docs/checkpoints.md): :meth:`Checkpointer.restore_latest` moves a damaged checkpoint to
``workdir/damaged_checkpoints/`` with a warning and restores the newest intact one; a full disk
stops a save with one :class:`ncl_jax.errors.UserError` that names the disk, the space needed
and the last good checkpoint (kept), and leaves no half-written step.

Config guard: a workdir that already holds a run with a different config raises
:class:`ncl_jax.errors.UserError` unless ``overwrite=True``. Keys in :data:`RESUMABLE_KEYS` (and any
key ending in ``_every_steps``) may change between runs: they change how long the run goes and
how often it logs, evaluates or saves, not what a step computes.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import pathlib
import shutil
import signal
import threading
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from grain import checkpoint as grain_checkpoint
from jax.experimental import multihost_utils

from ncl_jax import runs
from ncl_jax.data import pipeline
from ncl_jax.errors import UserError

# Config leaf names that may differ between the run in a workdir and the command that resumes it:
# the run's length, how many checkpoints to keep, the overwrite flag itself, and the prefetch
# depth, which does not change the batches. (``data.num_workers`` does not change the batches
# either, but the saved Grain iterator state holds one position per worker process, so it must
# stay as it was.)
# ``total_steps`` / ``num_epochs`` extend or shorten a run: a warmup-cosine schedule built from
# the new total differs from the old one for the steps still to come.
RESUMABLE_KEYS = frozenset({
    "total_steps",
    "num_epochs",
    "epochs",
    "max_to_keep",
    "overwrite",
    "overwrite_workdir",
    "workdir",
    "prefetch",
})
# Suffixes of leaf names that only set a frequency (log_every_steps, eval_every_steps, ...).
RESUMABLE_SUFFIXES = ("_every_steps", "_every_epochs")

# Where resume moves checkpoints it cannot read, inside the workdir (never deleted).
DAMAGED_DIR = "damaged_checkpoints"
_EXTRA = "extra"
_DATA = "data"

# Test-only hook (not a user setting): with this environment variable set to a step number N, a
# PreemptionWatcher sends its own process a real SIGTERM right after training step N (see
# PreemptionWatcher.after_step). Preemption tests use it so that the signal arrives at an exact
# step whatever the machine's speed; unset, it does nothing.
TEST_SIGTERM_ENV = "NCL_JAX_TEST_SIGTERM_AFTER_STEP"

# Test-only hook (not a user setting): with this environment variable set to a step number N,
# :meth:`Checkpointer.save` kills its own process with SIGKILL right after starting the
# asynchronous save of step N, while orbax is writing it: what ``kill -9`` in the middle of a
# save leaves behind, at an exact step. Unset, it does nothing.
TEST_KILL_IN_SAVE_ENV = "NCL_JAX_TEST_SIGKILL_IN_SAVE_STEP"

_log = logging.getLogger(__name__)


class _NoMetricsWarningFilter(logging.Filter):
  """Drops orbax's warning for saves without metrics: only evaluated steps carry metrics here."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "did not provide metrics" not in record.getMessage()


class _DiskFullLogFilter(logging.Filter):
  """Drops orbax's own error logs (with tracebacks, from its background threads) about a full
  disk: :class:`Checkpointer` reports that failure as one UserError line."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.exc_info and record.exc_info[1] is not None and _is_disk_full(record.exc_info[1]):
      return False
    message = record.getMessage()
    return not ("No space left on device" in message or "Disk quota exceeded" in message)


logging.getLogger("absl").addFilter(_NoMetricsWarningFilter())
logging.getLogger("absl").addFilter(_DiskFullLogFilter())


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """Flattens a nested config dict to ``{"a.b.c": json_value}``.

  Values go through a JSON round trip (tuples become lists, numpy scalars become numbers) so that
  a config read back from ``config.json`` compares equal to the one that wrote it.
  """
  flat = {}
  for key, value in config.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) and value:
      flat.update(flatten_config(value, prefix=f"{name}."))
    else:
      flat[name] = json.loads(json.dumps(value, default=_json_default))
  return flat


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  return str(value)


def is_resumable_key(key: str) -> bool:
  """True if the dotted config key ``key`` may change when a run is resumed."""
  leaf = key.rsplit(".", 1)[-1]
  return leaf in RESUMABLE_KEYS or leaf.endswith(RESUMABLE_SUFFIXES)


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Dotted keys whose values differ between two configs, ignoring resumable keys.

  Args:
    old: the config stored in a workdir (nested dict).
    new: the config of the current command (nested dict).

  Returns:
    Sorted dotted keys that are missing on one side or hold different values.
  """
  flat_old, flat_new = flatten_config(old), flatten_config(new)
  return sorted(k for k in _changed(flat_old, flat_new) if not is_resumable_key(k))


def _changed(flat_old: Mapping[str, Any], flat_new: Mapping[str, Any]) -> list[str]:
  """Keys present on one side only or with different JSON (so NaN equals NaN)."""
  encode = lambda flat, k: json.dumps(flat[k], sort_keys=True) if k in flat else None
  return [k for k in set(flat_old) | set(flat_new) if encode(flat_old, k) != encode(flat_new, k)]


def _describe(flat: Mapping[str, Any], key: str) -> str:
  return "(absent)" if key not in flat else json.dumps(flat[key])


def _write_json_atomic(path: pathlib.Path, payload: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=_json_default) + "\n")
  os.replace(tmp, path)


def _barrier(name: str) -> None:
  """Waits for every process (a no-op with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _abstract_leaf(leaf: Any) -> Any:
  """A restore target for one leaf: shape, dtype and sharding of a jax.Array; others as given."""
  if isinstance(leaf, jax.Array):
    return ocp.utils.to_shape_dtype_struct(leaf)
  return leaf


class Checkpointer:
  """Saves and restores a train-state pytree plus a JSON ``extra`` dict in ``workdir``.

  All processes of a multi-process run construct it and call every method (orbax synchronises
  them); the workdir must be on a file system that every process sees.

  Attributes:
    workdir: the run directory.
    directory: ``workdir/checkpoints``.
    replaced_run: True if this constructor discarded an earlier run with a different config
      (``overwrite=True``); the caller should then start its logs afresh too.
    changed_keys: resumable config keys whose values changed against the stored run.
  """

  def __init__(
      self,
      workdir: str | os.PathLike,
      *,
      config: Mapping[str, Any],
      max_to_keep: int = 3,
      best_metric: str | None = None,
      best_mode: str = "max",
      overwrite: bool = False,
      save_interval_steps: int = 1,
      overwrite_hint: str = "--config.overwrite_workdir=True",
  ):
    """Opens (or creates) the run in ``workdir`` and checks its config.

    Args:
      workdir: run directory; created if missing.
      config: the run's config as a nested, JSON-serialisable dict (``config.to_dict()``).
      max_to_keep: how many of the most recent checkpoints to keep (>= 1).
      best_metric: key in the ``metrics`` dict given to :meth:`save` that ranks checkpoints; the
        best one is kept in addition to the last ``max_to_keep``. None: no best tracking.
      best_mode: "max" or "min": whether a larger or a smaller ``best_metric`` is better.
      overwrite: allow replacing a run in ``workdir`` whose config differs, or run files
        (checkpoints, :data:`ncl_jax.runs.RUN_FILES`) without a readable ``config.json``: its
        checkpoints are deleted and the caller starts its logs afresh. A run with the same config is always
        resumed, never deleted.
      save_interval_steps: :meth:`save` without ``force`` saves only steps divisible by this.
        The default 1 saves whenever it is called.
      overwrite_hint: how the user sets ``overwrite`` on the command line (for error messages).

    Raises:
      UserError: ``workdir`` holds a run with a different config (or run files without a
        readable config) and ``overwrite`` is False.
      ValueError: bad ``max_to_keep``, ``best_mode`` or ``save_interval_steps``.
    """
    if max_to_keep < 1:
      raise ValueError(f"max_to_keep must be >= 1, got {max_to_keep}")
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    if save_interval_steps < 1:
      raise ValueError(f"save_interval_steps must be >= 1, got {save_interval_steps}")
    if "://" in str(workdir):
      raise UserError(f"workdir {workdir} is a URL; ncl_jax writes its run directory with local "
                      "file operations: mount the bucket (e.g. gcsfuse) and pass the mounted path")
    self.workdir = pathlib.Path(workdir).resolve()
    self.directory = self.workdir / runs.CHECKPOINT_DIR
    self._best_metric = best_metric
    self._best_mode = best_mode
    self._save_interval_steps = save_interval_steps
    self._config = json.loads(json.dumps(dict(config), default=_json_default))
    self.replaced_run = False
    self.changed_keys: list[str] = []
    self._max_to_keep = max_to_keep
    self._disk_failed = False
    self._needed_bytes = _METADATA_MARGIN_BYTES
    self._saving_step: int | None = None
    self._guard_workdir(overwrite, overwrite_hint)
    self._mngr = ocp.CheckpointManager(
        self.directory,
        options=self._manager_options(max_to_keep, save_interval_steps),
        item_names=(runs.STATE_ITEM, _EXTRA, _DATA),
    )
    if self.latest_step is not None:  # resuming: fail now rather than after the steps up to a save
      self._check_free_space(None, None)

  def _manager_options(self, max_to_keep: int, save_interval_steps: int):
    # One more than asked: orbax picks the steps to delete when a save starts and deletes them
    # even when that save then fails (a full disk), which would leave no checkpoint at all with
    # max_to_keep=1. :meth:`_prune` removes the extra one once a save is known to be on disk.
    policies = [ocp.checkpoint_managers.LatestN(n=max_to_keep + 1)]
    best_fn = None
    if self._best_metric is not None:
      best_fn = self._metric_value
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=best_fn,
          reverse=self._best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,  # LatestN already keeps the recent ones
      ))
    return ocp.CheckpointManagerOptions(
        save_interval_steps=save_interval_steps,
        best_fn=best_fn,
        best_mode=self._best_mode,
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        create=True,
        enable_async_checkpointing=True,
        cleanup_tmp_directories=True,  # a save killed half-way leaves a temporary folder
    )

  def _metric_value(self, metrics: Mapping[str, Any]) -> float:
    """Ranking value of a checkpoint's metrics; NaN ranks worst."""
    value = float(metrics[self._best_metric])
    if math.isnan(value):
      return -math.inf if self._best_mode == "max" else math.inf
    return value

  # -- config guard ---------------------------------------------------------------------------

  def _guard_workdir(self, overwrite: bool, overwrite_hint: str) -> None:
    """Compares ``config`` with the run stored in the workdir, then records ``config``."""
    config_path = self.workdir / runs.CONFIG_FILE
    stored, problem = None, None
    if config_path.is_file():
      try:
        stored = json.loads(config_path.read_text())
      except json.JSONDecodeError as err:
        problem = f"{config_path} is not valid JSON ({err}), so the run there cannot be resumed"
    run_files = [name for name in runs.RUN_FILES if (self.workdir / name).exists()]
    if self.directory.is_dir() and any(self.directory.iterdir()):
      run_files.insert(0, runs.CHECKPOINT_DIR)
    if stored is None and problem is None and run_files:
      problem = (f"workdir {self.workdir} holds {', '.join(run_files)} but no "
                 f"{runs.CONFIG_FILE}, so it cannot be resumed safely")
    elif stored is not None:
      differing = config_differences(stored, self._config)
      if differing:
        old, new = flatten_config(stored), flatten_config(self._config)
        shown = "; ".join(f"{k}: {_describe(old, k)} -> {_describe(new, k)}" for k in differing[:8])
        more = f" (and {len(differing) - 8} more)" if len(differing) > 8 else ""
        problem = (f"workdir {self.workdir} holds a run with a different config: {shown}{more}")
      else:
        self.changed_keys = sorted(_changed(flatten_config(stored), flatten_config(self._config)))
    if problem and not overwrite:
      raise UserError(f"{problem}. Use a new --workdir to start a separate run, or pass "
                      f"{overwrite_hint} to delete that run's checkpoints and start over.")
    _barrier("ncl_jax_checkpointing_config_read")  # everyone has read before anyone writes
    if jax.process_index() == 0:
      self.workdir.mkdir(parents=True, exist_ok=True)
      if problem:
        _log.warning("%s; overwriting it as requested.", problem)
        if self.directory.is_dir():
          shutil.rmtree(self.directory)
      if self.changed_keys:
        _log.info("resuming %s with changed settings: %s", self.workdir,
                  ", ".join(self.changed_keys))
      _write_json_atomic(config_path, self._config)
    self.replaced_run = problem is not None
    _barrier("ncl_jax_checkpointing_config_written")

  # -- saving ---------------------------------------------------------------------------------

  def save(self, step: int, state: Any, extra: Mapping[str, Any], metrics: Mapping[str, Any]
           | None = None, force: bool = False, data_iterator: Any = None) -> bool:
    """Starts an asynchronous save of ``state`` and ``extra`` at ``step``.

    The arrays are copied off the device before this returns, so the caller may donate or
    overwrite ``state`` right away. Call :meth:`wait` (or :meth:`close`) before the process
    exits.

    Args:
      step: the training step the state belongs to (the number of updates applied).
      state: pytree of jax/numpy arrays and scalars (dicts, lists, NamedTuples such as optax
        states).
      extra: JSON-serialisable dict saved beside the state (data-iterator position, ...).
      metrics: validation metrics of this state; must contain ``best_metric`` when one is set.
        Ignored (not stored) without ``best_metric``.
      force: save even if ``step`` is not a multiple of ``save_interval_steps``.
      data_iterator: a Grain ``DatasetIterator`` whose state (the position of the next batch)
        is saved with Grain's orbax handler, each process its own. Its state is read before
        this returns, so the caller may go on iterating.

    Returns:
      True if a save was started. False if the step is off the save interval, or a checkpoint of
      ``step`` already exists (a checkpoint that lacked ``metrics`` is replaced by one with them).

    Raises:
      ValueError: ``extra`` is not JSON-serialisable, or ``metrics`` lacks ``best_metric``.
    """
    step = int(step)
    try:
      extra = json.loads(json.dumps(dict(extra), allow_nan=False))
    except (TypeError, ValueError) as err:
      raise ValueError(f"checkpoint extra must be a JSON-serialisable dict: {err}") from err
    if metrics is not None and self._best_metric is not None:
      if self._best_metric not in metrics:
        raise ValueError(f"metrics lack the best_metric {self._best_metric!r}; "
                         f"got keys {sorted(metrics)}")
      metrics = {k: float(v) for k, v in metrics.items()}
    else:
      metrics = None
    if not force and step % self._save_interval_steps:
      return False
    if step in self._mngr.all_steps():
      if metrics is None or self._mngr.metrics(step) is not None:
        return False
      # The same step was saved earlier without metrics (a periodic save before the evaluation):
      # save it again with them so that it takes part in best-checkpoint selection.
      self._mngr.wait_until_finished()
      self._mngr.delete(step)
    items = {runs.STATE_ITEM: ocp.args.StandardSave(state), _EXTRA: ocp.args.JsonSave(extra)}
    if data_iterator is not None:
      items[_DATA] = grain_checkpoint.CheckpointSave(data_iterator)
    args = ocp.args.Composite(**items)
    with self._disk_errors(step):
      self._mngr.wait_until_finished()  # the previous save is on disk (or its error raised)
      self._prune()
      self._check_free_space(step, state)
      self._saving_step = step
      started = bool(self._mngr.save(step, args=args, metrics=metrics, force=True))
    if _test_kill_in_save_step() == step:
      os.kill(os.getpid(), signal.SIGKILL)  # test-only: dies with this save under way
    return started

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk.

    Raises:
      UserError: the disk filled up during the save (see :meth:`_disk_errors`).
    """
    with self._disk_errors(None):
      self._mngr.wait_until_finished()
      self._prune()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's resources.

    After a full-disk error was raised, the failed save's own errors are not raised again here
    (the caller is already handling the first one).
    """
    try:
      self.wait()
    except Exception:  # pylint: disable=broad-except
      if not self._disk_failed:
        raise
    finally:
      with contextlib.suppress(Exception) if self._disk_failed else contextlib.nullcontext():
        self._mngr.close()

  # -- retention and disk space ---------------------------------------------------------------

  def _prune(self) -> None:
    """Deletes the checkpoints beyond the newest ``max_to_keep`` (and the best), once the newest
    save is known to be complete: orbax keeps one more while a save is in flight."""
    steps = self.all_steps
    keep = set(steps[-self._max_to_keep:])
    best = self.best_step
    if best is not None:
      keep.add(best)
    for step in steps:
      if step not in keep:
        self._mngr.delete(step)

  def _check_free_space(self, step: int, state: Any) -> None:
    """Refuses to start a save that cannot fit, before it writes anything."""
    needed = self._needed_bytes = self._checkpoint_bytes(state)
    free = shutil.disk_usage(self.directory).free
    fits = free >= needed
    if jax.process_count() > 1:  # every process must take the same decision
      fits = bool(np.all(multihost_utils.process_allgather(np.asarray(fits, np.int32))))
    if not fits:
      self._disk_failed = True
      raise UserError(self._disk_full_message(step, free, needed))

  def _checkpoint_bytes(self, state: Any) -> int:
    """What the next checkpoint needs on disk: the newest one's size plus 10%, or the state's
    array bytes plus 10% before the first save (orbax's compression only makes it smaller)."""
    latest = self.latest_step
    if latest is not None:
      size = _folder_bytes(self.directory / str(latest))
    else:
      size = sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(state))
    return int(size * 1.1) + _METADATA_MARGIN_BYTES

  @contextlib.contextmanager
  def _disk_errors(self, step: int | None):
    """Turns a full disk during a save into one UserError and removes the half-written step."""
    try:
      yield
    except UserError:
      raise
    except Exception as err:  # pylint: disable=broad-except
      if not _is_disk_full(err):
        raise
      self._disk_failed = True
      self._remove_partial_saves()
      free = shutil.disk_usage(self.directory).free
      raise UserError(self._disk_full_message(self._saving_step if step is None else step,
                                              free, self._needed_bytes)) from None

  def _remove_partial_saves(self) -> None:
    """Deletes orbax's temporary step folders (a save that never committed)."""
    if jax.process_index() != 0 or not self.directory.is_dir():
      return
    for path in self.directory.iterdir():
      if ".orbax-checkpoint-tmp" in path.name:
        shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(Exception):
      self._mngr.reload()

  def _disk_full_message(self, step: int | None, free: int, needed: int) -> str:
    mount = _mount_point(self.directory)
    good = self.latest_step
    kept = (f"the last good checkpoint, step {good} in {self.directory / str(good)}, is kept "
            "intact" if good is not None else "no checkpoint was saved before")
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    amount = f"at least {_mib(needed - free)}" if needed > free else "space"
    return (f"the disk holding the workdir ({mount}) is full: {_mib(free)} free, but {what} "
            f"needs about {_mib(needed)}; {kept}. Free {amount} on {mount} (or move the run to a "
            "larger disk) and run the same command again to resume")

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  # -- restoring ------------------------------------------------------------------------------

  @property
  def latest_step(self) -> int | None:
    """Step of the newest checkpoint, or None."""
    return self._mngr.latest_step()

  @property
  def best_step(self) -> int | None:
    """Step of the kept checkpoint with the best ``best_metric``, or None.

    None when no ``best_metric`` is set or no kept checkpoint was saved with metrics.
    """
    if self._best_metric is None:
      return None
    return self._mngr.best_step()

  @property
  def all_steps(self) -> list[int]:
    """Steps of all kept checkpoints, ascending."""
    return sorted(self._mngr.all_steps())

  def restore(self, step: int, abstract_state: Any, data_iterator: Any = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores the checkpoint of ``step``.

    Args:
      step: a step in :attr:`all_steps`.
      abstract_state: pytree with the structure of the saved state whose leaves give each
        array's shape, dtype and sharding: ``jax.ShapeDtypeStruct`` (``jax.eval_shape`` with
        ``sharding=`` set) or concrete ``jax.Array``s. NamedTuples (optax states) come back as
        the same types. Arrays are placed on the target's shardings, whatever the device layout
        at save time.
      data_iterator: a Grain ``DatasetIterator`` built like the saved one (same data settings,
        same number of worker processes): it is moved to the saved position.

    Returns:
      ``(state, extra)``.

    Raises:
      UserError: ``data_iterator`` is given but the checkpoint holds no data-iterator state.
    """
    self.wait()  # a checkpoint still being written is not readable yet
    target = jax.tree.map(_abstract_leaf, abstract_state)
    items = {runs.STATE_ITEM: ocp.args.StandardRestore(target), _EXTRA: ocp.args.JsonRestore()}
    if data_iterator is not None:
      if not (self.directory / str(int(step)) / _DATA).is_dir():
        raise UserError(f"checkpoint {self.directory / str(int(step))} holds no data-iterator "
                        "state (it was written before the Grain input pipeline); start a new run "
                        "in a new --workdir")
      self._check_data_workers(int(step), data_iterator)
      items[_DATA] = grain_checkpoint.CheckpointRestore(data_iterator)
    restored = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    return restored[runs.STATE_ITEM], dict(restored[_EXTRA])

  def _check_data_workers(self, step: int, data_iterator: Any) -> None:
    """Refuses an iterator whose worker count differs from the one the checkpoint saved."""
    saved_file = (self.directory / str(step) / _DATA /
                  f"process_{jax.process_index()}-of-{jax.process_count()}.json")
    try:
      saved = json.loads(saved_file.read_text())
    except (OSError, json.JSONDecodeError):
      return  # a missing or damaged file is the restore's own error to report
    pipeline.check_state_workers(saved, pipeline.state_worker_count(data_iterator.get_state()),
                                 where=f"checkpoint {self.directory / str(step)}")

  def restore_latest(self, abstract_state: Any, data_iterator: Any = None
                     ) -> tuple[Any, dict[str, Any]] | None:
    """Restores the newest intact checkpoint (see :meth:`restore`); None if there is none.

    A checkpoint that fails to restore and cannot be read on its own either (a truncated array
    file, an empty ``_METADATA`` or data-iterator file: :func:`ncl_jax.runs.checkpoint_damage`)
    is moved to ``workdir/damaged_checkpoints/`` with a warning that names it, and the next
    older one is tried. A failure on a checkpoint that does read on its own (a restore target
    that does not fit) is raised as it is.
    """
    runs.quiet_abandoned_checkpoint_reads()  # a damaged checkpoint gets one warning, below
    for step in reversed(self.all_steps):
      try:
        return self.restore(step, abstract_state, data_iterator)
      except UserError:
        raise
      except Exception:  # pylint: disable=broad-except  (told apart from damage just below)
        problem = runs.checkpoint_damage(self.directory / str(step))
        if problem is None:
          raise
        self._set_aside(step, problem)
    return None

  def _set_aside(self, step: int, problem: str) -> None:
    """Moves a damaged checkpoint out of the manager's sight (kept for inspection)."""
    source = self.directory / str(step)
    target = self.workdir / DAMAGED_DIR / str(step)
    if jax.process_index() == 0:
      copies = 0
      while target.exists():
        copies += 1
        target = self.workdir / DAMAGED_DIR / f"{step}.{copies}"
      target.parent.mkdir(parents=True, exist_ok=True)
      shutil.move(str(source), str(target))
    _barrier(f"ncl_jax_checkpointing_set_aside_{step}")
    self._mngr.reload()
    older = self.all_steps
    _log.warning("checkpoint %s is damaged (%s); moved it to %s and %s", source, problem, target,
                 f"trying the newest older checkpoint, step {older[-1]}" if older else
                 "no older checkpoint is left: training starts from step 0")

  def restore_best(self, abstract_state: Any) -> tuple[Any, dict[str, Any]] | None:
    """Restores the best checkpoint (see :meth:`restore`, :attr:`best_step`); None if none."""
    step = self.best_step
    return None if step is None else self.restore(step, abstract_state)


# Room for the step's JSON items and orbax's metadata files beside the arrays.
_METADATA_MARGIN_BYTES = 1 << 20


def _folder_bytes(path: pathlib.Path) -> int:
  total = 0
  for folder, _, files in os.walk(path):
    for name in files:
      with contextlib.suppress(OSError):
        total += os.path.getsize(os.path.join(folder, name))
  return total


def _mount_point(path: pathlib.Path) -> str:
  path = pathlib.Path(os.path.abspath(path))
  while not os.path.ismount(path) and path != path.parent:
    path = path.parent
  return str(path)


def _mib(size: int) -> str:
  return f"{size / 2 ** 20:.1f} MiB"


def _is_disk_full(err: BaseException) -> bool:
  """ENOSPC / EDQUOT anywhere in the chain, or tensorstore's RESOURCE_EXHAUSTED on a write."""
  seen = set()
  while err is not None and id(err) not in seen:
    seen.add(id(err))
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
      return True
    text = str(err)
    if "No space left on device" in text or "Disk quota exceeded" in text or (
        "RESOURCE_EXHAUSTED" in text and "os_error_code='28'" in text):
      return True
    err = err.__cause__ or err.__context__
  return False


def rewind_jsonl(path: str | os.PathLike, last_step: int | None) -> None:
  """Drops the lines of a JSON-lines log whose ``"step"`` is greater than ``last_step``.

  A resumed run recomputes the steps after its last checkpoint; rewinding its ``metrics.jsonl``
  first keeps one line per step, as an uninterrupted run would write. ``last_step=None`` (no
  checkpoint: the run starts over) empties the log. Lines without a step are kept. Only process 0
  writes. A missing file is left missing.
  """
  path = pathlib.Path(path)
  if jax.process_index() != 0 or not path.is_file():
    return
  kept = []
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      step = json.loads(line).get("step")
    except json.JSONDecodeError:  # a line cut short when the process was killed
      continue
    if last_step is not None and (step is None or step <= last_step):
      kept.append(line)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(f"{line}\n" for line in kept))
  os.replace(tmp, path)


def _test_kill_in_save_step() -> int | None:
  """The step of :data:`TEST_KILL_IN_SAVE_ENV`, or None when it is unset or not a number."""
  value = os.environ.get(TEST_KILL_IN_SAVE_ENV, "").strip()
  return int(value) if value.isdigit() else None


def _test_sigterm_step() -> int | None:
  """The step of :data:`TEST_SIGTERM_ENV`, or None when it is unset or empty."""
  value = os.environ.get(TEST_SIGTERM_ENV, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise UserError(f"{TEST_SIGTERM_ENV}={value!r} is not a step number; it is a test-only "
                    "setting, unset it") from None


class PreemptionWatcher:
  """Turns SIGTERM (how TPU VMs and most schedulers announce preemption) into a flag.

  The handler only sets :attr:`requested`; the trainer checks :meth:`should_stop` between steps,
  saves with ``force=True``, waits for the save and returns normally so the process exits 0.
  Running the same command again resumes. The previous handler is restored by :meth:`close` or
  on leaving the ``with`` block. A second SIGTERM while the flag is already set also just logs:
  the trainer is on its way out.

  Multi-process runs: signals reach processes at different times, so the decision to stop is
  taken collectively in :meth:`should_stop` (an all-gather of every process's flag). Every
  process must then call it at the same steps. ``jax.distributed.initialize`` installs JAX's own
  SIGTERM notifier (for ``multihost_utils.reached_preemption_sync_point``); this handler takes
  its place while the watcher is open, and afterwards SIGTERM gets the default action (exit)
  because Python cannot reinstall a handler it did not install.
  """

  def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,), sync_every_steps: int = 1):
    """Installs the handler; must be called from the main thread.

    Args:
      signals: the signals that request a stop.
      sync_every_steps: with several processes, :meth:`should_stop` only runs its collective
        (and can only return True) when its ``step`` (default: the number of calls so far) is a
        multiple of this. The collective waits for the devices, so checking every step costs
        each step a host-device sync; every 10 or so steps keeps the loop asynchronous and still
        stops well within a preemption's grace period. One process checks its flag at every
        call.

    Raises:
      ValueError: not on the main thread (Python only delivers signals there).
    """
    if threading.current_thread() is not threading.main_thread():
      raise ValueError("PreemptionWatcher must be created on the main thread")
    if sync_every_steps < 1:
      raise ValueError(f"sync_every_steps must be >= 1, got {sync_every_steps}")
    self._sync_every_steps = sync_every_steps
    self._test_sigterm_step = _test_sigterm_step()
    self._calls = 0
    self._requested = False
    self._previous = {}
    for signum in signals:
      self._previous[signum] = signal.signal(signum, self._handle)

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if not self._requested:
      _log.warning("received signal %d: saving a checkpoint after the current step, then "
                   "exiting; run the same command again to resume", signum)
    self._requested = True

  @property
  def requested(self) -> bool:
    """True once this process received the signal."""
    return self._requested

  def after_step(self, step: int) -> None:
    """Test-only hook: raises a real SIGTERM in this process right after step ``$TEST_SIGTERM_ENV``.

    Does nothing unless the environment variable :data:`TEST_SIGTERM_ENV` was set when the
    watcher was created. The signal goes through the operating system to this very thread
    (``signal.raise_signal``), and Python runs the handler before this returns, so the next
    :meth:`should_stop` sees it: the stop is exact, not a race with the step loop.
    """
    if self._test_sigterm_step is not None and int(step) == self._test_sigterm_step:
      signal.raise_signal(signal.SIGTERM)

  def should_stop(self, step: int | None = None) -> bool:
    """True if any process received the signal.

    With several processes this is a collective (every process must call it at the same steps)
    that all processes answer alike; it is skipped (False) unless ``step`` (default: the number
    of calls so far, counting this one) is a multiple of ``sync_every_steps``.
    """
    self._calls += 1
    if jax.process_count() == 1:
      return self._requested
    if (self._calls if step is None else step) % self._sync_every_steps:
      return False
    flags = multihost_utils.process_allgather(np.asarray(self._requested, np.int32))
    return bool(np.any(flags))

  def close(self) -> None:
    """Restores the signal handlers that were installed before."""
    for signum, previous in self._previous.items():
      signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
    self._previous = {}

  def __enter__(self) -> "PreemptionWatcher":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
