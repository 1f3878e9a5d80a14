"""Thin wrapper over orbax's CheckpointManager: async, atomic saves of named pytrees plus JSON.

A checkpoint at step s is a directory `checkpoints/<s>/` holding one item per pytree (here
`params` and `opt_state`, plus `train_params` for a schedule-free optimizer, whose trained
iterate differs from the `params` it is evaluated with) and a `meta` JSON item (step, val
loss, config, tokenizer), so a checkpoint describes itself. Orbax writes each save into a
temporary directory and renames it only once complete, so an interrupted save is never
listed, never restored, and removed on the next start. Kept: the latest `keep` checkpoints
plus the best one by validation loss.

Damage after the fact (a truncated or deleted file, a step half-deleted by a killed garbage
collection from before it renamed first) is found cheaply on listing by `inspect` (the files
orbax's own metadata says a step has), and by orbax's errors on restore otherwise; a damaged
step is never listed, and `restore_good` falls back past it to the newest good one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging as py_logging
import math
import os
import re
import shutil
import sys
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers as ocp_policies

from jaxlm import workdir as workdir_lib
from jaxlm.errors import JaxlmError

PyTree = Any
META = "meta"
# Orbax's todelete_subdir: garbage collection renames a step in here (atomic) and this module
# empties it, so a kill -9 mid-deletion leaves a half-deleted directory no listing sees.
TRASH = "deleting"
DAMAGED = ".damaged"  # A damaged step set aside by a resumed run: `<step>.damaged`.


class DamagedCheckpoint(JaxlmError):
  """A step whose files are incomplete or unreadable; `why` names what is wrong."""

  def __init__(self, directory: Any, step: int, why: str):
    self.step, self.why = step, why
    super().__init__(f"checkpoint {directory}/{step} is damaged ({why})")


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
        cleanup_tmp_directories=not read_only,
        todelete_subdir=None if read_only else TRASH)
    # Naming every item's handler lets orbax read a checkpoint's metadata (shapes) before any
    # restore, which the shape check below relies on.
    registry = ocp.handlers.create_default_handler_registry(
        **{name: ocp.StandardCheckpointHandler() for name in items},
        **{META: ocp.JsonCheckpointHandler()})
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          handler_registry=registry)
    # Orbax clears old tmp dirs in a background thread; a command that fails right after (a
    # bad data path) would exit under it and print that thread's traceback. Waiting for it
    # costs a directory listing. (A private method: without it, orbax's own save waits.)
    settle = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
    if settle is not None:
      settle()
    self._read_only = read_only
    self._damage: dict[int, str | None] = {}  # step -> why it is damaged (None: intact).
    self._set_aside_done = read_only
    self._empty_trash()

  # --- Which steps exist ------------------------------------------------------------------------
  def all_steps(self) -> list[int]:
    """The steps whose checkpoints are complete (a damaged one is in `damaged()` instead)."""
    return sorted(s for s in self._manager.all_steps() if self._why_damaged(s) is None)

  def damaged(self) -> dict[int, str]:
    """{step: what is wrong} of the steps on disk that are incomplete or unreadable."""
    return {s: why for s in sorted(self._manager.all_steps())
            if (why := self._why_damaged(s)) is not None}

  def _why_damaged(self, step: int) -> str | None:
    if step not in self._damage:
      path = self.directory / str(step)
      # A step this process is still writing is in a tmp directory: orbax vouches for it.
      self._damage[step] = inspect(path) if path.exists() else None
    return self._damage[step]

  def _describe_steps(self) -> str:
    good = self.all_steps()
    return (f"good steps: {', '.join(map(str, good))}" if good else
            "no good checkpoint is left; train again in a new workdir")

  def latest_step(self) -> int | None:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def best_step(self) -> int | None:
    """The step with the lowest finite validation loss (None if no checkpoint has one)."""
    scored = []
    for s in self.all_steps():
      try:
        scored.append((self.meta(s).get("val_loss"), s))
      except DamagedCheckpoint:
        continue  # Unreadable: not a candidate (resolve_step names it).
    # A NaN or infinite loss (saved by an older jaxlm, which kept diverged states) is no best.
    scored = [(v, s) for v, s in scored if v is not None and math.isfinite(v)]
    return min(scored)[1] if scored else None

  def resolve_step(self, step: int | str | None) -> int:
    """None/'latest' -> latest step, 'best' -> best step, int -> that step (checked)."""
    steps, damaged = self.all_steps(), self.damaged()
    if isinstance(step, int) or (isinstance(step, str) and step.isdigit()):
      if int(step) in damaged:
        raise JaxlmError(f"{DamagedCheckpoint(self.directory, int(step), damaged[int(step)])}; "
                         f"{self._describe_steps()}")
    if not steps:
      if damaged:
        raise JaxlmError(f"every checkpoint in {self.directory} is damaged: " + "; ".join(
            f"step {s} ({why})" for s, why in damaged.items()) + "; train again in a new workdir")
      raise JaxlmError(f"no checkpoint in {self.directory}")
    skipped = [s for s in damaged if s > steps[-1] or step == "best"]
    if skipped and step in (None, "latest", "best"):
      logging.warning("checkpoint %s/%d is damaged (%s); skipping it for the newest good %s",
                      self.directory, skipped[-1], damaged[skipped[-1]],
                      "step by validation loss" if step == "best" else f"step, {steps[-1]}")
    if step is None or step == "latest":
      return steps[-1]
    if step == "best":
      best = self.best_step()
      if best is None:
        raise JaxlmError(f"no {'good ' if damaged else ''}checkpoint in {self.directory} has a "
                         "finite validation loss" + (f" (step {skipped[-1]} is damaged: "
                         f"{damaged[skipped[-1]]}); {self._describe_steps()}" if damaged else ""))
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
    self._set_aside_damaged()
    self._empty_trash()
    self._damage[int(step)] = None
    with _disk_full_as_oserror():  # It waits for the previous save, which may have failed.
      self._manager.save(int(step), args=ocp.args.Composite(**args), metrics=metrics,
                         force=True)

  def meta(self, step: int) -> dict[str, Any]:
    self._check_intact(step)
    out = self._orbax(step, lambda: self._manager.restore(int(step), args=ocp.args.Composite(
        **{META: ocp.args.JsonRestore()})))
    return dict(out[META])

  def restore_good(self, step: int | str | None, targets: Mapping[str, PyTree]
                   ) -> tuple[dict[str, Any], int]:
    """(restore's result, its step) for `step` as resolve_step takes it; for latest or best,
    a step found damaged on restore is skipped, with a warning, for the next good one."""
    while True:
      resolved = self.resolve_step(step)
      try:
        return self.restore(resolved, targets), resolved
      except DamagedCheckpoint as e:
        if step not in (None, "latest", "best"):
          raise JaxlmError(f"{e}; {self._describe_steps()}") from None
        # Marked damaged now: resolve_step warns, naming it and the step it falls back to.

  def restore(self, step: int, targets: Mapping[str, PyTree]) -> dict[str, Any]:
    """Restores the named items into `targets` (abstract arrays that carry shardings).

    Shapes are checked first, so a checkpoint from another model is a clear error rather than
    an orbax traceback; the restored arrays land with the targets' shardings, whatever mesh
    or device count wrote them.
    """
    self._check_intact(step)
    for name, target in targets.items():
      self._check_shapes(step, name, target)
    args = {name: ocp.args.StandardRestore(t) for name, t in targets.items()}
    args[META] = ocp.args.JsonRestore()
    out = self._orbax(step, lambda: self._manager.restore(int(step),
                                                          args=ocp.args.Composite(**args)))
    return {name: out[name] for name in [*targets, META]}

  def _check_intact(self, step: int) -> None:
    why = self._why_damaged(int(step))
    if why is not None:
      raise DamagedCheckpoint(self.directory, int(step), why)

  def _orbax(self, step: int, fn: Any) -> Any:
    """fn() (an orbax read of `step`); its errors mean a damaged checkpoint (shapes and
    missing items were checked before): recorded, and raised as DamagedCheckpoint."""
    quiet_pending_io()  # Before the read: its failed siblings report while it unwinds.
    try:
      return fn()
    except JaxlmError:
      raise
    except Exception as e:  # noqa: BLE001  (tensorstore raises bare Exceptions)
      # Tensorstore's first line names the array read; its "full details" are a repr dump.
      first = (str(e).strip().splitlines() or [""])[0].split(" See full TensorStore")[0]
      why = f"{type(e).__name__} on reading it: {first[:160]}"
      self._damage[int(step)] = why
      raise DamagedCheckpoint(self.directory, int(step), why) from None

  def _check_shapes(self, step: int, name: str, target: PyTree) -> None:
    mismatch = self.shape_mismatch(step, name, target)
    if mismatch:
      raise JaxlmError(mismatch)

  def shape_mismatch(self, step: int, name: str, target: PyTree) -> str | None:
    """How item `name` of `step` differs from `target`'s tree and shapes; None if it fits."""
    self._check_intact(step)
    stored = self._orbax(step, lambda: self._manager.item_metadata(int(step)))
    if name not in stored or stored[name] is None:
      raise DamagedCheckpoint(self.directory, step, f"it has no {name}")
    stored = stored[name]
    stored_leaves = dict((_path_str(p), getattr(m, "shape", None)) for p, m in
                         jax.tree_util.tree_flatten_with_path(stored)[0])
    target_leaves = dict((_path_str(p), tuple(t.shape)) for p, t in
                         jax.tree_util.tree_flatten_with_path(target)[0])
    missing = sorted(set(target_leaves) - set(stored_leaves))
    extra = sorted(set(stored_leaves) - set(target_leaves))
    if missing or extra:
      return (
          f"checkpoint {self.directory}/{step} does not match this model's {name}: "
          + (f"missing {', '.join(missing[:5])}" if missing else "")
          + ("; " if missing and extra else "")
          + (f"unexpected {', '.join(extra[:5])}" if extra else ""))
    for path, shape in target_leaves.items():
      if stored_leaves[path] is not None and tuple(stored_leaves[path]) != shape:
        return (f"checkpoint {self.directory}/{step} was saved from a model of another shape: "
                f"{name} {path} is {tuple(stored_leaves[path])} there but {shape} here")
    return None

  def wait(self) -> None:
    with _disk_full_as_oserror():
      self._manager.wait_until_finished()
    self._empty_trash()

  def close(self) -> None:
    self._manager.close()
    self._empty_trash()

  # --- Housekeeping (write mode only) -----------------------------------------------------------
  def _empty_trash(self) -> None:
    """Deletes the steps garbage collection renamed into TRASH (listed by nothing)."""
    trash = self.directory / TRASH
    if self._read_only or not trash.is_dir():
      return
    for entry in trash.iterdir():  # Only what is there now: orbax may rename more in.
      if workdir_lib.is_remote(self.directory):
        entry.rmtree()
      else:
        shutil.rmtree(os.fspath(entry), ignore_errors=True)

  def _set_aside_damaged(self) -> None:
    """Before a run's first save: renames each damaged step to `<step>.damaged` (kept for a
    look, never listed) so a re-save of its step and garbage collection do not meet it."""
    if self._set_aside_done:
      return
    self._set_aside_done = True
    damaged = self.damaged()
    for step, why in damaged.items():
      dest, n = self.directory / f"{step}{DAMAGED}", 1
      while dest.exists():
        dest, n = self.directory / f"{step}{DAMAGED}.{n}", n + 1
      (self.directory / str(step)).rename(dest)
      logging.warning("set aside damaged checkpoint %s/%d (%s) as %s", self.directory, step,
                      why, dest.name)
      del self._damage[step]
    if damaged:
      self._manager.reload()


def quiet_pending_io() -> None:
  """When one read of a damaged checkpoint (or one write of a save to a full disk) fails, the
  others still in flight fail too,
  after orbax's event loop is gone: tensorstore reports each as an unraisable exception
  ("Event loop is closed") or an asyncio "never retrieved" log, tracebacks on stderr. The
  failed restore itself is named in one line, so only those reports are dropped (installed
  once, before the first read); any other exception still shows."""
  def noise(exc: BaseException | None) -> bool:
    text = str(exc)
    return "TensorStore" in text or "OCDBT" in text or text == "Event loop is closed"

  if getattr(sys.unraisablehook, "jaxlm_quiet", False):
    return
  unraisable, excepthook = sys.unraisablehook, sys.excepthook

  def quiet_unraisable(u):
    if not noise(u.exc_value):
      unraisable(u)

  def quiet_excepthook(kind, value, tb):
    if not noise(value):
      excepthook(kind, value, tb)

  quiet_unraisable.jaxlm_quiet = True
  sys.unraisablehook, sys.excepthook = quiet_unraisable, quiet_excepthook
  py_logging.getLogger("asyncio").addFilter(
      lambda r: not (r.exc_info and noise(r.exc_info[1])) and "never retrieved" not in
      r.getMessage())


def inspect(step_dir: epath.Path) -> str | None:
  """What is missing from the checkpoint in `step_dir`, by the items and files orbax's own
  metadata says it has; None when nothing is. Cheap: a few listings, no array is read."""
  try:
    handlers = json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
  except FileNotFoundError:
    return "its _CHECKPOINT_METADATA is missing"
  except (ValueError, KeyError, TypeError, OSError):
    return "its _CHECKPOINT_METADATA is unreadable"
  for name, handler in sorted((handlers or {}).items()):
    item = step_dir / name
    if not item.is_dir():
      return f"its {name} directory is missing"
    if "Json" in str(handler):
      try:
        json.loads((item / "metadata").read_text())
      except (OSError, ValueError):
        return f"its {name}/metadata is missing or unreadable"
      continue
    if not (item / "_METADATA").exists():
      return f"its {name}/_METADATA is missing"
    if not (item / "manifest.ocdbt").exists():
      continue  # Not OCDBT: the arrays' own files are checked on restore.
    # The item's own d/ holds the merged b-tree (small arrays inline), each process' d/ the
    # data it wrote; a manifest, a d/ without files or an empty file gone means damage.
    shards = [p for p in item.iterdir() if p.name.startswith("ocdbt.process_")]
    if not shards:
      return f"{name} has no ocdbt.process_* array directory"
    for shard in shards:
      if not (shard / "manifest.ocdbt").exists():
        return f"its {name}/{shard.name}/manifest.ocdbt is missing"
    for data in [item / "d"] + [shard / "d" for shard in shards]:
      files = list(data.iterdir()) if data.is_dir() else []
      where = os.path.relpath(os.fspath(data), os.fspath(step_dir))
      if not files:
        return f"its {where} holds no array data"
      empty = [f.name for f in files if f.stat().length == 0]
      if empty:
        return f"its {where}/{empty[0]} is empty"
  return None


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
