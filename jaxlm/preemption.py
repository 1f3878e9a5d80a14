"""Preemption: SIGTERM, Ctrl-C and multi-host preemption notices become "stop at this step"."""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class StopRequest:
  """Turns the first SIGTERM/SIGINT into "stop after this step"; a second SIGINT aborts."""

  def __init__(self):
    self.signal_name: str | None = None
    self._previous = {}
    if threading.current_thread() is not threading.main_thread():
      return  # Signal handlers can only be installed from the main thread.
    # Multi-host runs leave SIGTERM to JAX's preemption notifier (see `should_stop`).
    signals = [signal.SIGINT] + ([signal.SIGTERM] if jax.process_count() == 1 else [])
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    if self.signal_name is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # Second Ctrl-C: abort at once.
    self.signal_name = signal.Signals(signum).name
    logging.warning("%s received: stopping after the current step with a checkpoint",
                    self.signal_name)

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      # Every host reaches the same answer at the same step (JAX's preemption sync point).
      from jax.experimental import multihost_utils
      try:
        if multihost_utils.reached_preemption_sync_point(step):
          self.signal_name = self.signal_name or "preemption"
          return True
      except RuntimeError:
        pass  # Preemption service disabled: fall back to local signals.
    return self.signal_name is not None

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
