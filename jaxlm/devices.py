"""The accelerators jaxlm knows by name: peak dense TFLOP/s and memory per device, one table.

`jaxlm bench` and the training log use the peak for MFU; `jaxlm params --device` uses both to
estimate step time and check that a run fits. A device missing here gets a measured peak
(metrics.peak_flops_per_device) and no memory check.
"""

from __future__ import annotations

import dataclasses

from jaxlm.errors import JaxlmError


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  name: str  # JAX's device_kind, or the start of it.
  peak_tflops: float  # Dense bfloat16, from the vendor's data sheet.
  memory_gib: float  # HBM per device: per chip, or per core where JAX shows one per core.
  # Dense float32 matmul peak as XLA runs it by default (TF32 tensor cores on NVIDIA Ampere and
  # later; plain FP32 before them); 0 = the bfloat16 peak, as on TPUs, whose float32 matmuls
  # go through the same MXU passes.
  fp32_tflops: float = 0.0

  def peak(self, dtype: str) -> float:
    """Peak FLOP/s for matmuls computed in `dtype`."""
    if dtype == "float32" and self.fp32_tflops:
      return self.fp32_tflops * 1e12
    return self.peak_tflops * 1e12


# TPU v2/v3 show one JAX device per core, so their numbers are per core.
DEVICES = tuple(DeviceSpec(*row) for row in (
    ("TPU v2", 22.5, 8.0), ("TPU v3", 61.5, 16.0), ("TPU v4", 275.0, 32.0),
    ("TPU v5 lite", 197.0, 16.0), ("TPU v5e", 197.0, 16.0), ("TPU v5p", 459.0, 95.0),
    ("TPU v6 lite", 918.0, 32.0), ("TPU v6e", 918.0, 32.0),
    ("NVIDIA A100-SXM4-40GB", 312.0, 40.0, 156.0), ("NVIDIA A100-SXM4-80GB", 312.0, 80.0, 156.0),
    ("NVIDIA A100 80GB PCIe", 312.0, 80.0, 156.0), ("NVIDIA H100 80GB HBM3", 989.0, 80.0, 494.0),
    ("NVIDIA H100 PCIe", 756.0, 80.0, 378.0), ("NVIDIA H200", 989.0, 141.0, 494.0),
    ("NVIDIA L4", 121.0, 24.0, 60.0), ("NVIDIA A10G", 125.0, 24.0, 62.5),
    ("Tesla T4", 65.0, 16.0, 8.1), ("Tesla V100-SXM2-16GB", 125.0, 16.0, 15.7),
))


def for_device_kind(kind: str) -> DeviceSpec | None:
  """The entry for a JAX device_kind (which may carry a suffix, e.g. 'TPU v4 ...'), if known."""
  return next((d for d in DEVICES if kind.startswith(d.name)), None)


def lookup(name: str) -> DeviceSpec:
  """The entry named `name` (case-insensitive), or a one-line error listing the known names."""
  for d in DEVICES:
    if d.name.lower() == name.strip().lower():
      return d
  raise JaxlmError(f"unknown --device={name!r}: expected one of "
                   f"{', '.join(repr(d.name) for d in DEVICES)}, or give --peak_tflops "
                   "and --device_memory_gb")
