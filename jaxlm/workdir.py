"""Run directories, local or on Google Cloud Storage: one path type and the ways runs write files.

Every file a run keeps (config.json, tokenizer.json, metrics.jsonl, samples.txt, TensorBoard
events, checkpoints, sweep results) is reached through `path()`, an `etils.epath.Path` for a
local directory or a `gs://bucket/dir` URL. Object stores have no append and no rename, so:

- whole files (`write_text`) go to a temporary name and are renamed locally, so a reader never
  sees half a file; on GCS they are one object upload, which is atomic there;
- growing files (`Appender`: metrics.jsonl, samples.txt) are appended and flushed line by line
  locally (a kill -9 leaves every complete line); on GCS their lines are kept in memory and the
  whole object is uploaded again at each `flush()`, so the object is always a complete file and
  readers need nothing special;
- directories that another library writes (TensorBoard events) are written to a local temporary
  directory and copied up (`LocalMirror`).

The data token cache stays local: it is derived from the corpus, not part of the run.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import shutil
import socket
import tempfile

from etils import epath

from jaxlm.errors import JaxlmError


def cache_dir(name: str) -> str:
  """$XDG_CACHE_HOME/jaxlm/<name> (else ~/.cache/jaxlm/<name>): jaxlm's caches on this machine."""
  root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(root, "jaxlm", name)

Path = epath.Path
GCS_HOST = "storage.googleapis.com"
SCHEMES = ("gs",)  # URL schemes a workdir may use: tested end to end (orbax, gcsfs, tensorboard).


def is_remote(p: str | os.PathLike) -> bool:
  """True for a URL such as gs://bucket/dir, False for a local path."""
  return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
  """The path type of every workdir file: local, or gs:// (which needs gcsfs or TensorFlow)."""
  text = os.fspath(p)
  if not is_remote(text):
    return epath.Path(os.path.expanduser(text))
  scheme = text.split("://", 1)[0]
  if scheme not in SCHEMES:
    raise JaxlmError(f"unsupported URL {text!r}: paths are local or gs://bucket/dir")
  if not any(importlib.util.find_spec(m) for m in ("gcsfs", "tensorflow")):
    raise JaxlmError(f"{text} is on Google Cloud Storage, which needs gcsfs: "
                     "pip install 'jaxlm[gcs]'")
  if not text[len("gs://"):].split("/", 1)[0]:
    raise JaxlmError(f"{text!r} names no bucket: expected gs://bucket/dir")
  return epath.Path(text)


def absolute(p: str | os.PathLike) -> str:
  """A URL as it is; a local path made absolute (epath's absolute() would mangle a URL)."""
  text = os.fspath(p)
  return text if is_remote(text) else os.path.abspath(os.path.expanduser(text))


def prepare(workdir: str | os.PathLike) -> epath.Path:
  """Creates `workdir` unless it exists and checks it can be written; returns its path.

  A local path that is a file is refused. On GCS, where directories are only name prefixes,
  a small object is written and deleted, so a missing bucket or permission fails here, in one
  line, before anything compiles.
  """
  p = path(workdir)
  if not is_remote(p):
    if p.exists() and not p.is_dir():
      raise JaxlmError(f"workdir {os.fspath(workdir)!r} exists and is not a directory")
    try:
      os.makedirs(p, exist_ok=True)
    except OSError as e:
      raise JaxlmError(f"cannot create workdir {os.fspath(workdir)!r}: {e.strerror}") from None
    return p
  check_gcs_reachable(os.fspath(workdir))
  probe = p / f".jaxlm-write-probe-{socket.gethostname()}-{os.getpid()}"
  try:
    if p.is_file():
      raise JaxlmError(f"workdir {p} exists and is not a directory")
    probe.write_text("")
    probe.unlink()
  except JaxlmError:
    raise
  except Exception as e:  # noqa: BLE001  (gcsfs and google-auth raise many kinds)
    raise JaxlmError(f"cannot write to workdir {p}: {_first_line(e)}") from None
  return p


def check_gcs_reachable(url: str) -> None:
  """One line, in seconds, when GCS cannot be reached or no credentials are found: gcsfs
  itself retries for about a minute first, logging a traceback per try. An emulator
  (STORAGE_EMULATOR_HOST, as the tests use) is taken as reachable and needs no credentials."""
  if os.environ.get("STORAGE_EMULATOR_HOST"):
    return
  try:
    socket.getaddrinfo(GCS_HOST, 443)
  except OSError as e:
    raise JaxlmError(f"cannot reach Google Cloud Storage for {url} ({GCS_HOST}: "
                     f"{e.strerror or e}); check the network, or use a local workdir") from None
  try:
    import google.auth
    import google.auth.exceptions
  except ImportError:  # gcsfs brings google-auth; without it gcsfs fails in its own way.
    return
  try:
    google.auth.default()
  except google.auth.exceptions.DefaultCredentialsError as e:
    raise JaxlmError(f"no Google Cloud credentials for {url} ({_first_line(e)[:120]}); run "
                     "`gcloud auth application-default login` or set "
                     "GOOGLE_APPLICATION_CREDENTIALS") from None


