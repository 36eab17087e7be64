"""Run logs: ``metrics.jsonl``, TensorBoard event files and a progress line with speed and ETA.

Only process 0 writes. ``metrics.jsonl`` holds one JSON object per line with at least ``step``;
train lines carry ``loss``, evaluation lines carry keys such as ``val/plain/t2v/R@1``.
TensorBoard events are written with ``tensorboardX``, which needs no TensorFlow.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time
from typing import Any, Mapping

import jax
import numpy as np
from tensorboardX import SummaryWriter

from ncl_jax import runs


def _plain(value: Any) -> Any:
  """JSON-safe Python scalar (non-finite floats become strings, which JSON cannot hold)."""
  if isinstance(value, (np.generic, np.ndarray)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)
  return value


class MetricWriter:
  """Appends metrics to ``DIR/metrics.jsonl`` and TensorBoard event files under ``DIR/tb``."""

  def __init__(self, workdir: str, *, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._file = None
    self._tb = None
    if not self._active:
      return
    os.makedirs(workdir, exist_ok=True)
    self._file = open(os.path.join(workdir, runs.METRICS_FILE), "a")
    if tensorboard:
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one line ``{"step": step, **metrics}`` and the numeric values to TensorBoard."""
    if not self._active:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


class Progress:
  """Formats "step 40/200 loss 1.234  7.1 steps/s  ETA 0:00:22" lines from wall-clock time.

  The speed is measured since the first reported step, so compilation of the first step does
  not distort it.
  """

  def __init__(self, total_steps: int, start_step: int = 0):
    self._total = total_steps
    self._t0 = None
    self._s0 = start_step

  def line(self, step: int, loss: float) -> str:
    now = time.perf_counter()
    if self._t0 is None:
      self._t0, self._s0 = now, step
      rate = float("nan")
    else:
      rate = (step - self._s0) / max(now - self._t0, 1e-9)
    if rate > 0 and math.isfinite(rate):
      eta = str(datetime.timedelta(seconds=round((self._total - step) / rate)))
      speed = f"{rate:.2f} steps/s  ETA {eta}"
    else:
      speed = "-- steps/s  ETA --"
    return f"step {step}/{self._total}  loss {loss:.4f}  {speed}"


class Throughput:
  """Steps/s, TFLOP/s per device and MFU between consecutive reports (the trainer's logs).

  The first report only starts the clock (the first steps include compilation). FLOPs per step
  and device come from the compiled train step's cost analysis; MFU needs the device's peak
  FLOP/s (:mod:`ncl_jax.chips`) and is left out where it is unknown (CPU).
  """

  def __init__(self, flops_per_step_per_device: float | None = None,
               peak_flops: float | None = None):
    self.flops = flops_per_step_per_device or None
    self.peak = peak_flops or None
    self._last = None  # (time, step) of the previous report
    self._seconds = 0.0
    self._steps = 0

  def report(self, step: int) -> dict[str, float]:
    """``{"steps_per_s", "tflops_per_device", "mfu"}`` since the previous report, or {}."""
    now = time.perf_counter()
    last, self._last = self._last, (now, step)
    if last is None or step <= last[1]:
      return {}
    self._seconds += now - last[0]
    self._steps += step - last[1]
    return self._rates(step - last[1], now - last[0])

  def summary(self) -> dict[str, float | None]:
    """The same rates over every measured window of the run (None before any)."""
    rates = self._rates(self._steps, self._seconds) if self._steps else {}
    return {"steps_per_s": rates.get("steps_per_s"),
            "tflops_per_device": rates.get("tflops_per_device"), "mfu": rates.get("mfu"),
            "flops_per_step_per_device": self.flops, "peak_flops_per_device": self.peak}

  def _rates(self, steps: int, seconds: float) -> dict[str, float]:
    rates = {"steps_per_s": steps / max(seconds, 1e-9)}
    if self.flops:
      flops_per_s = self.flops * rates["steps_per_s"]
      rates["tflops_per_device"] = flops_per_s / 1e12
      if self.peak:
        rates["mfu"] = flops_per_s / self.peak
    return rates
