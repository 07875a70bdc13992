"""The files of an HF checkpoint folder: its JSON files and its safetensors (single or sharded),
read with one-line errors. Every family's importer (interop/hf_checkpoint.py, llama.py,
llada2_moe.py) lists and reads a folder through these."""

from __future__ import annotations

import json
import pathlib
from typing import Any

from llada_jax.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def hf_files(path: str | pathlib.Path) -> list[pathlib.Path]:
  """The safetensors files of an HF folder (sharded through the index, or the single file)."""
  path = pathlib.Path(path)
  if not (path / "config.json").is_file():
    raise CheckpointError(f"{path} has no config.json: not a HuggingFace checkpoint folder")
  if (path / INDEX).is_file():
    try:
      weight_map = json.loads((path / INDEX).read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError) as e:
      raise CheckpointError(f"{path / INDEX} is not a valid safetensors index: {e}") from None
    files = [path / name for name in sorted(set(weight_map.values()))]
  else:
    files = [path / SINGLE]
  for file in files:
    if not file.is_file():
      raise CheckpointError(f"{file} is missing (named by the checkpoint folder)")
  return files


def read_json(path: pathlib.Path) -> dict[str, Any]:
  """The JSON object in `path` (config.json and the like); CheckpointError, one line, when it
  cannot be read, is not JSON or is not an object."""
  try:
    hf = json.loads(path.read_text())
  except OSError as e:
    raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f"{path} is not valid JSON: {e}") from None
  if not isinstance(hf, dict):
    raise CheckpointError(f"{path} is not a JSON object")
  return hf
