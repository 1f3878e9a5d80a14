"""Throughput arithmetic (FLOPs, MFU, peak) and the process-0 metrics writer."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm import devices, wandb_sink
from jaxlm import model as model_lib
from jaxlm import workdir as workdir_lib
from jaxlm.host import xla
from jaxlm.matmul_peak import measure_matmul_flops

# In a gs:// workdir, metrics.jsonl and TensorBoard events are uploaded (whole) at most this
# often; a run killed without a chance to close loses at most this many seconds of records.
REMOTE_FLUSH_SEC = 30.0

def attended_keys(n_layer: int, seq_len: int, windows: tuple[int, ...] = ()) -> int:
  """Keys the attention term counts per query, summed over the layers: seq_len per layer, or
  min(W, seq_len) for a layer with sliding window W (`windows` as
  ModelConfig.layer_windows: one per layer, 0 = full; empty = every layer full).

  The 12·n_layer·d_model·seq_len rule counts every query at the full context (what the last
  query of a causal layer sees, not the causal average); a windowed layer's last query sees
  min(W, seq_len) keys, so the same convention gives it that length.
  """
  if not windows:
    return n_layer * seq_len
  return sum(min(w, seq_len) if w else seq_len for w in windows)


def flops_per_token(n_params: int, n_layer: int, d_model: int, seq_len: int,
                    windows: tuple[int, ...] = ()) -> float:
  """Training FLOPs per token, forward + backward: 6·N + 12·n_layer·d_model·seq_len.

  N counts the parameters that take part in matmuls (all but position embeddings; a tied
  embedding once, since it is the output head's matmul). The second term is the attention
  score and value matmuls over the full context (Kaplan et al. 2020; PaLM appendix B), the
  same convention as nanoGPT's estimate_mfu. With sliding windows, n_layer·seq_len becomes
  `attended_keys` (each layer's effective attended length).
  """
  return 6.0 * n_params + 12.0 * d_model * attended_keys(n_layer, seq_len, windows)


_measured_peak: dict[tuple[str, str], float] = {}


def peak_flops_per_device(device: jax.Device | None = None, dtype: str = "float32", *,
                          remeasure: bool = False) -> float:
  """Peak FLOP/s of one device: jaxlm.devices' table, else a matmul microbenchmark.

  When jaxlm changed XLA's flags for this run (jaxlm.host.xla), the matmul is also timed in a
  child process with XLA's own flags, and the faster of the two is the peak: the flags may
  make the model faster and a plain matmul slower, and MFU must not gain from that.

  A measured peak is kept per machine (see `peak_cache_key`) in the jaxlm cache directory, so
  only a machine's first run pays for the measurement (a second process, when flags changed);
  `remeasure` (jaxlm bench) measures again and keeps the faster of the two readings.
  """
  device = device or jax.devices()[0]
  kind = getattr(device, "device_kind", "") or ""
  if (known := devices.for_device_kind(kind)) is not None:
    return known.peak(dtype)
  key = (kind, dtype)
  if key in _measured_peak and not remeasure:
    return _measured_peak[key]
  cache_key = peak_cache_key(device, dtype)
  cached = _read_peak_cache().get(cache_key, 0.0)
  if cached and not remeasure:
    _measured_peak[key] = cached
    return cached
  peak = measure_matmul_flops(device, dtype)
  env = xla.original_env()
  if env is not None and device.platform == "cpu":
    peak = max(peak, _measure_matmul_flops_in_child(env, dtype))
  _measured_peak[key] = max(peak, cached)
  _write_peak_cache(cache_key, _measured_peak[key])
  return _measured_peak[key]


def peak_cache_path() -> str:
  return workdir_lib.cache_dir("peak_flops.json")


def peak_cache_key(device: jax.Device, dtype: str) -> str:
  """What a measured peak depends on: the processor, the cores this process may use, jax and
  jaxlib, XLA's flags (as jaxlm set them) and the dtype. A change in any measures anew."""
  model = ""
  if device.platform == "cpu":
    try:
      with open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), "")
    except OSError:
      pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = f"{model} x{cores}"
  return " | ".join([device.platform, device.device_kind, model, f"jax {jax.__version__}",
                     f"jaxlib {jax.lib.__version__}", os.environ.get("XLA_FLAGS", ""), dtype])


