"""safetensors_io: malformed files give one-line CheckpointErrors naming the file; round trips."""

import json
import pathlib
import struct
import types

import ml_dtypes
import numpy as np
import pytest

from llada_jax.errors import CheckpointError
from llada_jax.interop import safetensors_io


def _raw(header, data: bytes = b"\0" * 16, size: int | None = None) -> bytes:
  """8-byte little-endian header length (default: the real one), header bytes, data bytes."""
  encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
  return struct.pack("<Q", len(encoded) if size is None else size) + encoded + data


def _entry(**fields) -> dict:
  return {"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16], **fields}}


MALFORMED = {
    "header_not_an_object": _raw([1, 2, 3]),
    "entry_not_an_object": _raw({"w": [0, 16]}),
    "negative_shape": _raw(_entry(shape=[-2, 2])),
    "non_integer_shape": _raw(_entry(shape=[2.5, 2])),
    "missing_shape": _raw({"w": {"dtype": "F32", "data_offsets": [0, 16]}}),
    "one_offset": _raw(_entry(data_offsets=[16])),
    "dtype_is_a_list": _raw(_entry(dtype=["F32"])),
    "shape_overflows_int64": _raw(_entry(shape=[2**32, 2**31])),
    "shape_overflows_uint64": _raw(_entry(shape=[2**32, 2**32, 4])),
    "shape_dim_overflows_uint64": _raw(_entry(shape=[2**70])),
    "negative_offsets": _raw(_entry(data_offsets=[-16, 0])),
    "offsets_past_the_end": _raw(_entry(shape=[4, 2], data_offsets=[0, 32])),
    "header_longer_than_file": _raw(_entry(), data=b"", size=4096),
    "header_not_json": _raw(b"{not json at all}"),
    "header_not_utf8": _raw(b"\xff\xfe\xfd\xfc"),
    "shorter_than_header_size": b"\x10\0\0",
    "empty_file": b"",
    "header_size_huge": b"\xff" * 16,
    "offsets_do_not_match_shape": _raw(_entry(data_offsets=[0, 12]), data=b"\0" * 12),
    "trailing_bytes": _raw(_entry(), data=b"\0" * 24),
    "unsupported_dtype": _raw(_entry(dtype="U8", shape=[16])),
    "unknown_dtype": _raw(_entry(dtype="F128")),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
@pytest.mark.parametrize(
    "read",
    [safetensors_io.read_header, lambda path: list(safetensors_io.iter_tensors(path))],
    ids=["read_header", "iter_tensors"],
)
def test_malformed_file_is_a_one_line_checkpoint_error_naming_it(tmp_path, kind, read):
  path = tmp_path / f"{kind}.safetensors"
  path.write_bytes(MALFORMED[kind])
  with pytest.raises(CheckpointError) as info:
    read(path)
  message = str(info.value)
  assert str(path) in message and "\n" not in message, message


@pytest.mark.parametrize("name", ["absent.safetensors", "folder.safetensors"])
def test_missing_or_unreadable_path_is_named(tmp_path, name):
  (tmp_path / "folder.safetensors").mkdir()
  with pytest.raises(CheckpointError) as info:
    safetensors_io.read_header(tmp_path / name)
  message = str(info.value)
  assert str(tmp_path / name) in message and "\n" not in message, message


def test_round_trip_keeps_bf16_bits_shapes_and_metadata(tmp_path):
  rng = np.random.default_rng(0)
  bits = rng.integers(0, 2**16, size=(3, 5), dtype=np.uint16)
  tensors = {
      "bf16": bits.view(ml_dtypes.bfloat16),
      "f32": rng.standard_normal((4, 2)).astype(np.float32).T,
      "f16": np.float16([1.5, -2.0]),
      "f64": np.float64(3.25).reshape(()),
      "i64": np.arange(6, dtype=np.int64).reshape(2, 3),
      "i32": np.zeros((0, 4), np.int32),
  }
  path = tmp_path / "ok.safetensors"
  safetensors_io.write_file(path, tensors, {"format": "pt"})
  header, offset = safetensors_io.read_header(path)
  assert sorted(header) == sorted(tensors)
  assert header["bf16"] == {
      "dtype": "BF16",
      "shape": [3, 5],
      "data_offsets": header["bf16"]["data_offsets"],
  }
  data_size = max(e["data_offsets"][1] for e in header.values())
  assert offset + data_size == path.stat().st_size
  assert json.loads(path.read_bytes()[8:offset])["__metadata__"] == {"format": "pt"}
  read = dict(safetensors_io.iter_tensors(path))
  for name, tensor in tensors.items():
    assert read[name].dtype == tensor.dtype and read[name].shape == tensor.shape, name
    assert read[name].tobytes() == np.ascontiguousarray(tensor).tobytes(), name
  assert read["bf16"].dtype == np.dtype(ml_dtypes.bfloat16)
  np.testing.assert_array_equal(read["bf16"].view(np.uint16), bits)


def test_iter_tensors_yields_one_owned_tensor_at_a_time(tmp_path):
  path = tmp_path / "two.safetensors"
  safetensors_io.write_file(path, {"a": np.ones(4, np.float32), "b": np.zeros(3, np.float32)})
  tensors = safetensors_io.iter_tensors(path)
  assert isinstance(tensors, types.GeneratorType)
  name, first = next(tensors)
  assert name == "a" and first.flags.writeable and not isinstance(first.base, np.memmap)
  maps = pathlib.Path("/proc/self/maps")
  if maps.exists():
    assert str(path) not in maps.read_text(), "the file stays memory-mapped while iterating"
  first[:] = 7
  assert [n for n, _ in tensors] == ["b"]
  assert dict(safetensors_io.iter_tensors(path))["a"].tolist() == [1, 1, 1, 1]


def test_writing_an_unsupported_dtype_is_named(tmp_path):
  with pytest.raises(CheckpointError, match="tensor x .*uint8"):
    safetensors_io.write_file(tmp_path / "u8.safetensors", {"x": np.zeros(2, np.uint8)})
