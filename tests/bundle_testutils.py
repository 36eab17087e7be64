"""One tiny synthetic training run and its bundle, shared by the export, inference and embed
tests of a pytest session (training once keeps the suite inside its time budget)."""

import pathlib

import train_testutils

_CACHE = {}


def tiny_run(tmp_path_factory) -> pathlib.Path:
  """A finished tiny synthetic NCL run (4 steps, validation every 2): its workdir."""
  if "run" not in _CACHE:
    from ncl_jax import train  # pylint: disable=g-import-not-at-top
    workdir = tmp_path_factory.mktemp("tiny_run") / "run"
    with train_testutils.fast_compile():
      train.train_and_evaluate(train_testutils.tiny_config("ncl"), str(workdir))
    _CACHE["run"] = workdir
  return _CACHE["run"]


def tiny_bundle(tmp_path_factory) -> pathlib.Path:
  """The bundle exported from :func:`tiny_run` (no verification)."""
  if "bundle" not in _CACHE:
    from ncl_jax import export  # pylint: disable=g-import-not-at-top
    run = tiny_run(tmp_path_factory)
    out = tmp_path_factory.mktemp("tiny_bundle") / "bundle"
    with train_testutils.fast_compile():
      export.export_bundle(run, out)
    _CACHE["bundle"] = out
  return _CACHE["bundle"]