def _read_peak_cache() -> dict[str, float]:
  try:
    with open(peak_cache_path()) as f:
      table = json.load(f)
    return {k: float(v) for k, v in table.items()} if isinstance(table, dict) else {}
  except (OSError, ValueError, TypeError):
    return {}  # Missing or damaged: measure (and rewrite it).


def _write_peak_cache(key: str, peak: float) -> None:
  """Adds `key` to the cache file, atomically (two runs starting at once both write whole
  files); a cache that cannot be written (read-only home) only costs the next run a measure."""
  path = peak_cache_path()
  table = {**_read_peak_cache(), key: peak}
  tmp = f"{path}.{os.getpid()}.tmp"
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, "w") as f:
      json.dump(table, f, indent=1)
    os.replace(tmp, path)
  except OSError:
    pass


def _measure_matmul_flops_in_child(env: dict[str, str], dtype: str) -> float:
  """measure_matmul_flops on the CPU of a fresh process with environment `env` (0 on failure)."""
  # jaxlm.matmul_peak imports jax alone (not flax, optax, orbax): the child needs no more.
  code = ("import jax; from jaxlm import matmul_peak; "
          f"print(matmul_peak.measure_matmul_flops(jax.devices('cpu')[0], {dtype!r}))")
  try:
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=300, check=True).stdout
    return float(out.split()[-1])
  except (subprocess.SubprocessError, OSError, ValueError, IndexError):
    return 0.0


def peak_flops_total(dtype: str = "float32", *, remeasure: bool = False) -> float:
  """Peak FLOP/s of every device in the run, the denominator of MFU.

  CPU "devices" of one process share that host's cores (with
  --xla_force_host_platform_device_count they are the same cores several times over), so a
  CPU run counts one measured peak per process, not per device.
  """
  device = jax.devices()[0]
  if device.platform == "cpu":
    return peak_flops_per_device(device, dtype, remeasure=remeasure) * jax.process_count()
  return peak_flops_per_device(device, dtype, remeasure=remeasure) * jax.device_count()


# Keys of the per-layer statistics that train_step returns when train.log_params_every > 0.
LAYER_STAT_PREFIXES = ("params/norm", "grads/norm", "update_ratio")


def group_sq_norms(tree: dict[str, Any], stacked: str | None = None) -> dict[str, jax.Array]:
  """Float32 sum of squares of each top-level subtree (one per layer: h_0, ..., wte, ln_f).

  The subtree named `stacked` (model.BLOCKS under scan_layers) holds the blocks stacked on
  axis 0 (nn.scan): it gives one entry per block, named model.block_name(i) as an unstacked
  model would name them.
  """
  out = {}
  for name, sub in tree.items():
    if name == stacked:
      per_layer = sum(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=tuple(range(1, x.ndim)))
                      for x in jax.tree.leaves(sub))
      out.update({model_lib.block_name(i): per_layer[i] for i in range(per_layer.shape[0])})
    else:
      out[name] = sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(sub))
  return out


