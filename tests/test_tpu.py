"""Ahead-of-time compiles for Cloud TPU topologies (``main --compile_only``) and the chip table.

The compile tests need libtpu (``pip install -e '.[tpu-compile]'``, part of ``.[test-all]``):
without it they skip locally and fail under NCL_JAX_REQUIRE_ALL=1. No TPU is needed: libtpu
describes the topology and compiles on the CPU host. The module carries the ``tpu`` marker
(tests/conftest.py).
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

import train_testutils as tu
from suite_testutils import unavailable
from ncl_jax import chips, errors, sharding, tpu



@pytest.fixture
def libtpu():
  if importlib.util.find_spec("libtpu") is None:
    unavailable("libtpu is not installed (pip install -e '.[tpu-compile]')")


def _compile_cli(tmp_path, topology, *overrides, report=True):
  path = tmp_path / "report.json"
  args = [sys.executable, "-m", "ncl_jax.main", "--config=configs/synthetic.py",
          "--compile_only", f"--topology={topology}", *tu.cli_overrides(), *overrides]
  if report:
    args.append(f"--compile_report={path}")
  env = dict(os.environ, PYTHONPATH=str(tu.REPO_ROOT), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
  env.pop("JAX_NUM_CPU_DEVICES", None)
  proc = subprocess.run(args, cwd=tu.REPO_ROOT, env=env, capture_output=True, text=True,
                        timeout=300)
  return proc, (json.loads(path.read_text()) if report and path.exists() else None)


@pytest.mark.usefixtures("libtpu")
@pytest.mark.slow
def test_tiny_config_compiles_for_a_v5e_topology_and_reports_per_device(tmp_path):
  proc, report = _compile_cli(tmp_path, "v5e:2x2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert report["fits"] is True
  assert report["topology"] == "v5e:2x2" and report["chip"] == "v5e"
  assert report["devices"] == 4 and report["hosts"] == 1
  assert report["hbm_bytes"] == 16 * 2**30
  assert report["per_device_batch"] == 16 // 4
  # The parts add up to the peak; donated state is aliased into the outputs.
  parts = (report["arguments_bytes"] + report["outputs_bytes"] - report["aliased_bytes"]
           + report["temporaries_bytes"] + report["code_bytes"])
  assert report["peak_bytes"] == parts > 0
  assert 0 < report["aliased_bytes"] <= report["outputs_bytes"]
  # FLOPs per device: at least the two towers' matmuls of the device's 4 examples forward.
  assert report["flops_per_step_per_device"] > 0
  assert report["flops_per_example"] == pytest.approx(
      report["flops_per_step_per_device"] * 4 / 16)
  assert report["estimated_step_seconds"] == pytest.approx(
      report["flops_per_step_per_device"] / (197e12 * report["assumed_utilization"]))
  assert report["compile_seconds"] > 0
  assert report["eval"]["video_peak_bytes"] > 0 and report["eval"]["text_peak_bytes"] > 0
  assert "fits" in proc.stdout and "FLOPs per step per device" in proc.stdout


@pytest.mark.usefixtures("libtpu")
@pytest.mark.slow
def test_config_that_exceeds_hbm_exits_3_with_one_error_line(tmp_path):
  # 2^28 queue slots x 16 dims in float32: each device gathers the whole 16 GiB queue.
  proc, report = _compile_cli(tmp_path, "v5e:2x2", "--config.ncl.queue_size=268435456")
  assert proc.returncode == 3, proc.stderr[-3000:]
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(error_lines) == 1 and "Traceback" not in proc.stderr
  assert "does not fit v5e:2x2" in error_lines[0] and "GiB of HBM per device" in error_lines[0]
  assert "--config.microbatches" in error_lines[0]
  assert report["fits"] is False
  assert report["needed_bytes"] > report["available_bytes"] > 15 * 2**30


@pytest.mark.usefixtures("libtpu")
def test_named_slices_describe_their_devices_and_hosts():
  for name, devices, hosts, kind in (("v5e-8", 8, 1, "TPU v5 lite"), ("v5e-16", 16, 2,
                                                                     "TPU v5 lite"),
                                     ("v4-8", 4, 1, "TPU v4"), ("v5p-8", 4, 1, "TPU v5"),
                                     ("v6e-8", 8, 1, "TPU v6 lite")):
    chip, _, found = tpu.topology_devices(name)
    assert len(found) == devices, name
    assert len({d.process_index for d in found}) == hosts, name
    assert {d.device_kind for d in found} == {kind} == {chip.device_kind}, name
    assert chips.chip_of_device_kind(kind) is chip


@pytest.mark.usefixtures("libtpu")
def test_divisibility_counts_the_topologys_hosts_not_this_process():
  _, _, devices = tpu.topology_devices("v5e-16")
  mesh = sharding.make_mesh(devices)
  assert sharding.mesh_process_count(mesh) == 2   # this process alone is 1
  sharding.check_divisible(32, mesh, "config.global_batch_size")
  with pytest.raises(errors.UserError, match=r"not divisible by the number of devices \(16\)"):
    sharding.check_divisible(24, mesh, "config.global_batch_size")


def test_unknown_topology_is_a_user_error_listing_the_names():
  with pytest.raises(errors.UserError, match=r"unknown --topology 'v9-8'.*v5e-8"):
    tpu.resolve_topology("v9-8")
  host, shape = tpu.resolve_topology("v5e:2x4")
  assert host.chip.name == "v5e" and shape == "2x4"
  assert chips.peak_flops_of("cpu") is None


def test_missing_libtpu_is_one_clear_error(tmp_path):
  # A directory named libtpu without the package's files still imports as a namespace package;
  # the check instead runs with the installed one hidden from the import system.
  code = ("import sys, importlib.util\n"
          "real = importlib.util.find_spec\n"
          "importlib.util.find_spec = lambda n, *a: None if n == 'libtpu' else real(n, *a)\n"
          "sys.argv = ['main', '--config=configs/synthetic.py', '--compile_only',"
          " '--topology=v5e-8']\n"
          "from ncl_jax import main\n"
          "main.run()\n")
  env = dict(os.environ, PYTHONPATH=str(tu.REPO_ROOT))
  proc = subprocess.run([sys.executable, "-c", code], cwd=tu.REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines() == [
      "error: compiling for a TPU topology needs libtpu: pip install 'ncl_jax[tpu-compile]' "
      f"(the same as pip install 'jax[tpu]=={__import__('jax').__version__}')"]
