"""Splitting a list of evaluation items over hosts and local devices, and gathering the results."""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils

T = TypeVar("T")


def this_host_indices(lengths: Sequence[int]) -> np.ndarray:
  """Indices of the items this process evaluates: sorted by length, then dealt out round-robin,
  so every host gets a similar mix of lengths and similar lengths share a padded batch."""
  order = np.argsort(np.asarray(lengths), kind="stable")
  return order[jax.process_index() :: jax.process_count()]


def chunks(indices: np.ndarray, size: int) -> list[np.ndarray]:
  """Consecutive slices of at most `size` indices."""
  return [indices[i : i + size] for i in range(0, len(indices), size)]


def pad_to_multiple(items: list[T], multiple: int) -> list[T]:
  """items extended by copies of its last item to a length divisible by `multiple`."""
  return items + [items[-1]] * (-len(items) % multiple)


def bucket(width: int, step: int = 32) -> int:
  """width rounded up to a multiple of `step`: few distinct shapes, few compilations."""
  return -(-width // step) * step


def gather_rows(total: int, indices: np.ndarray, rows: np.ndarray) -> np.ndarray:
  """The [total, ...] array whose row indices[i] is rows[i], assembled from every process."""
  out = np.zeros((total,) + rows.shape[1:], rows.dtype)
  if jax.process_count() == 1:
    out[indices] = rows
    return out
  width = -(-total // jax.process_count())
  padded_idx = np.full((width,), -1, np.int64)
  padded_idx[: len(indices)] = indices
  padded_rows = np.zeros((width,) + rows.shape[1:], rows.dtype)
  padded_rows[: len(rows)] = rows
  all_idx = np.asarray(multihost_utils.process_allgather(padded_idx)).reshape(-1)
  all_rows = np.asarray(multihost_utils.process_allgather(padded_rows))
  all_rows = all_rows.reshape((-1,) + rows.shape[1:])
  keep = all_idx >= 0
  out[all_idx[keep]] = all_rows[keep]
  return out


def run_sharded(
    lengths: Sequence[int],
    batch_items: int,
    evaluate: Callable[[np.ndarray], np.ndarray],
    row_shape: tuple[int, ...] = (),
    dtype: np.dtype | type = np.float32,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
  """Evaluates every item once over all hosts: evaluate(indices) -> rows [len, *row_shape].

  Returns the rows of all items in their original order, on every process.
  """
  indices = this_host_indices(lengths)
  rows = []
  for part in chunks(indices, batch_items):
    rows.append(evaluate(part))
    if progress is not None:
      progress(len(part))
  local = np.concatenate(rows).astype(dtype) if rows else np.zeros((0,) + row_shape, dtype)
  return gather_rows(len(lengths), indices, local)
