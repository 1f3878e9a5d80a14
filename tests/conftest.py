"""Test setup: CPU only, 8 fake devices (for mesh tests), strict rank promotion."""

import os
import sys

# Must happen before jax is imported anywhere.
os.environ["JAX_PLATFORMS"] = "cpu"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")


@pytest.fixture(autouse=True)
def _token_cache(tmp_path_factory, monkeypatch):
  """Each test session gets its own token cache, so tests never touch ~/.cache."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.getbasetemp() / "cache"))


def load_config(name: str):
  """Loads configs/<name>.py the way the CLI does."""
  from ml_collections import config_flags  # noqa: F401  (ensures the same loader as the CLI)
  import importlib.util
  path = os.path.join(CONFIGS, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def jaxlm_command() -> list[str]:
  """How to run the console script from the test interpreter's environment."""
  return [sys.executable, "-m", "jaxlm.cli"]
