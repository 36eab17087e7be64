"""Cloud TPU chips and topologies, and ahead-of-time compiles of the train step for them.

``python -m ncl_jax.main --config=CONFIG --compile_only --topology=v5e-8`` builds the real train
step (and the evaluation embedding steps) from the config alone and compiles it for a TPU
topology on any host, a CPU-only one included, with ``libtpu`` installed
(``pip install 'ncl_jax[tpu-compile]'``). The TPU compiler's memory and cost analyses say
whether the config fits the chip's HBM and how many FLOPs a step takes, before anyone pays for
the chips (the approach of MaxText's ``train_compile.py``).

Memory and peak FLOP/s of the chips come from :mod:`ncl_jax.chips`.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import time
from typing import Any, Mapping

import jax
import ml_collections

from ncl_jax import chips
from ncl_jax import errors
from ncl_jax import sharding
from ncl_jax import train

GIB = chips.GIB
# The fraction of peak FLOP/s the estimated step time assumes (a typical MFU of a
# well-fed vision-language train step; the real one is measured when training).
ASSUMED_UTILIZATION = 0.4
EXIT_DOES_NOT_FIT = 3


@dataclasses.dataclass(frozen=True)
class TpuHost:
  """How a TPU generation's slices are described to ``get_topology_desc``.

  Attributes:
    chip: the chip (memory, peak FLOP/s).
    topology_prefix: the generation as topology names spell it ("v5" for v5p).
    chip_config: "megacore" (two TensorCores as one device) or "default".
    chips_per_host: ``chips_per_host_bounds`` of one host (VM) of the slice.
  """

  chip: chips.Chip
  topology_prefix: str
  chip_config: str
  chips_per_host: tuple[int, int, int]


# v5e and v6e hosts hold 8 chips (the single-host v5e-8 and v6e-8 VMs; MaxText models them as
# 4-chip hosts, which changes nothing per device), so v5e-16 spans two hosts; v4 and v5p hosts
# hold 4 chips (8 TensorCores: "v4-8").
TPU_HOSTS = {
    "v4": TpuHost(chips.CHIPS["v4"], "v4", "megacore", (2, 2, 1)),
    "v5e": TpuHost(chips.CHIPS["v5e"], "v5e", "default", (2, 4, 1)),
    "v5p": TpuHost(chips.CHIPS["v5p"], "v5", "megacore", (2, 2, 1)),
    "v6e": TpuHost(chips.CHIPS["v6e"], "v6e", "default", (2, 4, 1)),
}
# Slice names -> (generation, topology).
TOPOLOGIES = {
    "v5e-4": ("v5e", "2x2"), "v5e-8": ("v5e", "2x4"), "v5e-16": ("v5e", "4x4"),
    "v5e-32": ("v5e", "4x8"), "v6e-4": ("v6e", "2x2"), "v6e-8": ("v6e", "2x4"),
    "v6e-16": ("v6e", "4x4"), "v4-8": ("v4", "2x2x1"), "v4-16": ("v4", "2x2x2"),
    "v4-32": ("v4", "2x2x4"), "v5p-8": ("v5p", "2x2x1"), "v5p-16": ("v5p", "2x2x2"),
    "v5p-32": ("v5p", "2x2x4"),
}


def resolve_topology(name: str) -> tuple[TpuHost, str]:
  """(generation, shape) of a slice name such as "v5e-8" or a raw topology such as "v5e:2x4"."""
  if name in TOPOLOGIES:
    generation, shape = TOPOLOGIES[name]
    return TPU_HOSTS[generation], shape
  match = re.fullmatch(r"(v\w+):(\d+(?:x\d+){1,2})", name)
  if match and match.group(1) in TPU_HOSTS:
    return TPU_HOSTS[match.group(1)], match.group(2)
  errors.fail(f"unknown --topology {name!r}; use one of {', '.join(TOPOLOGIES)} or a "
              f"topology such as v5e:2x4 or v4:2x2x1 (chips: {', '.join(TPU_HOSTS)})")


def _host_bounds(host: TpuHost, shape: str) -> tuple[int, int, int]:
  """Chips per host: the generation's usual host, or the whole slice when it is smaller."""
  dims = [int(d) for d in shape.split("x")] + [1]
  return tuple(min(h, d) for h, d in zip(host.chips_per_host, dims[:3]))


