"""The Apache Beam side of ``python -m ncl_jax.data.prepare ... --num_workers N``.

TFDS builds a data set with Beam when a builder's split generator is a Beam transform
(:meth:`ncl_jax.data.builders.StoredItemsBuilder._beam_examples`). Here: the runner and its
options from the command line, the transform that loads items in worker processes, and the
per-item statuses the workers leave beside the output so the main process can write the same
metadata and make the same checks (bad fraction, empty split, feature size) as the in-process
build. Only imported when Beam is asked for: ``pip install 'ncl_jax[beam]'``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shlex
import sys
import time
import uuid

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions

from ncl_jax.errors import UserError

STATUS_FOLDER = "ncl_jax_item_status"   # under the temporary output folder, removed at the end
PROGRESS_EVERY_S = 10.0
_RUNNER_EXAMPLES = "DirectRunner, DataflowRunner, FlinkRunner, SparkRunner, PrismRunner"


def pipeline_settings(num_workers: int, runner_name: str | None, options: str | None):
  """(runner, PipelineOptions) for ``--num_workers``, ``--beam_runner``, ``--beam_options``.

  ``num_workers`` > 1 alone runs the DirectRunner in multi-processing mode with that many
  worker processes on this machine; a named runner gets ``options`` unchanged (shell-split),
  plus those two DirectRunner settings when it is the DirectRunner and ``num_workers`` > 1.
  """
  runner_name = runner_name or "DirectRunner"
  try:
    runner = beam.runners.create_runner(runner_name)
  except (ValueError, ImportError) as err:
    raise UserError(f"--beam_runner {runner_name!r} is not a Beam runner here ({err}); use one "
                    f"of {_RUNNER_EXAMPLES}, with the extras it needs installed "
                    "(e.g. apache-beam[gcp] for Dataflow)") from err
  try:
    args = shlex.split(options or "")
  except ValueError as err:
    raise UserError(f"--beam_options {options!r} cannot be split like a shell line ({err})") \
        from err
  is_direct = _is_direct(runner)
  if num_workers > 1:
    if not is_direct:
      raise UserError(f"--num_workers sizes the local DirectRunner; size a {runner_name} run "
                      "with its own --beam_options (e.g. --max_num_workers=N for Dataflow)")
    set_by_user = {a.split("=")[0] for a in args}
    if "--direct_num_workers" not in set_by_user:
      args.append(f"--direct_num_workers={num_workers}")
    if "--direct_running_mode" not in set_by_user:
      args.append("--direct_running_mode=multi_processing")
  if is_direct and "--default_sdk_harness_log_level" not in {a.split("=")[0] for a in args}:
    # Local workers otherwise log every bundle between the progress lines, and a failed
    # bundle's traceback several times over; the error line names the cause, and
    # --beam_options "--default_sdk_harness_log_level=INFO" shows the workers' logs again.
    args.append("--default_sdk_harness_log_level=CRITICAL")
  return runner, PipelineOptions(args)


def _is_direct(runner) -> bool:
  return "Direct" in type(runner).__name__


def local_worker_count(runner, options: PipelineOptions) -> int | None:
  """Worker processes the DirectRunner of :func:`pipeline_settings` starts on this host, or None
  for a runner whose workers live elsewhere."""
  if not _is_direct(runner):
    return None
  return max(1, int(options.get_all_options().get("direct_num_workers") or 1))


@contextlib.contextmanager
def quiet_beam_logs():
  """Mutes Beam's loggers in this process while building (the DirectRunner relays worker log
  records, a failed bundle's traceback several times over), so a failure ends as the one
  ``error:`` line that names its cause."""
  logger = logging.getLogger("apache_beam")
  level = logger.level
  logger.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


class _LoadItems(beam.DoFn):
  """Loads items into records in a worker; keeps their statuses and writes them per bundle."""

  def __init__(self, load, status_dir: str, noun: str):
    super().__init__()
    self._load = load
    self._status_dir = status_dir
    self._noun = noun

  def start_bundle(self):
    self._statuses = []

  def process(self, element):
    index, item = element
    status, example = self._load(index, item)
    self._statuses.append(status)
    self._report_progress()
    if example is not None:
      # Integer keys: with shuffling disabled TFDS's Beam writer orders records by key.
      yield index, example

  def finish_bundle(self):
    if not self._statuses:
      return
    # One file per bundle: a retried bundle writes the same statuses again under another name;
    # read_statuses keeps one per item.
    path = FileSystems.join(self._status_dir, f"{uuid.uuid4().hex}.jsonl")
    with FileSystems.create(path) as f:
      f.write("".join(json.dumps(s) + "\n" for s in self._statuses).encode("utf-8"))
    self._statuses = []

  def _report_progress(self):
    # Counted per worker process, over all splits (a process runs many DoFn instances).
    _PROGRESS["done"] += 1
    now = time.monotonic()
    _PROGRESS["started"] = _PROGRESS["started"] or now
    if now - _PROGRESS["reported"] >= PROGRESS_EVERY_S:
      _PROGRESS["reported"] = now
      elapsed = now - _PROGRESS["started"]
      rate = f" ({_PROGRESS['done'] / elapsed:.1f}/s)" if elapsed >= 1 else ""
      print(f"prepare worker {os.getpid()}: {_PROGRESS['done']} {self._noun} loaded{rate}",
            file=sys.stderr, flush=True)


_PROGRESS = {"done": 0, "started": 0.0, "reported": 0.0}


def load_examples(load, items, status_dir: str, noun: str) -> beam.PTransform:
  """The transform TFDS applies to the pipeline: items -> (index, record) in worker processes.

  Args:
    load: picklable ``(index, item) -> (status, record or None)``
      (:class:`ncl_jax.data.builders.ItemLoader`).
    items: the split's (entry, path) pairs, in order.
    status_dir: where workers write the statuses of the items they load.
    noun: what an item is called in progress lines ("videos", "images").
  """
  FileSystems.mkdirs(status_dir)
  indexed = list(enumerate(items))

  @beam.ptransform_fn
  def _load_split(begin):
    return (begin
            | "Items" >> beam.Create(indexed)
            # Spread the items over the workers (Create alone makes one bundle).
            | "Spread" >> beam.Reshuffle()
            | "Load" >> beam.ParDo(_LoadItems(load, status_dir, noun)))

  return _load_split()  # pylint: disable=no-value-for-parameter


def read_statuses(status_dir: str) -> list[dict]:
  """The statuses the workers wrote under ``status_dir``, one per item, in item order."""
  by_index = {}
  try:
    matches = FileSystems.match([FileSystems.join(status_dir, "*.jsonl")])[0].metadata_list
  except Exception:  # pylint: disable=broad-except  (no folder: nothing was written)
    return []
  for match in matches:
    with FileSystems.open(match.path) as f:
      for line in f.read().decode("utf-8").splitlines():
        if line.strip():
          status = json.loads(line)
          by_index[status["index"]] = status
  return [by_index[i] for i in sorted(by_index)]


def remove_statuses(folder: str) -> None:
  """Deletes the status files, so the prepared copy holds only TFDS's files."""
  if FileSystems.exists(folder):
    FileSystems.delete([folder])


def short_error(err: BaseException) -> str:
  """One line for a failed pipeline: the innermost ``SomeError: message`` line Beam's long,
  traceback-laden message holds, else its first line."""
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  found = [line for line in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*:", line)]
  text = found[-1] if found else (lines[0] if lines else type(err).__name__)
  if not found:
    text = f"{type(err).__name__}: {text}"
  return text if len(text) <= 300 else text[:297] + "..."
