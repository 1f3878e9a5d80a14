"""Test setup: CPU only, 8 fake devices (for mesh tests), strict rank promotion."""

import logging
import os
import socket
import subprocess
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
  import importlib.util

  from ml_collections import config_flags  # noqa: F401  (ensures the same loader as the CLI)
  path = os.path.join(CONFIGS, f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def jaxlm_script() -> str:
  """The installed `jaxlm` console script next to the test interpreter."""
  script = os.path.join(os.path.dirname(sys.executable), "jaxlm")
  assert os.path.exists(script), "the jaxlm console script is not installed next to python"
  return script


def run_jaxlm(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `jaxlm ARGS...` to completion from the repo root; output captured as text."""
  return subprocess.run([jaxlm_script(), *args], capture_output=True, text=True,
                        timeout=timeout, cwd=REPO)


def start_jaxlm(*args: str) -> subprocess.Popen:
  """Starts `jaxlm ARGS...` in the background with stderr (the log) piped, line-buffered."""
  return subprocess.Popen([jaxlm_script(), *args], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True, bufsize=1, cwd=REPO)


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
  """Exit code 2, no traceback, exactly one `jaxlm: error:` line containing `fragments`."""
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("jaxlm: error:")]
  assert len(errors) == 1, proc.stderr[-2000:]
  for fragment in fragments:
    assert fragment in errors[0], errors[0]
  return errors[0]


def random_model(base: dict, **overrides):
  """(model, params) for ModelConfig(**base, **overrides), with weights far from the init.

  GPT-2's init gives a random model nearly flat logits (greedy decoding repeats one token);
  adding N(0, 0.3) to every weight makes logits vary and positions matter visibly, which
  tests caches and position encodings far more thoroughly.
  """
  import flax.linen as nn

  from jaxlm import model as model_lib
  model = model_lib.make_model(model_lib.ModelConfig(**{**base, **overrides}))
  params = nn.unbox(model_lib.init_params(model, jax.random.key(0)))
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return model, jax.tree.unflatten(treedef, noisy)


def start_gcs_emulator(mp: pytest.MonkeyPatch, bucket: str):
  """Starts gcp-storage-emulator in this process (in memory, a free loopback port) with
  gs://`bucket`, and points gcsfs at it through `mp`; returns (server, url). Offline."""
  from gcp_storage_emulator.server import create_server
  logging.getLogger("gcp_storage_emulator").setLevel(logging.CRITICAL)  # 404s are expected.
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  server = create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
  server.start()
  url = f"http://127.0.0.1:{port}"
  mp.setenv("STORAGE_EMULATOR_HOST", url)  # gcsfs (etils.epath's gs:// backend).
  # gcsfs would otherwise ask the (absent) storage-control API for each bucket's layout.
  mp.setenv("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
  return server, url