def _require_libtpu() -> None:
  if importlib.util.find_spec("libtpu") is None:
    errors.fail("compiling for a TPU topology needs libtpu: pip install 'ncl_jax[tpu-compile]' "
                f"(the same as pip install 'jax[tpu]=={jax.__version__}')")
  # Several processes may load libtpu on one host (tests, parallel compiles); without a TPU
  # attached, these two say which slice this is and silence libtpu's start-up probing.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")


def topology_devices(name: str) -> tuple[chips.Chip, str, list[Any]]:
  """(chip, topology, devices) of a TPU slice, described without TPUs attached."""
  host, shape = resolve_topology(name)
  _require_libtpu()
  # After _require_libtpu: only the TPU compile extra (libtpu) gives this module a use.
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topology = f"{host.topology_prefix}:{shape}"
  try:
    description = topologies.get_topology_desc(
        platform="tpu", topology_name=topology, chip_config_name=host.chip_config,
        chips_per_host_bounds=_host_bounds(host, shape), num_slices=1)
  except Exception as err:  # libtpu rejects shapes it does not know with a runtime error
    errors.fail(f"libtpu cannot describe the topology {topology}: {str(err).splitlines()[0]}")
  return host.chip, topology, list(description.devices)


class DoesNotFitError(errors.UserError):
  """The step needs more HBM than the chip has (exit code 3)."""

  exit_code = EXIT_DOES_NOT_FIT


def _memory(compiled) -> dict[str, int]:
  stats = compiled.memory_analysis()
  memory = {
      "arguments_bytes": int(stats.argument_size_in_bytes),
      "outputs_bytes": int(stats.output_size_in_bytes),
      "aliased_bytes": int(stats.alias_size_in_bytes),
      "temporaries_bytes": int(stats.temp_size_in_bytes),
      "code_bytes": int(stats.generated_code_size_in_bytes),
  }
  # What the device allocates for the step: its arguments, the outputs not aliased to donated
  # arguments, one block of temporaries and the code. The compiler's own heap-simulation peak
  # (smaller: temporaries are not all live at once) is kept beside it.
  memory["peak_bytes"] = (memory["arguments_bytes"] + memory["outputs_bytes"]
                          - memory["aliased_bytes"] + memory["temporaries_bytes"]
                          + memory["code_bytes"])
  memory["compiler_peak_bytes"] = int(getattr(stats, "peak_memory_in_bytes", 0) or 0)
  return memory


def _flops(compiled) -> float:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per computation
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))


_HBM_MESSAGE = re.compile(r"([\d.]+)([KMGT]?)i?B?\)? exceeds available HBM \(([\d.]+)([KMGT]?)")


def _bytes(number: str, unit: str) -> int:
  return int(float(number) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[unit])


def _out_of_memory(err: Exception) -> dict[str, int] | None:
  """{"needed_bytes", "available_bytes"} of the TPU compiler's RESOURCE_EXHAUSTED, else None."""
  text = str(err)
  if "RESOURCE_EXHAUSTED" not in text and "exceeds available HBM" not in text:
    return None
  found = _HBM_MESSAGE.search(text)
  if not found:
    return {"needed_bytes": 0, "available_bytes": 0}
  return {"needed_bytes": _bytes(found.group(1), found.group(2)),
          "available_bytes": _bytes(found.group(3), found.group(4))}


def _eval_shapes(config, mesh) -> tuple[dict, dict]:
  shapes = train.batch_shapes(config, mesh, rows=int(config.eval.batch_size))
  return ({"tokens": shapes["text_tokens"]},
          {"video": shapes["video"], "frame_mask": shapes["frame_mask"]})


