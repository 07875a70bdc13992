"""Preemption: SIGTERM (or the TPU maintenance notice) asks for a checkpoint at the next step.

One process: SIGTERM and the first Ctrl-C (SIGINT) set a flag; a second Ctrl-C raises
KeyboardInterrupt as usual, to abort without saving. Several processes: Orbax/JAX's preemption sync
point, which the coordination service fires on every host at the same step, so all save together.
"""

from __future__ import annotations

import signal
import threading

import jax
from absl import logging


class PreemptionWatcher:
  """`reached(step)` is True once a stop was requested; agreed across processes. A context
  manager: leaving it puts the previous signal handlers back."""

  def __init__(self, manager=None):
    self._manager = manager
    self._requested = threading.Event()
    self._previous = {}
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) is not signal.SIG_IGN:  # nohup, `cmd &` in scripts: leave it
          previous = signal.signal(signum, self._on_signal)
          self._previous[signum] = signal.SIG_DFL if previous is None else previous

  def _on_signal(self, signum, frame) -> None:
    """Records the signal; the loop saves at its next step (a second Ctrl-C interrupts at once)."""
    del frame
    if signum == signal.SIGINT:
      previous = self._previous.pop(signum, None)
      if previous is not None:
        signal.signal(signum, previous)  # the next Ctrl-C aborts
      logging.warning(
          "Ctrl-C: saving a checkpoint at the next step, then stopping; press Ctrl-C "
          "again to abort without saving"
      )
    else:
      logging.warning(
          "received signal %d: saving a checkpoint at the next step, then stopping", signum
      )
    self._requested.set()

  def reached(self, step: int) -> bool:
    if self._requested.is_set():
      return True
    if jax.process_count() > 1 and self._manager is not None:
      return bool(self._manager.reached_preemption(step))
    return False

  def close(self) -> None:
    """Puts the previous SIGTERM and SIGINT handlers back."""
    handlers, self._previous = self._previous, {}
    for signum, previous in handlers.items():
      signal.signal(signum, previous)

  def __enter__(self) -> PreemptionWatcher:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()