def layer_stats(params: dict[str, Any], grads: dict[str, Any], updates: dict[str, Any], *,
                stacked: str | None = None) -> dict[str, jax.Array]:
  """Global and per-layer parameter norm, gradient norm and ‖update‖ / ‖params‖.

  Pure reductions meant for inside the jitted train step, so they cost no host sync of their
  own. A layer is a top-level module of the params (h_0 ... h_{n-1}, wte, wpe, ln_f, lm_head),
  or one slice of the `stacked` subtree (see group_sq_norms).
  Keys: params/norm[/<layer>], grads/norm[/<layer>], update_ratio[/<layer>].
  """
  sq = {"params": group_sq_norms(params, stacked), "grads": group_sq_norms(grads, stacked),
        "updates": group_sq_norms(updates, stacked)}
  sq_total = {kind: sum(by_layer.values()) for kind, by_layer in sq.items()}
  out = {}
  for suffix, parts in [("", sq_total)] + [(f"/{name}", {kind: sq[kind][name] for kind in sq})
                                           for name in sq["params"]]:
    p_norm, u_norm = jnp.sqrt(parts["params"]), jnp.sqrt(parts["updates"])
    out[f"params/norm{suffix}"] = p_norm
    out[f"grads/norm{suffix}"] = jnp.sqrt(parts["grads"])
    # The floor only matters for an all-zero layer, which the GPT-2 init never produces.
    out[f"update_ratio{suffix}"] = u_norm / jnp.maximum(p_norm, jnp.finfo(jnp.float32).tiny)
  return out


def layer_stats_of(operands: tuple[Any, Any, Any], *,
                   stacked: str | None = None) -> dict[str, jax.Array]:
  """layer_stats((params, grads, updates)): the one-argument form lax.cond needs."""
  params, grads, updates = operands
  return layer_stats(params, grads, updates, stacked=stacked)


def format_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def _import_tensorboardx():
  """tensorboardX's event writer, scalar summary and Event proto, imported without torch.

  tensorboardX's package __init__ tries `import torch` (for torch tensors, which jaxlm never
  passes it): where torch is installed, that import was most of a short run's startup.
  A None in sys.modules makes that import fail fast, as on a machine without torch; the entry
  is removed again, so a later `import torch` elsewhere works as usual.
  """
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    from tensorboardX import event_file_writer, summary
    from tensorboardX.proto import event_pb2
  finally:
    if blocked:
      del sys.modules["torch"]
  return event_file_writer, summary, event_pb2


