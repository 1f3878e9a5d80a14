"""Item 16's remaining cases: get_sweep() raising, a tokenizer JSON that is a list, and a gs://
workdir this machine cannot reach (one line in seconds instead of a minute of retries)."""

from __future__ import annotations

import os

from harness import SMOKE, Case, jaxlm


def bad_sweep(workdir: str) -> None:
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  with open(os.path.join(os.path.dirname(workdir), "sweep.py"), "w") as f:
    f.write("import importlib.util\n"
            f"spec = importlib.util.spec_from_file_location('smoke', {SMOKE!r})\n"
            "smoke = importlib.util.module_from_spec(spec); spec.loader.exec_module(smoke)\n"
            "get_config = smoke.get_config\n"
            "def get_sweep():\n  raise ValueError('boom')\n")


def list_tokenizer(workdir: str) -> None:
  os.makedirs(os.path.dirname(workdir), exist_ok=True)
  with open(os.path.join(os.path.dirname(workdir), "tok.json"), "w") as f:
    f.write("[1, 2, 3]")


def nothing_written(workdir: str, result) -> str | None:
  return "workdir written" if os.path.exists(workdir) else None


CASES = [
    Case("sweep: get_sweep() raises", 16,
         jaxlm("sweep", "--config", "{T}/sweep.py", "--workdir", "{W}"),
         prepare=bad_sweep, check=nothing_written, expect_in_output=("raised ValueError: boom",)),
    Case("train: tokenizer JSON is a list", 16,
         jaxlm("train", "--config", "{SM}", "--workdir", "{W}",
               "--config.data.tokenizer={T}/tok.json"),
         prepare=list_tokenizer, expect_in_output=("not a JSON list",)),
    Case("train: gs:// workdir unreachable or without credentials", 16,
         jaxlm("train", "--config", "{SM}", "--workdir", "gs://jaxlm-no-such-bucket/run"),
         timeout=60, expect_in_output=("Google Cloud",)),
]
