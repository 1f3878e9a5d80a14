"""Starts N jaxlm processes on this machine as one multi-process JAX cluster (loopback).

For trying multi-host code paths on a laptop (N processes x M fake CPU devices), or for N
GPUs in one box. Each child gets the coordinator address, the process count and its id as
config overrides; its log lines are relayed with a `[i]` prefix. When a peer dies or never
arrives, JAX aborts the others after the init or heartbeat timeout (exit 134); the launcher
says so in one line and stops every remaining child.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import logging

from jaxlm.errors import JaxlmError

ABORTED = 134  # 128 + SIGABRT: what JAX's coordination service does to orphaned peers.


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _relay(i: int, stream, out) -> None:
  for line in stream:
    out.write(f"[{i}] {line}")
    out.flush()


def launch_local(argv: list[str], *, num_processes: int, devices_per_process: int = 0,
                 timeout: float = 0, init_timeout: int = 300, heartbeat_timeout: int = 100,
                 coordinator: str = "", process_ids: list[int] | None = None) -> int:
  """Runs `jaxlm ARGV` as `num_processes` processes; returns the first non-zero exit code.

  `process_ids` starts only some of them here (the rest run on other machines, all given the
  same `coordinator` host:port, the one of process 0).
  """
  if num_processes < 1:
    raise JaxlmError(f"--num_processes must be >= 1, got {num_processes}")
  if not argv:
    raise JaxlmError("nothing to launch: give a jaxlm command after --, e.g. "
                     "jaxlm launch --num_processes 2 -- train --config C --workdir W")
  ids = list(range(num_processes)) if process_ids is None else sorted(set(process_ids))
  if not ids or not all(0 <= i < num_processes for i in ids):
    raise JaxlmError(f"--process_ids must be between 0 and {num_processes - 1}, got {ids}")
  if len(ids) < num_processes and not coordinator:
    raise JaxlmError("starting only some processes here needs --coordinator host:port, the "
                     "address of process 0 that every machine can reach")
  address = coordinator or f"127.0.0.1:{free_port()}"
  children = []
  for i in ids:
    env = dict(os.environ)
    if devices_per_process:
      env["JAX_PLATFORMS"] = env.get("JAX_PLATFORMS") or "cpu"
      flags = [f for f in env.get("XLA_FLAGS", "").split()
               if not f.startswith("--xla_force_host_platform_device_count")]
      env["XLA_FLAGS"] = " ".join(
          flags + [f"--xla_force_host_platform_device_count={devices_per_process}"])
    cmd = [sys.executable, "-m", "jaxlm.cli", *argv,
           f"--config.distributed.coordinator_address={address}",
           f"--config.distributed.num_processes={num_processes}",
           f"--config.distributed.process_id={i}",
           f"--config.distributed.init_timeout={init_timeout}",
           f"--config.distributed.heartbeat_timeout={heartbeat_timeout}"]
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True, bufsize=1)
    threading.Thread(target=_relay, args=(i, child.stdout, sys.stderr), daemon=True).start()
    children.append(child)
  logging.info("launched %d processes, coordinator %s", num_processes, address)

  deadline = time.time() + timeout if timeout else None
  first_failure = 0
  try:
    while any(c.poll() is None for c in children):
      for i, c in zip(ids, children, strict=True):
        if c.poll() not in (None, 0) and not first_failure:
          first_failure = c.returncode
          _explain(i, c.returncode, init_timeout, heartbeat_timeout)
          _stop(children)
      if deadline and time.time() > deadline:
        sys.stderr.write(f"jaxlm: error: launch timed out after {timeout:.0f}s; stopping all "
                         "processes\n")
        _stop(children)
        return 124
      time.sleep(0.1)
  except KeyboardInterrupt:
    _stop(children)
    raise
  for i, c in zip(ids, children, strict=True):
    if c.returncode and not first_failure:
      first_failure = c.returncode
      _explain(i, c.returncode, init_timeout, heartbeat_timeout)
  # A child killed by signal N reports -N; as an exit code of our own that is 128 + N.
  return 128 - first_failure if first_failure < 0 else first_failure


def _explain(i: int, code: int, init_timeout: int, heartbeat_timeout: int) -> None:
  if code in (ABORTED, -signal.SIGABRT):
    why = (f"process {i} aborted (exit {code}): a peer never joined within "
           f"distributed.init_timeout={init_timeout}s or stopped answering for "
           f"distributed.heartbeat_timeout={heartbeat_timeout}s")
  else:
    why = f"process {i} exited with code {code}"
  sys.stderr.write(f"jaxlm: error: {why}; stopping the other processes\n")


def _stop(children: list[subprocess.Popen], grace: float = 10.0) -> None:
  for c in children:
    if c.poll() is None:
      c.terminate()
  end = time.time() + grace
  for c in children:
    try:
      c.wait(timeout=max(0.1, end - time.time()))
    except subprocess.TimeoutExpired:
      c.kill()