def _first_line(e: BaseException) -> str:
  text = str(e).strip()
  return text.splitlines()[0] if text else type(e).__name__


def read_text(p: str | os.PathLike) -> str:
  return path(p).read_text(encoding="utf-8")


def write_text(p: str | os.PathLike, text: str) -> None:
  """Writes a whole file so that a reader sees the old content or the new, never half."""
  write_bytes(p, text.encode("utf-8"))


# A full disk, a quota, or a file-size limit (RLIMIT_FSIZE): no write there can succeed now.
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def naming(e: OSError, p: str | os.PathLike) -> OSError:
  """`e` with the path it failed on (a failed write() names none), for the one-line error."""
  return e if e.filename else OSError(e.errno, e.strerror, os.fspath(p))


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """write_text for bytes (PNG plots). Missing parent directories are created, as on GCS."""
  p = path(p)
  if is_remote(p):
    p.write_bytes(data)  # One object upload: atomic on GCS.
    return
  os.makedirs(p.parent, exist_ok=True)
  tmp = f"{p}.{os.getpid()}.tmp"  # Private to this process: several may write `p`.
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, p)
  except OSError as e:  # E.g. a full disk: `p` keeps its old content, and no .tmp is left.
    if os.path.exists(tmp):
      os.remove(tmp)
    raise naming(e, p) from None


class Appender:
  """A text file that grows by appends: metrics.jsonl, samples.txt.

  Local: an ordinary file opened for appending, flushed at every write, so what a kill -9
  leaves behind is every complete line. GCS has no append: the existing object is read once,
  new text is kept in memory, and `flush()` (and `close()`) upload the whole object again.
  """

  def __init__(self, p: str | os.PathLike):
    self.path = path(p)
    self.remote = is_remote(self.path)
    if self.remote:
      self._text = [self.path.read_text(encoding="utf-8")] if self.path.exists() else []
      self._dirty = False
    else:
      self._file = open(self.path, "a", encoding="utf-8")

  def write(self, text: str) -> None:
    if self.remote:
      self._text.append(text)
      self._dirty = True
    else:
      try:
        self._file.write(text)
        self._file.flush()
      except OSError as e:
        raise naming(e, self.path) from None

  def flush(self) -> None:
    """Makes everything written so far visible to readers (one upload on GCS)."""
    if self.remote and self._dirty:
      self.path.write_text("".join(self._text), encoding="utf-8")
      self._dirty = False

  def close(self) -> None:
    if self.remote:
      self.flush()
    else:
      self._file.close()

  def __enter__(self) -> Appender:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def append_text(p: str | os.PathLike, text: str) -> None:
  """Appends `text` to a file now (on GCS: rewrites the object with `text` at its end)."""
  with Appender(p) as f:
    f.write(text)


class LocalMirror:
  """A local directory for a library that only writes local files, copied up to `remote`.

  For a local `remote` the directory is `remote` itself and `sync` does nothing. Otherwise
  files are written to a temporary directory and `sync()` uploads each file that grew since
  the last upload (whole: GCS objects cannot be appended to); `close()` syncs and deletes it.
  """

  def __init__(self, remote: str | os.PathLike):
    self.remote = path(remote)
    if is_remote(self.remote):
      self.local = tempfile.mkdtemp(prefix="jaxlm-mirror-")
    else:
      self.local = os.fspath(self.remote)
      os.makedirs(self.local, exist_ok=True)
    self._uploaded: dict[str, int] = {}

  def sync(self) -> None:
    if not is_remote(self.remote):
      return
    for root, _, files in os.walk(self.local):
      for name in files:
        local = os.path.join(root, name)
        rel = os.path.relpath(local, self.local)
        size = os.path.getsize(local)
        if self._uploaded.get(rel) != size:
          with open(local, "rb") as f:
            (self.remote / rel).write_bytes(f.read())
          self._uploaded[rel] = size

  def close(self) -> None:
    if is_remote(self.remote):
      self.sync()
      shutil.rmtree(self.local, ignore_errors=True)
