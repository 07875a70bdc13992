"""Metric output from process 0 only: one console line per log step, TensorBoard scalars and,
for scaling studies, `metrics.jsonl` (every record with the tokens seen and FLOPs spent at its step)
next to `run.json` (the run's size and accounting)."""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from typing import Mapping

import jax
import ml_collections
import numpy as np
from absl import logging

from llada_jax import storage
from llada_jax.training.flops import (
    matmul_parameters,
    model_flops_per_token,
    non_embedding_parameters,
)

RUN_SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Accounting:
  """What one training step of a config consumes: tokens and FLOPs in both conventions."""

  tokens_per_step: int
  flops_per_token: float  # exact: 6 N_matmul + attention (llada_jax.training.flops)
  flops_6nd_per_token: float  # 6 N, N = non-embedding parameters

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Accounting:
    return cls(
        config.data.batch_size * config.data.sequence_length,
        model_flops_per_token(config),
        6.0 * non_embedding_parameters(config),
    )

  def at(self, step: int) -> dict[str, float]:
    """Tokens seen and FLOPs spent after `step` steps."""
    tokens = step * self.tokens_per_step
    return {
        "tokens": float(tokens),
        "flops": tokens * self.flops_per_token,
        "flops_6nd": tokens * self.flops_6nd_per_token,
    }


def run_description(config: ml_collections.ConfigDict, num_params: int) -> dict:
  """The content of run.json: objective, sizes and accounting of a training run."""
  accounting = Accounting.from_config(config)
  return {
      "schema": RUN_SCHEMA,
      "objective": config.diffusion.objective,
      "parameters": num_params,
      "non_embedding_parameters": non_embedding_parameters(config),
      "matmul_parameters": matmul_parameters(config),
      **dataclasses.asdict(accounting),
      "task": config.data.task,
      "vocabulary": config.data.vocabulary,
      "sequence_length": config.data.sequence_length,
      "batch_size": config.data.batch_size,
      "config": json.loads(config.to_json_best_effort()),
  }


@functools.cache  # registers once per process
def _close_gs_event_files_once() -> None:
  """Registers tensorboardX's gs:// event writer with a close that runs once.

  tensorboardX's GCSRecordWriter uploads its whole buffer again whenever it is garbage collected,
  closed or not, and each SummaryWriter's atexit hook keeps it alive until the interpreter's
  teardown: every process that wrote to a bucket uploaded each event file once more at exit, and
  with the bucket out of reach by then (a network gone, a test's local server stopped) retried for
  120 s before exiting. Here an event file uploads at each flush and at its close, and never after.
  """
  from tensorboardX import record_writer  # pylint: disable=g-import-not-at-top

  class ClosingOnce(record_writer.GCSRecordWriter):
    """record_writer.GCSRecordWriter whose close (and __del__) after a close does nothing."""

    closed = False

    def close(self) -> None:
      if not self.closed:
        self.closed = True
        super().close()

  class Factory(record_writer.GCSRecordWriterFactory):

    def open(self, path: str) -> record_writer.GCSRecordWriter:
      return ClosingOnce(path)

  record_writer.register_writer_factory("gs", Factory())


class MetricWriter:
  """Writes scalars to the log and to TensorBoard event files in `<workdir>/tensorboard`; with an
  Accounting also to `<workdir>/metrics.jsonl` with tokens and FLOPs, which go to TensorBoard too
  (`tokens_seen`, `flops`, `flops_6nd`) so any curve can be read against them.

  A local workdir gets every record at once. On object storage, where a file is rewritten whole
  at each flush (no append), records are flushed every FLUSH_SECONDS and at close: a killed run
  loses at most that much of its log (its resumed run logs those steps again)."""

  FLUSH_SECONDS = 60.0

  def __init__(self, workdir: storage.PathLike, accounting: Accounting | None = None):
    self._enabled = jax.process_index() == 0
    self._tb = None
    self._accounting = accounting
    self._jsonl = storage.path(workdir) / "metrics.jsonl"
    self._remote = storage.is_remote(workdir)
    self._pending: list[str] = []
    self._flushed = time.monotonic()
    if self._enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

      if self._remote:
        _close_gs_event_files_once()

      self._tb = SummaryWriter(
          str(storage.path(workdir) / "tensorboard"),
          flush_secs=self.FLUSH_SECONDS if self._remote else 120,
      )

  def write(self, step: int, scalars: Mapping[str, float | np.ndarray], prefix: str = "") -> None:
    """One record: a console line, TensorBoard scalars `<prefix><name>` and a JSONL line whose
    `split` is the prefix without its slash ("train" for none). An array value (a MoE model's
    router/load [layers, experts]) goes to TensorBoard as a histogram and per-layer scalars
    `<name>/layer_<i>/max` and `/min`, and to the JSONL line as nested lists; not to the console."""
    if not self._enabled:
      return
    line = " | ".join(f"{k} {_format(v)}" for k, v in scalars.items() if np.ndim(v) == 0)
    logging.info("%sstep %d | %s", prefix, step, line)
    for name, value in scalars.items():
      if np.ndim(value) == 0:
        self._tb.add_scalar(f"{prefix}{name}", float(value), step)
        continue
      self._tb.add_histogram(f"{prefix}{name}", np.asarray(value), step)
      for i, row in enumerate(np.asarray(value).reshape(-1, np.shape(value)[-1])):
        self._tb.add_scalar(f"{prefix}{name}/layer_{i}/max", float(row.max()), step)
        self._tb.add_scalar(f"{prefix}{name}/layer_{i}/min", float(row.min()), step)
    if self._accounting is not None:
      spent = self._accounting.at(step)
      if not prefix:
        self._tb.add_scalar("tokens_seen", spent["tokens"], step)
        self._tb.add_scalar("flops", spent["flops"], step)
        self._tb.add_scalar("flops_6nd", spent["flops_6nd"], step)
      record = {
          "step": step,
          "split": prefix.rstrip("/") or "train",
          **spent,
          **{k: _json_number(v) for k, v in scalars.items()},
      }
      self._pending.append(json.dumps(record) + "\n")
    if not self._remote or time.monotonic() - self._flushed >= self.FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    """Writes the pending records and TensorBoard events out."""
    if not self._enabled:
      return
    storage.append_jsonl(self._jsonl, self._pending)
    self._pending = []
    self._tb.flush()
    self._flushed = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self.flush()
      self._tb.close()
      self._tb = None


def write_run_description(
    workdir: storage.PathLike, config: ml_collections.ConfigDict, num_params: int
) -> None:
  """Writes `<workdir>/run.json` (process 0; rewritten on resume with the same content)."""
  if jax.process_index() == 0:
    path = storage.path(workdir) / "run.json"
    path.write_text(json.dumps(run_description(config, num_params), indent=1) + "\n")


def _json_number(value: float | np.ndarray) -> float | None | list:
  """A float for JSON (an array: nested lists of them); NaN and infinities (a diverged step)
  become null."""
  if np.ndim(value):
    return [_json_number(v) for v in value]
  value = float(value)
  return value if np.isfinite(value) else None


def _format(value: float) -> str:
  value = float(value)
  if value != 0 and (abs(value) < 1e-2 or abs(value) >= 1e5):
    return f"{value:.3e}"
  return f"{value:.4f}"
