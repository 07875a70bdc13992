"""Reading and writing the safetensors format with NumPy alone (bfloat16 via ml_dtypes).

A file is an 8-byte little-endian header size, a JSON header {name: {dtype, shape, data_offsets}}
and the raw tensor bytes. Reading yields one tensor at a time, so a conversion holds the parameters
being built plus one source tensor, never a second full copy.
"""

from __future__ import annotations

import json
import pathlib
import struct
from typing import Iterator, Mapping

import ml_dtypes
import numpy as np

from llada_jax.errors import CheckpointError

DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
          "BF16": np.dtype(ml_dtypes.bfloat16), "F64": np.dtype(np.float64),
          "I64": np.dtype(np.int64), "I32": np.dtype(np.int32)}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 * 2 ** 20


def read_header(path: str | pathlib.Path) -> tuple[dict[str, dict], int]:
  """(tensor entries, byte offset of the data section); CheckpointError if the header is bad."""
  path = pathlib.Path(path)
  try:
    with path.open("rb") as f:
      size_bytes = f.read(8)
      if len(size_bytes) != 8:
        raise CheckpointError(f"{path} is not a safetensors file: shorter than its header size")
      (size,) = struct.unpack("<Q", size_bytes)
      if size > MAX_HEADER_BYTES:
        raise CheckpointError(f"{path} has a corrupted safetensors header (declares {size} bytes)")
      header = json.loads(f.read(size))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path} has an unreadable safetensors header: {e}") from None
  header.pop("__metadata__", None)
  data_size = path.stat().st_size - 8 - size
  for name, entry in header.items():
    begin, end = entry.get("data_offsets", (0, -1))
    if entry.get("dtype") not in DTYPES:
      raise CheckpointError(f"{path}: tensor {name} has dtype {entry.get('dtype')!r}; expected "
                            "one of " + ", ".join(DTYPES))
    expected = int(np.prod(entry["shape"])) * DTYPES[entry["dtype"]].itemsize
    if end - begin != expected or end > data_size:
      raise CheckpointError(f"{path}: tensor {name} has data offsets {begin}..{end} that do not "
                            f"match its shape {entry['shape']} or the file size (truncated file?)")
  return header, 8 + size


def iter_tensors(path: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) for every tensor, read one at a time.

  Each tensor is read into its own buffer (not memory-mapped), so the pages of tensors already
  converted do not stay resident: a caller that drops each array keeps one tensor in memory.
  """
  header, offset = read_header(path)
  with pathlib.Path(path).open("rb") as f:
    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
      begin, end = entry["data_offsets"]
      f.seek(offset + begin)
      raw = np.frombuffer(f.read(end - begin), dtype=DTYPES[entry["dtype"]])
      yield name, raw.reshape(entry["shape"])


def write_file(path: str | pathlib.Path, tensors: Mapping[str, np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
  """Writes tensors (C-contiguous, little-endian) in name order, as the reference writer does."""
  header: dict[str, dict] = {}
  if metadata:
    header["__metadata__"] = dict(metadata)
  offset = 0
  names = sorted(tensors)
  for name in names:
    array = tensors[name]
    nbytes = array.size * array.dtype.itemsize
    header[name] = {"dtype": NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + nbytes]}
    offset += nbytes
  encoded = json.dumps(header, separators=(",", ":")).encode()
  encoded += b" " * (-len(encoded) % 8)
  with pathlib.Path(path).open("wb") as f:
    f.write(struct.pack("<Q", len(encoded)))
    f.write(encoded)
    for name in names:
      f.write(np.ascontiguousarray(tensors[name]).tobytes())
