"""One run per workdir: an exclusive lock file, `jaxlm.lock`, held while `jaxlm train` runs.

Two trainings writing one workdir corrupt each other (each deletes the other's checkpoints as
old, both append to metrics.jsonl). The lock file is created exclusively: with O_EXCL on a
local disk, and with an `ifGenerationMatch=0` upload on GCS (the object must not exist yet),
so of two starters exactly one wins. It holds the holder's host, pid and start time; a second
`jaxlm train` names them in its one-line error.

A lock left by a process that died (kill -9, a crash) is stale when it names this host and a
pid that is no longer alive; it is then taken over. Takeover moves the stale file to a private
name first (only one of several takers can), checks that what it moved is still the stale
lock it read, and creates a fresh one exclusively, so two takers never both hold the lock. A
lock from another host is never judged stale (its pid means nothing here): the error says to
delete the file once that run is known to be gone. In a multi-process run only process 0
takes the lock.
"""

from __future__ import annotations

import json
import os
import socket
import time

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

NAME = "jaxlm.lock"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, another user's.
    return True
  return True


def _gcs(path: str):
  """gcsfs and the object's bucket/key: the filesystem behind etils.epath's gs:// paths."""
  import gcsfs  # Present whenever a gs:// workdir passed workdir.path().
  return gcsfs.GCSFileSystem(), path[len("gs://"):]


class WorkdirLock:
  """`with WorkdirLock(workdir):` holds the workdir's lock, or raises JaxlmError naming the
  holder; released on every way out of the block (exceptions and handled signals too)."""

  def __init__(self, workdir: str | os.PathLike, enabled: bool = True):
    self.path = os.fspath(workdir_lib.path(workdir) / NAME)
    self.remote = workdir_lib.is_remote(self.path)
    self.enabled = enabled
    self.record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    self.held = False

  # --- The filesystem: create exclusively, read, delete. -------------------------------------
  def _create(self) -> bool:
    """True when this process created the lock file; False when one exists already."""
    data = json.dumps(self.record).encode()
    if self.remote:
      fs, key = _gcs(self.path)
      try:
        fs.pipe_file(key, data, mode="create")  # ifGenerationMatch=0: only if absent.
      except FileExistsError:
        return False
      return True
    try:
      fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      return False
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    return True

  def _read(self, path: str | None = None) -> dict | None:
    """The lock's record; None when it is gone; {} when it cannot be parsed (half-written)."""
    try:
      text = workdir_lib.read_text(path or self.path)
    except FileNotFoundError:
      return None
    try:
      record = json.loads(text)
    except ValueError:
      return {}
    return record if isinstance(record, dict) else {}

  def _take_over(self, stale: dict) -> None:
    """Removes the lock file if it still holds `stale` (see the module docstring)."""
    if self.remote:
      # GCS has no rename; a delete of the exact generation read only removes that object.
      fs, key = _gcs(self.path)
      try:
        generation = fs.info(key).get("generation")
        if self._read() == stale:
          fs.rm_file(f"{key}#{generation}" if generation and fs.version_aware else key)
      except FileNotFoundError:
        pass
      return
    private = f"{self.path}.stale.{os.getpid()}"
    try:
      os.rename(self.path, private)
    except FileNotFoundError:
      return  # Another taker moved it first.
    moved = self._read(private)
    if moved != stale:  # A fresh lock was created in between: put it back, keep ours out.
      try:
        os.link(private, self.path)
      except FileExistsError:
        pass
    os.unlink(private)

  # --- Acquire and release. ------------------------------------------------------------------
  def acquire(self) -> None:
    if not self.enabled:
      return
    workdir_lib.prepare(os.path.dirname(self.path))
    for _ in range(5):
      if self._create():
        self.held = True
        return
      holder = self._read()
      if holder is None:
        continue  # Released in between: try again.
      if (holder.get("host") == self.record["host"] and isinstance(holder.get("pid"), int)
          and not _alive(holder["pid"])):
        self._take_over(holder)
        continue
      raise JaxlmError(self._held_message(holder))
    raise JaxlmError(f"could not take the lock {self.path}: other processes keep taking it")

  def _held_message(self, holder: dict) -> str:
    if not holder:
      return (f"workdir {os.path.dirname(self.path)} is locked by {self.path}, which is being "
              "written or damaged; if no jaxlm train runs there, delete that file")
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder.get("started", 0)))
    here = holder.get("host") == self.record["host"]
    gone = "" if here else f"; if that run is gone (its host was lost), delete {self.path}"
    return (f"workdir {os.path.dirname(self.path)} is in use by another jaxlm train (pid "
            f"{holder.get('pid')} on host {holder.get('host')}{' (this one)' * here}, since "
            f"{since}): wait for it to finish, stop it, or use another workdir{gone}")

  def release(self) -> None:
    if not self.held:
      return
    self.held = False
    if self._read() != self.record:
      return  # Not ours any more (someone deleted it by hand and another run took it).
    try:
      workdir_lib.path(self.path).unlink()
    except FileNotFoundError:
      pass

  def __enter__(self) -> WorkdirLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
