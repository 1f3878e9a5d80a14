"""Opening corpus files as byte streams: local or gs://, plain or gzip / xz / zstd compressed.

Also the import of optional dependencies with a one-line install hint.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import lzma
import zlib
from collections.abc import Iterator
from typing import IO, Any

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

COMPRESSIONS = (".gz", ".xz", ".zst")  # Stripped before the kind is read from the extension.
DATA_EXTRA = "pip install 'jaxlm[data]'"


def compression(path: str) -> str:
  """The compression suffix of `path` (".gz", ".xz", ".zst"), or "" for none."""
  return next((c for c in COMPRESSIONS if path.endswith(c)), "")  # '' for none


def require(module: str, why: str, hint: str = DATA_EXTRA) -> Any:
  """Imports an optional dependency, or a one-line error saying why it is needed and how."""
  try:
    return importlib.import_module(module)
  except ImportError:
    raise JaxlmError(f"{why}; install {module.split('.')[0]}: {hint}") from None


@contextlib.contextmanager
def open_bytes(path: str) -> Iterator[IO[bytes]]:
  """A binary stream of the file's decompressed bytes (gzip, xz and zstd by suffix).

  Bytes, not text mode: pieces are cut by byte count and errors report byte offsets; the text
  is decoded by the readers, strictly, as UTF-8. What opening or reading raises (a missing
  file, a corrupt or truncated stream) becomes a one-line error naming the file.
  """
  suffix = compression(path)
  try:
    with contextlib.ExitStack() as stack:
      remote = workdir_lib.is_remote(path)
      raw = stack.enter_context(workdir_lib.path(path).open("rb") if remote else open(path, "rb"))
      if suffix == ".gz":
        raw = stack.enter_context(gzip.GzipFile(fileobj=raw, mode="rb"))
      elif suffix == ".xz":
        raw = stack.enter_context(lzma.LZMAFile(raw))
      elif suffix == ".zst":
        zstandard = require("zstandard", f"{path} is zstd-compressed")
        raw = stack.enter_context(io.BufferedReader(_ZstdReader(raw, zstandard), 1 << 16))
      yield raw
  except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:  # zstd errors are made OSError.
    if isinstance(e, OSError) and e.errno is not None:
      raise JaxlmError(f"cannot read {path}: {e.strerror}") from None
    what = f"{suffix[1:]} stream" if suffix else "file"
    raise JaxlmError(f"cannot read {path}: corrupt or truncated {what} "
                     f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None


class _ZstdReader(io.RawIOBase):
  """The frames of a zstd stream one after another, decompressed from 64 KiB of input at a time.

  Not zstandard's stream_reader, which ends a truncated stream without a word.
  """

  def __init__(self, raw: IO[bytes], zstandard: Any):
    self._raw, self._zstd, self._frame, self._out = raw, zstandard, None, memoryview(b"")

  def readable(self) -> bool:
    return True

  def readinto(self, b) -> int:
    while not self._out:
      data, out = self._raw.read(1 << 16), []
      if not data and self._frame is not None:
        raise OSError("the stream ends inside a frame")
      if not data:
        return 0
      while data:  # What follows the end of a frame is the next frame.
        if self._frame is None:
          self._frame = self._zstd.ZstdDecompressor().decompressobj()
        try:
          out.append(self._frame.decompress(data))
        except self._zstd.ZstdError as e:
          raise OSError(str(e)) from None
        data = self._frame.unused_data if self._frame.eof else b""
        self._frame = None if self._frame.eof else self._frame
      self._out = memoryview(b"".join(out))
    n = min(len(b), len(self._out))
    b[:n], self._out = self._out[:n], self._out[n:]
    return n
