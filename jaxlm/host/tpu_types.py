"""Cloud TPU accelerator types: slice shapes, runtime versions and zones, from Google's docs."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from jaxlm.errors import JaxlmError

# ---------------------------------------------------------------------------------------------
# Accelerator types: a snapshot of Google's public Cloud TPU docs (the pages "TPU regions and
# zones", "TPU software versions" and each generation's architecture page), mid-2025. Google
# adds zones and slice sizes over time: --notpu_check_zone skips the zone check and
# --tpu_version overrides the runtime version when this table has gone stale.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """One slice shape: gcloud's --accelerator-type, its chips and its hosts (gcloud's workers)."""
  name: str
  generation: str  # v2 | v3 | v4 | v5e | v5p | v6e
  chips: int
  hosts: int

  @property
  def chips_per_host(self) -> int:
    return self.chips // self.hosts

  @property
  def runtime_version(self) -> str:
    return RUNTIME_VERSIONS[self.generation]

  @property
  def zones(self) -> tuple[str, ...]:
    return ZONES.get(self.name) or ZONES[self.generation]


def _named_by_cores(generation: str, sizes: Sequence[int]) -> dict[str, Accelerator]:
  # v2, v3, v4 and v5p names count TensorCores (two per chip); each host drives four chips.
  return {f"{generation}-{n}": Accelerator(f"{generation}-{n}", generation, n // 2,
                                           max(1, n // 8)) for n in sizes}


def _named_by_chips(prefix: str, generation: str, sizes: Sequence[int]) -> dict[str, Accelerator]:
  # v5e (called v5litepod) and v6e names count chips: slices of up to 8 chips are one host,
  # larger slices have four chips per host.
  return {f"{prefix}-{n}": Accelerator(f"{prefix}-{n}", generation, n, 1 if n <= 8 else n // 4)
          for n in sizes}


ACCELERATORS: dict[str, Accelerator] = {
    **_named_by_cores("v2", (8, 32, 128, 256, 512)),
    **_named_by_cores("v3", (8, 32, 64, 128, 256, 512, 1024, 2048)),
    **_named_by_cores("v4", (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)),
    **_named_by_chips("v5litepod", "v5e", (1, 4, 8, 16, 32, 64, 128, 256)),
    **_named_by_cores("v5p", (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)),
    **_named_by_chips("v6e", "v6e", (1, 4, 8, 16, 32, 64, 128, 256)),
}

# The runtime (software) version Google recommends for JAX on each generation.
RUNTIME_VERSIONS = {
    "v2": "tpu-ubuntu2204-base",
    "v3": "tpu-ubuntu2204-base",
    "v4": "tpu-ubuntu2204-base",
    "v5e": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}

# Zones offering each generation; an exact type name overrides its generation (v2 and v3
# single-host slices are offered in more zones than their pods).
ZONES = {
    "v2-8": ("us-central1-b", "us-central1-c", "europe-west4-a", "asia-east1-c"),
    "v2": ("us-central1-a", "europe-west4-a"),
    "v3-8": ("us-central1-a", "us-central1-b", "europe-west4-a"),
    "v3": ("europe-west4-a",),
    "v4": ("us-central2-b",),
    "v5e": ("us-central1-a", "us-south1-a", "us-west1-c", "us-west4-a", "europe-west4-b",
            "asia-southeast1-b"),
    "v5p": ("us-central1-a", "us-east5-a", "europe-west4-b"),
    "v6e": ("us-central1-b", "us-east1-d", "us-east5-a", "us-east5-b", "europe-west4-a",
            "asia-northeast1-b"),
}


def find_accelerator(name: str) -> Accelerator:
  """The table entry for `name`, or a one-line error listing the known sizes of its family."""
  if name in ACCELERATORS:
    return ACCELERATORS[name]
  family = name.rsplit("-", 1)[0]
  family = "v5litepod" if family == "v5e" else family  # gcloud's name for v5e slices.
  same = [k for k in ACCELERATORS if k.rsplit("-", 1)[0] == family]
  if same:
    known = f"known {family} types: {', '.join(same)}"
  else:
    families = dict.fromkeys(k.rsplit("-", 1)[0] for k in ACCELERATORS)
    known = f"known families: {', '.join(families)} (e.g. v4-8, v5litepod-16, v6e-8)"
  raise JaxlmError(f"unknown TPU accelerator type {name!r}; {known}")
