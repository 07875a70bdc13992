"""Preemption: SIGTERM (or the TPU maintenance notice) asks for a checkpoint at the next step.

One process: a SIGTERM handler sets a flag. Several processes: Orbax/JAX's preemption sync point,
which the coordination service fires on every host at the same step, so all save together.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class PreemptionWatcher:
  """`reached(step)` is True once a stop was requested; agreed across processes."""

  def __init__(self, manager=None):
    self._manager = manager
    self._requested = threading.Event()
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame) -> None:
    del frame
    logging.warning("received signal %d: saving a checkpoint at the next step, then stopping",
                    signum)
    self._requested.set()

  def reached(self, step: int) -> bool:
    if self._requested.is_set():
      return True
    if jax.process_count() > 1 and self._manager is not None:
      return bool(self._manager.reached_preemption(step))
    return False

  def close(self) -> None:
    """Puts the previous SIGTERM handler back."""
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
