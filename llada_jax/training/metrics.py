"""Metric output: one console line per log step and TensorBoard scalars, from process 0 only."""

from __future__ import annotations

import pathlib
from typing import Mapping

import jax
from absl import logging


class MetricWriter:
  """Writes scalars to the log and to TensorBoard event files in `<workdir>/tensorboard`."""

  def __init__(self, workdir: str | pathlib.Path):
    self._enabled = jax.process_index() == 0
    self._tb = None
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float], prefix: str = "") -> None:
    if not self._enabled:
      return
    line = " | ".join(f"{k} {_format(v)}" for k, v in scalars.items())
    logging.info("%sstep %d | %s", prefix, step, line)
    for name, value in scalars.items():
      self._tb.add_scalar(f"{prefix}{name}", float(value), step)
    self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def _format(value: float) -> str:
  value = float(value)
  if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
    return f"{value:.3e}"
  return f"{value:.4f}"
