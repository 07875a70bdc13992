"""Reads the runs of a scaling study: `run.json` and `metrics.jsonl` of every training workdir."""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Any

import numpy as np

from llada_jax.config import OBJECTIVES
from llada_jax.errors import ConfigError

X_AXES = ("flops", "flops_6nd", "tokens")


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run: its description (run.json) and its records, the last one per step."""

  name: str
  path: pathlib.Path
  description: dict[str, Any]
  records: tuple[dict[str, Any], ...]

  @property
  def objective(self) -> str:
    return self.description["objective"]

  @property
  def parameters(self) -> int:
    return int(self.description["parameters"])

  def curve(
      self, metric: str, x: str = "flops", split: str = "eval"
  ) -> tuple[np.ndarray, np.ndarray]:
    """(x values, metric values) of the records of `split` that carry the metric, by step."""
    rows = [
        (r[x], r[metric]) for r in self.records if r["split"] == split and r.get(metric) is not None
    ]
    xs, ys = (np.asarray(v, np.float64) for v in zip(*rows)) if rows else (np.zeros(0),) * 2
    return xs, ys

  def metrics(self, split: str = "eval") -> set[str]:
    """Names of the numeric values recorded in `split`."""
    skip = {"step", "split", *X_AXES}
    return {k for r in self.records if r["split"] == split for k in r if k not in skip}


def read_records(path: pathlib.Path) -> tuple[dict[str, Any], ...]:
  """metrics.jsonl as one record per (split, step), sorted: the records of one step merged, a
  later value of a key replacing an earlier one (the trainer writes its held-out bound and each
  evaluation hook's results as separate eval records of a step; a resumed or rolled-back run
  writes a step again, and its values are those of the parameters its checkpoint holds). An
  unparsable last line (a run killed mid-write) is skipped; any other is a ConfigError."""
  lines = path.read_text(encoding="utf-8").splitlines()
  latest: dict[tuple[str, int], dict[str, Any]] = {}
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      key = (record["split"], int(record["step"]))
    except (ValueError, KeyError, TypeError):
      if number == len(lines):
        continue
      raise ConfigError(
          f"{path}:{number}: not a metrics record (expected a JSON object with " "split and step)"
      ) from None
    latest[key] = {**latest.get(key, {}), **record}
  return tuple(latest[k] for k in sorted(latest))


def collect_runs(root: str | pathlib.Path) -> list[Run]:
  """Every run under `root` (any directory holding a run.json), sorted by objective and size."""
  root = pathlib.Path(root)
  if not root.is_dir():
    raise ConfigError(f"--runs={root} is not allowed: expected a directory of training workdirs")
  found = []
  for description_file in sorted(root.rglob("run.json")):
    try:
      description = json.loads(description_file.read_text(encoding="utf-8"))
    except ValueError as e:
      raise ConfigError(f"{description_file}: not valid JSON ({e})") from None
    objective = description.get("objective") if isinstance(description, dict) else None
    if objective not in OBJECTIVES:
      raise ConfigError(
          f"{description_file}: objective {objective!r} is not allowed: expected "
          f"one of {', '.join(OBJECTIVES)}"
      )
    metrics_file = description_file.parent / "metrics.jsonl"
    records = read_records(metrics_file) if metrics_file.exists() else ()
    found.append(
        Run(
            str(description_file.parent.relative_to(root)),
            description_file.parent,
            description,
            records,
        )
    )
  if not found:
    raise ConfigError(
        f"--runs={root} holds no runs: expected workdirs with run.json (written by " "llada-train)"
    )
  return sorted(found, key=lambda r: (r.objective, r.parameters, r.name))


def default_metric(runs: list[Run]) -> str:
  """bits_per_byte when every run records it (byte vocabularies), else loss_bound (nats/token)."""
  if all("bits_per_byte" in run.metrics() for run in runs):
    return "bits_per_byte"
  return "loss_bound"
