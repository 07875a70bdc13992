"""One trainer per workdir: `<workdir>/train.lock` names the run that holds it.

The lock is a JSON file (process id, host, start time, the holder's command line) that process 0
creates atomically when training starts and removes on every way out of `train` (the end, an
error, a preemption or Ctrl-C save). A second trainer on the workdir stops with a ConfigError that
names the holder. A lock left by a killed run is recognised as stale and taken over with a warning
when its host is this host and its process is gone (or the pid now belongs to a later process, or
the machine rebooted since). A lock from another host cannot be checked, so it is never taken
over: the error says to delete the file once that run is known to be dead. On object storage
(a gs:// workdir), where this path layer has no atomic create, the lock is written, left to settle
for SETTLE_SECONDS and read back: of two trainers starting together, the one whose record was
overwritten stops.
"""

from __future__ import annotations

import json
import os
import pathlib
import socket
import sys
import time
import uuid
from typing import Any

import jax
import numpy as np
from absl import logging

from llada_jax import storage
from llada_jax.errors import ConfigError

LOCK_NAME = "train.lock"
SETTLE_SECONDS = 2.0  # object storage: how long a written lock must survive to count as taken


def _boot_id() -> str | None:
  try:
    return pathlib.Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
  except OSError:
    return None


def _stat(pid: int) -> list[str] | None:
  """Fields 3.. of /proc/<pid>/stat (Linux), or None; the name before ")" may hold spaces."""
  try:
    return (
        pathlib.Path(f"/proc/{pid}/stat")
        .read_text(encoding="utf-8", errors="replace")
        .rsplit(")", 1)[1]
        .split()
    )
  except OSError:
    return None


def _process_start(pid: int) -> int | None:
  """The start time of process `pid` in clock ticks since boot (Linux), or None."""
  fields = _stat(pid)
  return None if fields is None else int(fields[19])  # field 22


