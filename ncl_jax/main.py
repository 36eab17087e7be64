"""Command line: ``python -m ncl_jax.main --config=configs/synthetic.py --workdir=DIR``.

Kept short on purpose: everything happens in :func:`ncl_jax.train.train_and_evaluate`.
Config fields are overridden with ``--config.key=value`` (e.g. ``--config.loss=infonce``).

Multi-process runs (TPU pods, several GPU hosts) call ``jax.distributed.initialize()`` first:
with ``--distributed`` (TPU VMs and clusters that JAX detects on its own) or with
``--coordinator_address``/``--num_processes``/``--process_id`` (any cluster, or localhost).
A single host never initializes the distributed runtime.

``--compile_only --topology=v5e-8 [--compile_report=PATH.json]`` compiles the config's train step
for a Cloud TPU slice on any host (libtpu needed, no TPU) and reports whether it fits the chips'
memory and its FLOPs per step (docs/tpu.md).
"""

from __future__ import annotations

import difflib
import os
import pathlib
import sys

from absl import app, flags
from ml_collections import config_flags

from ncl_jax import errors

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Training config file, e.g. configs/synthetic.py.", lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory: checkpoints, logs, results (resumed if it holds this run).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection (TPU pods).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for jax.distributed (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 to num_processes - 1.")
_COMPILE_ONLY = flags.DEFINE_bool(
    "compile_only", False, "Compile the train step for --topology (a TPU slice, described "
    "without TPUs: needs libtpu, pip install 'ncl_jax[tpu-compile]'), report memory and FLOPs "
    "per device, and exit: 0 when it fits, 3 when it does not. Needs no data, no weights, no "
    "--workdir.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --compile_only: a TPU slice (v5e-8, v4-8, v5p-8, v6e-8, v5e-16, "
    "...) or a topology such as v5e:2x4.")
_COMPILE_REPORT = flags.DEFINE_string(
    "compile_report", None, "With --compile_only: also write the report to this JSON file.")


def maybe_initialize_distributed(distributed: bool, coordinator: str | None,
                                 num_processes: int | None, process_id: int | None) -> bool:
  """Initializes jax.distributed when the run spans processes; returns whether it did."""
  import jax  # pylint: disable=g-import-not-at-top
  explicit = (coordinator, num_processes, process_id)
  if any(v is not None for v in explicit):
    if any(v is None for v in explicit):
      errors.fail("a multi-process run needs all of --coordinator_address, --num_processes and "
                  "--process_id (or --distributed alone on TPU pods)")
    if num_processes <= 1:
      return False
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    return True
  if distributed:
    jax.distributed.initialize()
    return True
  return False


def _config_keys(config, prefix: str = "") -> list[str]:
  keys = []
  for key, value in config.items():
    name = f"{prefix}{key}"
    keys.append(name)
    if hasattr(value, "items"):
      keys.extend(_config_keys(value, f"{name}."))
  return keys


def unknown_override_message(argv: list[str], config_file: str | None) -> str | None:
  """A one-line error for ``--config.<key>`` overrides naming no field, with the closest keys."""
  if config_file is None:
    return None
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("ncl_jax_cli_config", config_file.split(":")[0])
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  keys = _config_keys(module.get_config())
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    key = arg[len("--config."):].split("=", 1)[0]
    if key not in keys:
      close = difflib.get_close_matches(key, keys, n=3, cutoff=0.5)
      hint = f"; did you mean {' or '.join(close)}?" if close else ""
      return f"unknown config key {key!r} in {arg!r}{hint}"
  return None


def _config_file_arg(argv: list[str]) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def compile_only(config, topology: str | None, report_path: str | None) -> int:
  """``--compile_only``: compiles for a TPU topology, prints the report; 0 fits, 3 does not."""
  if not topology:
    errors.fail("--compile_only needs --topology, e.g. --topology=v5e-8")
  from ncl_jax import tpu  # pylint: disable=g-import-not-at-top
  if report_path and os.path.exists(report_path):
    errors.fail(f"{report_path} exists; choose a new --compile_report path")
  report = tpu.compile_report(config, topology)
  print(tpu.describe(report), flush=True)
  if report_path:
    tpu.write_report(report, report_path)
  if not report["fits"]:
    raise tpu.DoesNotFitError(tpu.does_not_fit_message(report))
  return 0


def check_workdir(workdir: str) -> None:
  """Raises UserError unless ``workdir`` is, or can become, a directory (before any import)."""
  path = pathlib.Path(workdir)
  for existing in (path, *path.parents):
    if existing.exists():
      break
  if not existing.is_dir():
    what = "--workdir" if existing == path else f"--workdir's parent {str(existing)!r}"
    errors.fail(f"{what} is a file, not a directory: --workdir must name a directory (new, or "
                "one holding a run) for checkpoints, logs and results")
  if not os.access(existing, os.W_OK | os.X_OK):
    errors.fail(f"--workdir {str(path)!r} cannot be written: {str(existing)!r} is not writable "
                "by this user")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if _COMPILE_ONLY.value:
    compile_only(_CONFIG.value, _TOPOLOGY.value, _COMPILE_REPORT.value)
    return
  if _WORKDIR.value is None:
    errors.fail("--workdir is required (the run directory for checkpoints, logs and results)")
  check_workdir(_WORKDIR.value)
  maybe_initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                               _PROCESS_ID.value)
  from ncl_jax import train  # pylint: disable=g-import-not-at-top
  # Returns None when SIGTERM stopped the run after saving a checkpoint: exit 0, resume later.
  train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)


def _asks_for_help(args: list[str]) -> bool:
  return any(arg in ("-h", "--help", "--helpshort", "--helpfull") for arg in args)


def _usage() -> str:
  """The module docstring and this command's own flags (absl's help would list every library's)."""
  own_flags = flags.FLAGS.get_flags_for_module(sys.modules[__name__])
  lines = [__doc__.strip(), "", "flags:"]
  for flag in sorted(own_flags, key=lambda f: f.name):
    default = "" if flag.default is None else f" (default: {flag.default})"
    lines.append(f"  --{flag.name}: {flag.help}{default}")
  return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
  """Parses flags and runs :func:`main`; user mistakes become one error line and exit code 2."""
  argv = list(sys.argv if argv is None else argv)
  sys.argv = argv  # config_flags reads --config.* overrides from sys.argv

  def body() -> int:
    if _asks_for_help(argv[1:]):
      print(_usage())
      return 0
    config_file = _config_file_arg(argv[1:])
    try:
      flags.FLAGS(argv)
      config = _CONFIG.value  # config_flags loads the file and applies overrides here
      if config is not None:
        config.keys()  # a file that failed to load gives a placeholder that raises on use
    except OSError as err:
      errors.fail(f"cannot load the config file {config_file!r}: "
                  f"{str(err).strip().splitlines()[-1].strip()}")
    except (flags.Error, AttributeError, KeyError) as err:
      message = unknown_override_message(argv[1:], config_file)
      errors.fail(message or str(err).splitlines()[0])
    if config is None:
      errors.fail("--config is required, e.g. --config=configs/synthetic.py")
    main([argv[0]])
    return 0

  errors.run_cli(body)


if __name__ == "__main__":
  run()