class EventFile:
  """TensorBoard scalars, written to one events file of `directory` in the caller's thread.

  tensorboardX's SummaryWriter writes from a thread of its own through a bounded queue: when
  that thread dies (a full disk), the next add_scalar blocks forever and the run can no longer
  act on a signal. Here a failed write raises OSError where it happens. The file name carries
  the pid, since tensorboardX names files by the second and opens them with "wb": a second
  attempt within the same second would empty the first one's file.

  `purge_step` (a resumed run: its checkpoint's step + 1) writes TensorBoard's restart marker,
  which hides the events at that step and later that an earlier attempt wrote before it died.
  """

  def __init__(self, directory: str, purge_step: int | None = None):
    event_file_writer, summary, event_pb2 = _import_tensorboardx()
    self._pb, self._scalar = event_pb2, summary.scalar
    os.makedirs(directory, exist_ok=True)
    self._writer = event_file_writer.EventsWriter(os.path.join(directory, "events"),
                                                  f".{os.getpid()}")
    if purge_step is not None:
      self._writer.write_event(event_pb2.Event(
          wall_time=time.time(), step=purge_step,
          session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START)))
    self.path = self._writer._file_name  # noqa: SLF001  (what a disk-full error names)

  def add_scalars(self, step: int, scalars: dict[str, float]) -> None:
    now = time.time()
    try:
      for tag, value in scalars.items():
        self._writer.write_event(self._pb.Event(wall_time=now, step=step,
                                                summary=self._scalar(tag, value)))
      self._writer.flush()  # Each record is on disk (or fails) now, like metrics.jsonl's.
    except OSError as e:
      raise workdir_lib.naming(e, self.path) from None

  def flush(self) -> None:
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricsWriter:
  """Appends one JSON object per call to metrics.jsonl and mirrors scalars to TensorBoard and,
  given `wandb` settings, the whole record to Weights & Biases (jaxlm/wandb_sink.py).

  Only process 0 writes; on other processes every method is a no-op. In a local workdir each
  record is on disk as soon as it is written. In a gs:// workdir (no appends on GCS) the
  whole metrics.jsonl object and the TensorBoard event files, which are written to a local
  temporary directory, are uploaded at most every `flush_sec` seconds and at close.

  `resumed_from` (the step of the checkpoint a resumed run restored) keeps each step's record
  written once: records past it, from an attempt that died after its last checkpoint, are
  dropped from metrics.jsonl (and hidden in TensorBoard), since the resumed run writes them
  again; and a write for a step at or before it, which the earlier attempt logged, is skipped.
  """

  def __init__(self, workdir: str, *, enabled: bool = True, tensorboard: bool = True,
               flush_sec: float = REMOTE_FLUSH_SEC, wandb: wandb_sink.Settings | None = None,
               resumed_from: int | None = None):
    self.enabled = enabled
    self._jsonl = None
    self._tb = None
    self._wandb = None
    self._events = None
    self._flush_sec = flush_sec
    self._last_flush = time.monotonic()
    self._floor = -1 if resumed_from is None else resumed_from
    if not enabled:
      return
    root = workdir_lib.path(workdir)
    if resumed_from is not None:
      drop_records_after(root / "metrics.jsonl", resumed_from)
    self._jsonl = workdir_lib.Appender(root / "metrics.jsonl")
    if tensorboard:
      self._events = workdir_lib.LocalMirror(root / "events")
      self._tb = EventFile(self._events.local,
                           None if resumed_from is None else resumed_from + 1)
    if wandb is not None:
      self._wandb = wandb_sink.WandbSink(root, wandb)

  def write(self, step: int, scalars: dict[str, Any]) -> None:
    if not self.enabled or step <= self._floor:
      return
    record = {"step": int(step)}
    record.update({k: _to_python(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    if self._tb is not None:
      self._tb.add_scalars(int(step), {k: v for k, v in record.items() if k != "step" and
                                       isinstance(v, (int, float))})
    if self._wandb is not None:
      self._wandb.log(record)
    if self._jsonl.remote and time.monotonic() - self._last_flush >= self._flush_sec:
      self.flush()

  def write_table(self, step: int, key: str, rows: list[dict[str, Any]]) -> None:
    """A table of `rows` (dicts of column -> value) at `step`, for W&B only: metrics.jsonl
    and TensorBoard hold the same values as the scalars of a `write`."""
    if self._wandb is not None:
      self._wandb.table(step, key, [{k: _to_python(v) for k, v in row.items()} for row in rows])

  def flush(self) -> None:
    """Makes every record written so far visible in the workdir (an upload on GCS)."""
    if not self.enabled:
      return
    self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()
      self._events.sync()
    self._last_flush = time.monotonic()

  def __enter__(self) -> MetricsWriter:
    return self

  def __exit__(self, exc_type, *exc) -> None:
    self.close(failed=exc_type is not None)

  def close(self, failed: bool = False) -> None:
    """Closes every sink; `failed` marks the W&B run as failed (the run raised)."""
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
      self._events.close()
    if self._wandb is not None:
      self._wandb.close(failed)
      self._wandb = None  # A W&B run finishes once; a second close is a no-op.


def drop_records_after(p: Any, step: int) -> None:
  """Rewrites metrics.jsonl without its records past `step` (and without a torn last line,
  which the next append would run into); a file with none is left untouched."""
  p = workdir_lib.path(p)
  if not p.exists():
    return
  lines = workdir_lib.read_text(p).splitlines(keepends=True)
  kept = [line for line in lines if line.endswith("\n") and _step_of(line) <= step]
  if len(kept) != len(lines):
    workdir_lib.write_text(p, "".join(kept))


def _step_of(line: str) -> float:
  try:
    step = json.loads(line)["step"]
  except (ValueError, KeyError, TypeError):
    step = None
  return step if isinstance(step, (int, float)) else -math.inf  # Not a record: kept.


def _to_python(v: Any) -> Any:
  if isinstance(v, (np.ndarray, np.generic, jax.Array)):
    v = np.asarray(v).item()
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)  # JSON has no NaN/Inf; keep them visible as strings.
  return v
