"""Reading and writing the safetensors format without torch, via the `safetensors` package.

A file is an 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}
and the raw tensor bytes. The library validates the header (a JSON object of well-typed entries,
offsets that tile the data section exactly, shape x dtype sizes that neither overflow nor disagree
with the offsets, a file that ends where the last tensor does); every failure becomes a one-line
CheckpointError naming the file. Reading yields one tensor at a time, so a conversion holds the
parameters being built plus one source tensor, never a second full copy.
"""

from __future__ import annotations

import contextlib
import math
import pathlib
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

from llada_jax.errors import CheckpointError

# Importing ml_dtypes registers the name "bfloat16" with NumPy, which the library's numpy framework
# uses for BF16 tensors: they come back as ml_dtypes.bfloat16 arrays, bit for bit.
DTYPES = {
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
}
NAMES = [dtype.name for dtype in DTYPES.values()]


def _first_line(error: BaseException) -> str:
  return next(iter(str(error).splitlines()), "") or type(error).__name__


@contextlib.contextmanager
def _open(path: pathlib.Path) -> Iterator[safetensors.safe_open]:
  """The library's reader over `path`, with the "pread" backend: no memory map stays open.

  Raises:
    CheckpointError: the file cannot be read or its header is malformed.
  """
  try:
    handle = safetensors.safe_open(path, framework="numpy", backend="pread")
  except FileNotFoundError:
    raise CheckpointError(f"{path} does not exist") from None
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e.strerror or _first_line(e)}") from None
  except safetensors.SafetensorError as e:
    reason = _first_line(e).removeprefix("Error while deserializing header: ")
    raise CheckpointError(
        f"{path} is not a valid safetensors file (corrupted safetensors header "
        f"or truncated file): {reason}"
    ) from None
  with handle:
    yield handle


def _entries(path: pathlib.Path, handle: safetensors.safe_open) -> dict[str, dict]:
  """{name: {dtype, shape, data_offsets}} in file order; CheckpointError on an unsupported dtype."""
  entries, begin = {}, 0
  for name in handle.offset_keys():
    view = handle.get_slice(name)
    dtype, shape = view.get_dtype(), view.get_shape()
    if dtype not in DTYPES:
      raise CheckpointError(
          f"{path}: tensor {name} has dtype {dtype}; expected one of " + ", ".join(DTYPES)
      )
    end = begin + math.prod(shape) * DTYPES[dtype].itemsize
    entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}
    begin = end
  return entries


def read_header(path: str | pathlib.Path) -> tuple[dict[str, dict], int]:
  """The tensor entries and the byte offset of the data section.

  Returns:
    ({name: {"dtype": str, "shape": list[int], "data_offsets": [begin, end]}}, offset), entries
    in file order, offsets relative to the data section (which ends where the file does).

  Raises:
    CheckpointError: the file is unreadable, malformed or truncated, or holds a dtype other than
      those in DTYPES.
  """
  path = pathlib.Path(path)
  with _open(path) as handle:
    entries = _entries(path, handle)
  data_size = max((e["data_offsets"][1] for e in entries.values()), default=0)
  return entries, path.stat().st_size - data_size


def iter_tensors(path: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) for every tensor in file order, read one at a time.

  Arrays have the header's shape and the dtype DTYPES maps its dtype to (BF16 as
  ml_dtypes.bfloat16). Each is read with pread(2) into its own bytearray, which the array views
  without a second copy; the file is not memory-mapped, so the pages of tensors already converted
  do not stay resident: a caller that drops each array keeps one tensor in memory. The whole
  header is checked before the first tensor is yielded.

  Raises:
    CheckpointError: as read_header, or the file cannot be read while iterating.
  """
  path = pathlib.Path(path)
  with _open(path) as handle:
    for name in _entries(path, handle):
      try:
        tensor = handle.get_tensor(name)
      except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"cannot read tensor {name} from {path}: {_first_line(e)}") from None
      yield name, tensor


def write_file(
    path: str | pathlib.Path,
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
  """Writes tensors (any layout; stored C-contiguous, little-endian) with optional __metadata__.

  Raises:
    CheckpointError: a tensor's dtype is not one of DTYPES.
  """
  contiguous = {}
  for name, tensor in tensors.items():
    array = np.asarray(tensor, order="C")
    if array.dtype.name not in NAMES:
      raise CheckpointError(
          f"cannot write tensor {name} to {path}: dtype {array.dtype} is not "
          "one of " + ", ".join(NAMES)
      )
    contiguous[name] = array
  safetensors.numpy.save_file(contiguous, path, dict(metadata) if metadata else None)
