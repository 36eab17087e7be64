"""Accelerator chips: memory and peak FLOP/s per device, from the vendors' datasheets.

Used for MFU in the trainer's logs (:func:`peak_flops_of`) and by the TPU compile report
(:mod:`ncl_jax.tpu`). Megacore TPUs (v4, v5p) are one JAX device per chip.
"""

from __future__ import annotations

import dataclasses

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator as JAX sees it.

  Attributes:
    name: the short name ("v5e", "h100").
    device_kind: ``jax.Device.device_kind`` of its devices.
    hbm_bytes: memory per device.
    peak_flops: dense bfloat16 FLOP/s per device.
  """

  name: str
  device_kind: str
  hbm_bytes: int
  peak_flops: float


# cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}; NVIDIA's H100 SXM and A100 SXM datasheets (dense,
# without 2:4 sparsity).
CHIPS = {
    "v4": Chip("v4", "TPU v4", 32 * GIB, 275e12),
    "v5e": Chip("v5e", "TPU v5 lite", 16 * GIB, 197e12),
    "v5p": Chip("v5p", "TPU v5", 95 * GIB, 459e12),
    "v6e": Chip("v6e", "TPU v6 lite", 32 * GIB, 918e12),
    "h100": Chip("h100", "NVIDIA H100 80GB HBM3", 80 * GIB, 989e12),
    "a100": Chip("a100", "NVIDIA A100-SXM4-80GB", 80 * GIB, 312e12),
}


def chip_of_device_kind(device_kind: str) -> Chip | None:
  """The chip whose devices report ``device_kind``; None for CPUs and chips not in the table."""
  for chip in CHIPS.values():
    if chip.device_kind == device_kind:
      return chip
  return None


def peak_flops_of(device_kind: str) -> float | None:
  """Peak bfloat16 FLOP/s of one device of that kind, or None (CPU, unknown chips: no MFU)."""
  chip = chip_of_device_kind(device_kind)
  return chip.peak_flops if chip else None
