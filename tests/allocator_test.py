"""host_allocator: which malloc a value means, and the one restart that preloads it."""

import ctypes.util
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import CONFIGS, assert_one_line_error, run_jaxlm

from jaxlm import phases
from jaxlm.errors import JaxlmError
from jaxlm.host import allocator


def test_values_resolve_to_a_library_or_the_system_malloc(tmp_path):
  assert allocator.resolve("system") is None
  assert allocator.resolve("") is None
  installed = {name: any(ctypes.util.find_library(lib) for lib in libs)
               for name, (libs, _) in allocator.KNOWN.items()}
  for name, present in installed.items():
    if present:
      got, lib = allocator.resolve(name)
      assert got == name and lib in [ctypes.util.find_library(x) for x in allocator.KNOWN[name][0]]
    else:
      with pytest.raises(JaxlmError, match="is not installed"):
        allocator.resolve(name)
  # auto: the first installed one, in KNOWN's order (tcmalloc first), else the system's.
  first = next((name for name, present in installed.items() if present), None)
  auto = allocator.resolve("auto")
  assert (auto[0] if auto else None) == first
  lib = tmp_path / "libfoo.so"
  lib.write_bytes(b"")
  assert allocator.resolve(str(lib)) == ("libfoo.so", str(lib))
  with pytest.raises(JaxlmError, match="no such file"):
    allocator.resolve(str(tmp_path / "missing.so"))
  with pytest.raises(JaxlmError, match="not a file"):
    allocator.resolve(str(tmp_path))
  with pytest.raises(JaxlmError, match="expected auto, system, tcmalloc, jemalloc"):
    allocator.resolve("glibc")


def test_ensure_restarts_the_same_command_with_the_library_preloaded(monkeypatch):
  calls = []
  monkeypatch.setattr(allocator, "resolve", lambda value: ("jemalloc", "libjemalloc.so.2"))
  monkeypatch.setattr(allocator, "loaded", lambda: "system")
  monkeypatch.setattr(os, "execve", lambda *args: calls.append(args))
  monkeypatch.setenv("LD_PRELOAD", "libother.so")
  monkeypatch.delenv("MALLOC_CONF", raising=False)
  monkeypatch.delenv("JAXLM_HOST_ALLOCATOR", raising=False)
  allocator.ensure("auto")
  [(path, argv, env)] = calls
  assert path == sys.executable and argv == [sys.executable, *sys.orig_argv[1:]]
  assert env["LD_PRELOAD"] == "libjemalloc.so.2 libother.so"  # The user's preload is kept.
  assert env["MALLOC_CONF"] == "dirty_decay_ms:-1,muzzy_decay_ms:-1"
  assert env["JAXLM_HOST_ALLOCATOR"] == "libjemalloc.so.2"
  # The restarted run's clock starts where this process' did.
  assert env[phases.STARTED_ENV] == f"{os.getpid()}:{phases.process_start()!r}"
  # A MALLOC_CONF of the user's wins; a process that was restarted already never restarts.
  monkeypatch.setenv("MALLOC_CONF", "narenas:2")
  allocator.ensure("auto")
  assert calls[1][2]["MALLOC_CONF"] == "narenas:2"
  monkeypatch.setenv("JAXLM_HOST_ALLOCATOR", "libjemalloc.so.2")
  allocator.ensure("auto")
  assert len(calls) == 2
  # Nothing to do: the system malloc asked for, or some malloc loaded already.
  monkeypatch.delenv("JAXLM_HOST_ALLOCATOR")
  monkeypatch.setattr(allocator, "loaded", lambda: "/usr/lib/libtcmalloc_minimal.so.4")
  allocator.ensure("auto")
  assert len(calls) == 2


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is Linux's")
def test_bench_restarts_with_the_library_and_reports_it(tmp_path):
  # A shared library of our own, so the test sees the restart whatever malloc is installed.
  cc = shutil.which("cc") or shutil.which("gcc")
  assert cc, "a C compiler is needed to build the test library"
  (tmp_path / "m.c").write_text("int jaxlm_allocator_test(void) { return 42; }\n")
  lib = tmp_path / "libjaxlmtest.so"
  subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(tmp_path / "m.c")], check=True)
  out = tmp_path / "bench.json"
  proc = run_jaxlm("bench", "--config", os.path.join(CONFIGS, "smoke.py"), "--steps", "2",
                   "--nosampling", "--json_out", str(out), f"--config.host_allocator={lib}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"restarting with {lib} preloaded" in proc.stderr
  assert json.loads(out.read_text())["host_allocator"] == str(lib)
  assert f"malloc: {lib}" in proc.stdout


def test_a_library_that_does_not_load_warns_once_and_runs(tmp_path):
  bad = tmp_path / "libnotelf.so"
  bad.write_text("not a shared library\n")
  out = tmp_path / "bench.json"
  proc = run_jaxlm("bench", "--config", os.path.join(CONFIGS, "smoke.py"), "--steps", "2",
                   "--nosampling", "--json_out", str(out), f"--config.host_allocator={bad}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count("restarting with") == 1  # No restart loop.
  assert f"{bad} did not load; running with the system malloc" in proc.stderr
  assert json.loads(out.read_text())["host_allocator"] != str(bad)


def test_bad_host_allocator_is_one_line(tmp_path):
  proc = run_jaxlm("train", "--config", os.path.join(CONFIGS, "smoke.py"), "--workdir",
                   str(tmp_path / "run"), "--config.host_allocator=glibc")
  assert_one_line_error(proc, "host_allocator='glibc'", "expected auto, system")
  assert not (tmp_path / "run").exists()  # Nothing made before the error.
