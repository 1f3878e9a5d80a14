"""Run directories: creating them with a one-line error when that is impossible."""

from __future__ import annotations

import os

from jaxlm.errors import JaxlmError


def prepare(workdir: str) -> None:
  """Creates `workdir` (and parents) unless it exists; refuses a path that is a file."""
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise JaxlmError(f"workdir {workdir!r} exists and is not a directory")
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise JaxlmError(f"cannot create workdir {workdir!r}: {e.strerror}") from None
