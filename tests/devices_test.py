"""The device table: lookups by name and by JAX device_kind, and the peak that MFU uses."""

import types

import pytest

from jaxlm import devices, metrics
from jaxlm.errors import JaxlmError


def test_lookup_is_case_insensitive_and_carries_peak_and_memory():
  d = devices.lookup("  tpu V4 ")
  assert (d.name, d.peak_tflops, d.memory_gib) == ("TPU v4", 275.0, 32.0)


def test_unknown_device_is_one_line_naming_the_known_ones():
  with pytest.raises(JaxlmError, match=r"unknown --device='TPU v9'.*'TPU v4'.*--peak_tflops"):
    devices.lookup("TPU v9")


def test_device_kind_matches_by_prefix():
  assert devices.for_device_kind("TPU v5 lite").name == "TPU v5 lite"
  assert devices.for_device_kind("NVIDIA H200").memory_gib == 141.0
  assert devices.for_device_kind("cpu") is None


def test_names_are_unique():
  names = [d.name for d in devices.DEVICES]
  assert len(names) == len(set(names))


def test_peak_flops_of_a_known_device_comes_from_the_table():
  fake = types.SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3", platform="gpu")
  assert metrics.peak_flops_per_device(fake, "bfloat16") == 989.0e12
  assert metrics.peak_flops_per_device(fake, "float32") == 494.0e12  # TF32 tensor cores.