def _alive(holder: dict[str, Any]) -> bool | None:
  """Whether the holder's process runs; None when it is on another host, where none can tell."""
  if holder["host"] != socket.gethostname():
    return None
  if None not in (holder.get("boot_id"), _boot_id()) and holder["boot_id"] != _boot_id():
    return False
  try:
    os.kill(holder["pid"], 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass  # another user's process
  fields = _stat(holder["pid"])
  if fields is not None and fields[0] in ("Z", "X"):
    return False  # killed, not yet reaped (a container whose init does not reap orphans)
  started = holder.get("process_start")
  return started is None or _process_start(holder["pid"]) in (None, started)


def _parse(text: str) -> dict[str, Any] | None:
  """The holder record in a lock file's text; None if it is not one (a damaged file)."""
  try:
    holder = json.loads(text)
  except ValueError:
    return None
  valid = (
      isinstance(holder, dict)
      and isinstance(holder.get("pid"), int)
      and holder["pid"] > 0
      and isinstance(holder.get("host"), str)
  )
  return holder if valid else None


class WorkdirLock:
  """`acquire` takes `<workdir>/train.lock`; `release` removes it if this object still holds it."""

  def __init__(self, workdir: storage.PathLike):
    self._workdir = workdir
    self.path = storage.path(workdir) / LOCK_NAME
    self._token = None

  def acquire(self) -> None:
    """Takes the lock, replacing a stale one.

    Raises ConfigError (one line, naming the holder's pid, host and start time) if a live run
    holds it, or a run on another host whose liveness this host cannot check.
    """
    record = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "boot_id": _boot_id(),
        "process_start": _process_start(os.getpid()),
        "token": uuid.uuid4().hex,
        "command": " ".join(sys.argv),
    }
    if storage.is_remote(self.path):
      self._acquire_object(record)
      return
    draft = self.path.with_name(f"{LOCK_NAME}.{record['token']}")
    draft.write_text(json.dumps(record, indent=1) + "\n")
    try:
      for _ in range(3):
        try:
          os.link(draft, self.path)  # atomic: fails if the lock exists, never half-written
          self._token = record["token"]
          return
        except FileExistsError:
          pass
        self._take_over_if_stale()
    finally:
      draft.unlink(missing_ok=True)
    raise ConfigError(
        f"--workdir={self._workdir} is being locked by another trainer at this "
        f"moment ({self.path}); use another workdir"
    )

  def _acquire_object(self, record: dict[str, Any]) -> None:
    """acquire() on object storage, which has no atomic create-if-absent through this path
    layer: write the record, wait, read it back. Two trainers starting within SETTLE_SECONDS
    of each other both see the later record, so the earlier one stops."""
    for _ in range(3):
      if self.path.exists():
        self._take_over_if_stale()
        if self.path.exists():
          continue
      self.path.write_text(json.dumps(record, indent=1) + "\n")
      time.sleep(SETTLE_SECONDS)
      holder = _parse(self.path.read_text()) if self.path.exists() else None
      if holder is not None and holder.get("token") == record["token"]:
        self._token = record["token"]
        return
      if holder is not None:
        raise ConfigError(
            f"--workdir={self._workdir} was locked at the same moment by pid "
            f"{holder['pid']} on {holder['host']} ({self.path}); use another "
            "workdir"
        )
    raise ConfigError(
        f"--workdir={self._workdir} is being locked by another trainer at this "
        f"moment ({self.path}); use another workdir"
    )

  def _take_over_if_stale(self) -> None:
    """Removes the current lock if its holder is dead; ConfigError if it may be alive."""
    try:
      text = self.path.read_text()
    except FileNotFoundError:
      return  # released meanwhile
    holder = _parse(text)
    alive = False if holder is None else _alive(holder)
    if alive is not None:
      where = f"pid {holder['pid']} on {holder['host']}" if holder else "a damaged lock file"
      if alive:
        raise ConfigError(
            f"--workdir={self._workdir} is in use by another trainer: pid "
            f"{holder['pid']} on {holder['host']}, started {holder.get('started')} "
            f"({self.path}); wait for it to end or use another workdir"
        )
      logging.warning("taking over the stale lock %s of %s, a run that is gone", self.path, where)
      self._remove_if_unchanged(text)
      return
    raise ConfigError(
        f"--workdir={self._workdir} is locked by pid {holder['pid']} on host "
        f"{holder['host']}, started {holder.get('started')}, which this host cannot "
        f"check; if that run has ended, delete {self.path}"
    )

  def _remove_if_unchanged(self, text: str) -> None:
    """Deletes the lock if it still holds `text` (another trainer may have taken it over)."""
    if storage.is_remote(self.path):
      if self.path.exists() and self.path.read_text() == text:
        self.path.unlink()
      return
    aside = self.path.with_name(f"{LOCK_NAME}.{uuid.uuid4().hex}.stale")
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    if aside.read_text() != text:  # a fresh lock of a faster trainer: put it back
      try:
        os.link(aside, self.path)
      except FileExistsError:
        pass
    aside.unlink()

  def release(self) -> None:
    """Removes the lock if this object holds it; never fails."""
    if self._token is None:
      return
    try:
      holder = _parse(self.path.read_text())
      if holder is not None and holder.get("token") == self._token:
        self.path.unlink()
    except OSError as e:
      logging.warning("could not remove the lock %s: %s", self.path, e)
    self._token = None


def lock_for_job(workdir: storage.PathLike) -> WorkdirLock:
  """The workdir's lock, taken by process 0 of the job; the other processes hold an empty one.

  Raises ConfigError on every process when process 0 could not take it.
  """
  lock = WorkdirLock(workdir)
  error = None
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except ConfigError as e:
      error = e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    taken = bool(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not taken and error is None:
      error = ConfigError(
          f"--workdir={workdir} is in use by another trainer (see process 0's " "error)"
      )
  if error is not None:
    raise error
  return lock
