"""Issue 23 item 16's remaining cases: a sweep file whose get_sweep() raises, a tokenizer JSON
that is not an object, and a gs:// workdir that cannot be reached or has no credentials: one
line each, in seconds, nothing written."""

import os
import time

import pytest
from conftest import CONFIGS, assert_one_line_error, run_jaxlm

from jaxlm import tokenizers
from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

SMOKE = os.path.join(CONFIGS, "smoke.py")


def test_a_get_sweep_that_raises_is_one_line_naming_the_file(tmp_path):
  sweep = tmp_path / "sweep.py"
  sweep.write_text(
      "import importlib.util\n"
      f"spec = importlib.util.spec_from_file_location('smoke', {SMOKE!r})\n"
      "smoke = importlib.util.module_from_spec(spec); spec.loader.exec_module(smoke)\n"
      "get_config = smoke.get_config\n"
      "def get_sweep():\n  raise ValueError('no trials today')\n")
  proc = run_jaxlm("sweep", "--config", str(sweep), "--workdir", str(tmp_path / "w"))
  assert_one_line_error(proc, str(sweep), "get_sweep() raised ValueError: no trials today")
  assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("text, why", [
    ("[1, 2, 3]", "not a JSON list"),
    ('"char"', "not a JSON str"),
    ('{"kind": "char"}', "is malformed (KeyError"),
])
def test_a_tokenizer_json_that_is_not_a_tokenizer_is_one_line(tmp_path, text, why):
  path = tmp_path / "tok.json"
  path.write_text(text)
  with pytest.raises(JaxlmError) as e:
    tokenizers.load(path)
  assert str(path) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)


def test_a_tokenizer_json_list_through_train_is_one_line(tmp_path):
  path = tmp_path / "tok.json"
  path.write_text("[1, 2, 3]")
  proc = run_jaxlm("train", "--config", os.path.join(CONFIGS, "smoke.py"), "--workdir",
                   str(tmp_path / "w"), f"--config.data.tokenizer={path}")
  assert_one_line_error(proc, "not a JSON list")


def test_an_unreachable_gcs_workdir_fails_in_seconds(monkeypatch):
  import socket
  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)

  def no_dns(*args, **kwargs):
    raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
  monkeypatch.setattr(socket, "getaddrinfo", no_dns)
  t0 = time.time()
  with pytest.raises(JaxlmError, match="cannot reach Google Cloud Storage for gs://b/run"):
    workdir_lib.prepare("gs://b/run")
  assert time.time() - t0 < 5


def test_a_gcs_workdir_without_credentials_is_one_line(monkeypatch):
  import socket

  import google.auth
  import google.auth.exceptions
  monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
  monkeypatch.setattr(socket, "getaddrinfo", lambda *a, **k: [("ok",)])

  def no_credentials(*args, **kwargs):
    raise google.auth.exceptions.DefaultCredentialsError("Your default credentials were not "
                                                         "found.\nTo set up ...")
  monkeypatch.setattr(google.auth, "default", no_credentials)
  with pytest.raises(JaxlmError) as e:
    workdir_lib.prepare("gs://b/run")
  assert "no Google Cloud credentials for gs://b/run" in str(e.value)
  assert "gcloud auth application-default login" in str(e.value) and "\n" not in str(e.value)