def compile_steps(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """Compiles the train step and the evaluation embedding steps of ``config`` for ``mesh``.

  Returns:
    ``{"train": compiled, "eval_text": compiled, "eval_video": compiled, "compile_seconds"}``
    (seconds of the train step's compile).

  Raises:
    DoesNotFitError: the train step needs more memory than a device has.
  """
  total_steps = max(int(config.total_steps), 1)  # only the schedule's constants depend on it
  program = train.build_program(config, mesh, total_steps)
  lowered = program.train_step.lower(program.abstract_state, train.batch_shapes(config, mesh))
  start = time.perf_counter()
  try:
    compiled = lowered.compile()
  except Exception as err:  # pylint: disable=broad-except
    needed = _out_of_memory(err)
    if needed is None:
      raise
    raise DoesNotFitError(json.dumps(needed)) from err
  seconds = time.perf_counter() - start
  params = program.abstract_state.params
  text_shapes, video_shapes = _eval_shapes(config, mesh)
  eval_text = program.encoders.text.lower(params, text_shapes["tokens"]).compile()
  eval_video = program.encoders.video.lower(params, video_shapes["video"],
                                            video_shapes["frame_mask"]).compile()
  return {"train": compiled, "eval_text": eval_text, "eval_video": eval_video,
          "compile_seconds": seconds}


def _machine() -> dict[str, Any]:
  return {"host": platform.node(), "cpus": os.cpu_count(),
          "load_average": [round(x, 2) for x in os.getloadavg()],
          "jax": jax.__version__, "libtpu": _libtpu_version()}


def _libtpu_version() -> str | None:
  try:
    return importlib.metadata.version("libtpu")
  except Exception:  # pylint: disable=broad-except
    return None


def compile_report(config: ml_collections.ConfigDict, topology: str, *,
                   utilization: float = ASSUMED_UTILIZATION) -> dict[str, Any]:
  """Compiles ``config`` for the TPU slice ``topology`` and reports memory and FLOPs per device.

  Returns:
    A JSON-ready dict: ``fits``, ``topology``, ``chip``, ``devices``, ``hosts``, ``hbm_bytes``,
    ``peak_bytes`` (and its parts), ``flops_per_step_per_device``, ``flops_per_example``,
    ``estimated_step_seconds`` and ``estimated_examples_per_second`` at ``utilization`` of peak,
    ``compile_seconds``, the evaluation steps' peaks under ``eval``, and the machine. When the
    step does not fit: ``fits`` False, ``needed_bytes``, ``available_bytes`` (the compiler's
    figures) and no FLOPs.
  """
  chip, topo, devices = topology_devices(topology)
  mesh = sharding.make_mesh(devices)
  n = len(devices)
  report = {
      "topology": topology, "topology_shape": topo, "chip": chip.name, "devices": n,
      "hosts": len({d.process_index for d in devices}), "hbm_bytes": chip.hbm_bytes,
      "global_batch_size": int(config.global_batch_size),
      "per_device_batch": int(config.global_batch_size) // n,
      "microbatches": int(config.get("microbatches", 1)),
      "model": {"dtype": str(config.model.dtype), "remat": bool(config.model.remat),
                "head": str(config.model.head),
                "vision_layers": int(config.model.vision.layers),
                "vision_width": int(config.model.vision.width),
                "patch_size": int(config.model.vision.patch_size)},
      "frames": int(config.data.max_frames), "words": int(config.data.max_words),
      "queue_size": int(config.ncl.queue_size), "loss": str(config.loss),
      "assumed_utilization": utilization,
  }
  start = time.perf_counter()
  try:
    compiled = compile_steps(config, mesh)
  except DoesNotFitError as err:
    report.update(fits=False, compile_seconds=round(time.perf_counter() - start, 1),
                  **json.loads(str(err)), machine=_machine())
    return report
  memory = _memory(compiled["train"])
  flops = _flops(compiled["train"])
  step_seconds = flops / (chip.peak_flops * utilization)
  per_step_examples = int(config.global_batch_size)
  report.update(memory)
  report.update(
      fits=memory["peak_bytes"] <= chip.hbm_bytes,
      flops_per_step_per_device=flops,
      flops_per_example=flops * n / per_step_examples,
      estimated_step_seconds=step_seconds,
      estimated_examples_per_second=per_step_examples / step_seconds if step_seconds else None,
      compile_seconds=round(compiled["compile_seconds"], 1),
      eval={"batch_size": int(config.eval.batch_size),
            "text_peak_bytes": _memory(compiled["eval_text"])["peak_bytes"],
            "video_peak_bytes": _memory(compiled["eval_video"])["peak_bytes"]},
      machine=_machine())
  return report


def describe(report: Mapping[str, Any]) -> str:
  """The report as readable lines (per device)."""
  gib = lambda b: f"{b / GIB:.2f} GiB"  # noqa: E731
  head = (f"{report['topology']} ({report['chip']} topology {report['topology_shape']}): "
          f"{report['devices']} devices on {report['hosts']} host(s), "
          f"{report['per_device_batch']} examples per device"
          f" in {report['microbatches']} micro-batch(es)")
  if not report["fits"] and "needed_bytes" in report:
    return (f"{head}\n  does not fit: needs {gib(report['needed_bytes'])} per device, "
            f"{gib(report['available_bytes'])} available "
            f"(compile {report['compile_seconds']:.0f} s)")
  lines = [
      head,
      f"  per device: arguments {gib(report['arguments_bytes'])}, outputs "
      f"{gib(report['outputs_bytes'])} ({gib(report['aliased_bytes'])} aliased to arguments), "
      f"temporaries {gib(report['temporaries_bytes'])}, code {gib(report['code_bytes'])}",
      f"  peak {gib(report['peak_bytes'])} of {gib(report['hbm_bytes'])} HBM: "
      + ("fits" if report["fits"] else "DOES NOT FIT"),
      f"  {report['flops_per_step_per_device']:.3g} FLOPs per step per device, "
      f"{report['flops_per_example']:.3g} per example",
      f"  at {report['assumed_utilization']:.0%} of peak: {report['estimated_step_seconds']:.3f} "
      f"s per step, {report['estimated_examples_per_second']:.0f} examples/s",
      f"  evaluation (batch {report['eval']['batch_size']}): text peak "
      f"{gib(report['eval']['text_peak_bytes'])}, video peak "
      f"{gib(report['eval']['video_peak_bytes'])}",
      f"  compiled in {report['compile_seconds']:.0f} s",
  ]
  return "\n".join(lines)


def does_not_fit_message(report: Mapping[str, Any]) -> str:
  """The one ``error:`` line of a step that does not fit, with what to change."""
  needed = report.get("needed_bytes") or report.get("peak_bytes", 0)
  available = report.get("available_bytes") or report["hbm_bytes"]
  per_device = report["per_device_batch"]
  hints = []
  if per_device // report["microbatches"] > 1:
    hints.append(f"--config.microbatches=M (M > {report['microbatches']} dividing {per_device} "
                 "keeps the contrastive batch whole)")
  if not report["model"]["remat"]:
    hints.append("--config.model.remat=True")
  if report["model"]["dtype"] == "float32":
    hints.append("--config.model.dtype=bfloat16")
  hints.append("more chips or a chip with more HBM")
  return (f"the train step does not fit {report['topology']}: it needs "
          f"{needed / GIB:.2f} GiB of HBM per device and {available / GIB:.2f} GiB are "
          f"available; try {', '.join(hints)}")


def write_report(report: Mapping[str, Any], path: str) -> None:
  """Writes the report as JSON (never over an existing file)."""
  if os.path.exists(path):
    errors.fail(f"{path} exists; choose a new --compile_report path")
  with open(path, "x") as f:
    json.dump(report, f, indent=2, sort_keys=True)
    f.write("\n")
