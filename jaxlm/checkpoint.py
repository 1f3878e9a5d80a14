"""Thin wrapper over orbax's CheckpointManager: async, atomic saves of named pytrees plus JSON.

A checkpoint at step s is a directory `checkpoints/<s>/` holding one item per pytree (here
`params` and `opt_state`, plus `train_params` for a schedule-free optimizer, whose trained
iterate differs from the `params` it is evaluated with) and a `meta` JSON item (step, val
loss, config, tokenizer), so a checkpoint describes itself. Orbax writes each save into a
temporary directory and renames it only once complete, so an interrupted save is never
listed, never restored, and removed on the next start. Kept: the latest `keep` checkpoints
plus the best one by validation loss.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

PyTree = Any
META = "meta"


def _path_str(path: tuple[Any, ...]) -> str:
  return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


class Checkpointer:
  """Saves and restores `{name: pytree}` items plus a JSON `meta` dict at integer steps."""

  def __init__(self, directory: str | os.PathLike, *,
               items: tuple[str, ...] = ("params", "opt_state", "train_params"),
               keep: int = 3,
               keep_best: bool = True, read_only: bool = False):
    # A local path or gs:// URL; orbax writes arrays to gs:// through tensorstore's GCS driver
    # and, there, marks a finished save with a commit file instead of renaming its directory.
    self.directory = workdir_lib.path(workdir_lib.absolute(directory))
    if not workdir_lib.is_remote(self.directory):
      _check_access(os.fspath(self.directory), write=not read_only)
    policies = [ocp_policies.LatestN(n=max(keep, 1))]
    if keep_best:
      # BestN keeps the last n after sorting; reverse=True sorts descending, so it keeps the
      # lowest validation loss. A NaN would sort anywhere (every comparison with it is
      # false) and could displace the best, so a non-finite loss counts as the worst.
      policies.append(ocp_policies.BestN(get_metric_fn=lambda m: _finite_or_inf(m["val_loss"]),
                                         reverse=True, n=1,
                                         keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp_policies.AnyPreservationPolicy(policies),
        enable_async_checkpointing=True, create=not read_only, read_only=read_only,
        cleanup_tmp_directories=not read_only)
    # Naming every item's handler lets orbax read a checkpoint's metadata (shapes) before any
    # restore, which the shape check below relies on.
    registry = ocp.handlers.create_default_handler_registry(
        **{name: ocp.StandardCheckpointHandler() for name in items},
        **{META: ocp.JsonCheckpointHandler()})
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)

  # --- Which steps exist ------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The step with the lowest finite validation loss (None if no checkpoint has one)."""
    scored = [(self.meta(s).get("val_loss"), s) for s in self.all_steps()]
    # A NaN or infinite loss (saved by an older jaxlm, which kept diverged states) is no best.
    scored = [(v, s) for v, s in scored if v is not None and math.isfinite(v)]
    return min(scored)[1] if scored else None

  def resolve_step(self, step: int | str | None) -> int:
    """None/'latest' -> latest step, 'best' -> best step, int -> that step (checked)."""
    steps = self.all_steps()
    if not steps:
      raise JaxlmError(f"no checkpoint in {self.directory}")
    if step is None or step == "latest":
      return steps[-1]
    if step == "best":
      best = self.best_step()
      if best is None:
        raise JaxlmError(f"no checkpoint in {self.directory} has a finite validation loss")
      return best
    if int(step) not in steps:
      raise JaxlmError(f"no checkpoint at step {step} in {self.directory}; available steps: "
                       f"{', '.join(map(str, steps))}")
    return int(step)

  # --- Save and restore -------------------------------------------------------------------------
  def save(self, step: int, items: Mapping[str, PyTree], meta: Mapping[str, Any], *,
           val_loss: float | None = None) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices."""
    args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
    args[META] = ocp.args.JsonSave({**meta, "step": int(step), "val_loss": val_loss})
    metrics = {"val_loss": float(val_loss)} if val_loss is not None else None
    with _disk_full_as_oserror():  # It waits for the previous save, which may have failed.
      self._manager.save(int(step), args=ocp.args.Composite(**args), metrics=metrics,
                         force=True)

  def meta(self, step: int) -> dict[str, Any]:
    out = self._manager.restore(int(step), args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()}))
    return dict(out[META])

  def restore(self, step: int, targets: Mapping[str, PyTree]) -> dict[str, Any]:
    """Restores the named items into `targets` (abstract arrays that carry shardings).

    Shapes are checked first, so a checkpoint from another model is a clear error rather than
    an orbax traceback; the restored arrays land with the targets' shardings, whatever mesh
    or device count wrote them.
    """
    for name, target in targets.items():
      self._check_shapes(step, name, target)
    args = {name: ocp.args.StandardRestore(t) for name, t in targets.items()}
    args[META] = ocp.args.JsonRestore()
    out = self._manager.restore(int(step), args=ocp.args.Composite(**args))
    return {name: out[name] for name in [*targets, META]}

  def _check_shapes(self, step: int, name: str, target: PyTree) -> None:
    stored = self._manager.item_metadata(int(step))[name]
    stored_leaves = dict((_path_str(p), getattr(m, "shape", None)) for p, m in
                         jax.tree_util.tree_flatten_with_path(stored)[0])
    target_leaves = dict((_path_str(p), tuple(t.shape)) for p, t in
                         jax.tree_util.tree_flatten_with_path(target)[0])
    missing = sorted(set(target_leaves) - set(stored_leaves))
    extra = sorted(set(stored_leaves) - set(target_leaves))
    if missing or extra:
      raise JaxlmError(
          f"checkpoint {self.directory}/{step} does not match this model's {name}: "
          + (f"missing {', '.join(missing[:5])}" if missing else "")
          + ("; " if missing and extra else "")
          + (f"unexpected {', '.join(extra[:5])}" if extra else ""))
    for path, shape in target_leaves.items():
      if stored_leaves[path] is not None and tuple(stored_leaves[path]) != shape:
        raise JaxlmError(
            f"checkpoint {self.directory}/{step} was saved from a model of another shape: "
            f"{name} {path} is {tuple(stored_leaves[path])} there but {shape} here")

  def wait(self) -> None:
    with _disk_full_as_oserror():
      self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


@contextlib.contextmanager
def _disk_full_as_oserror():
  """Orbax's background writes report a full disk as tensorstore's RESOURCE_EXHAUSTED (a
  ValueError, raised by the next save or wait); it becomes the OSError(ENOSPC) naming the
  file that a full disk gives every other write, so the run ends with one line."""
  try:
    yield
  except (ValueError, RuntimeError) as e:
    text = str(e)
    full = "RESOURCE_EXHAUSTED" in text or "No space left" in text or "File too large" in text
    if not full:
      raise
    named = re.search(r'local file "([^"]+)"', text)
    raise OSError(errno.ENOSPC, "No space left on device",
                  named.group(1) if named else "the checkpoint directory") from None


def _finite_or_inf(x: float) -> float:
  return x if math.isfinite(x) else math.inf


def _check_access(directory: str, *, write: bool) -> None:
  """Fails early, in one line, on a checkpoint directory that cannot be read or written."""
  if not os.path.exists(directory):
    return
  if not os.path.isdir(directory):
    raise JaxlmError(f"checkpoint directory {directory} is not a directory")
  try:
    os.listdir(directory)
  except OSError as e:
    raise JaxlmError(f"checkpoint directory {directory} is not readable: {e.strerror}") from None
  if write:
    # Probe by writing: permission bits alone say nothing on a read-only mount or for root.
    probe = os.path.join(directory, f".jaxlm-write-probe-{os.getpid()}")
    try:
      with open(probe, "w"):
        pass
      os.remove(probe)
    except OSError as e:
      raise JaxlmError(f"checkpoint directory {directory} is not writable ({e.strerror}); "
                       "training needs to write checkpoints there") from None
