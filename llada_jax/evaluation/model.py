"""A checkpoint made ready to evaluate: config, parameters on the local devices, text codec."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llada_jax.errors import ConfigError
from llada_jax.data.codec import text_codec
from llada_jax.sampling.text import load_model

# The one mesh axis of evaluation: items (pairs, prompts) are split over the local devices.
ITEMS = "items"


@dataclasses.dataclass
class EvalModel:
  """What every evaluation needs; params are replicated over `mesh` (this host's devices)."""
  config: ml_collections.ConfigDict
  params: Any
  codec: Any
  mesh: Mesh
  step: int | None
  path: str

  @property
  def item_sharding(self) -> NamedSharding:
    """Splits the leading (item) axis of an input over the local devices."""
    return NamedSharding(self.mesh, PartitionSpec(ITEMS))


def load_eval_model(path: str | pathlib.Path, tokenizer: str | None = None) -> EvalModel:
  """A training workdir or HF LLaDA folder, ready to evaluate.

  tokenizer: a tokenizer.json for checkpoints without a bundled vocabulary (default: the one in an
  HF folder, or the config's data.tokenizer).
  """
  if not pathlib.Path(path).exists():
    raise ConfigError(f"--checkpoint={path} does not exist: expected a training workdir or an HF "
                      "LLaDA folder")
  config, params = load_model(path)
  hf_tokenizer = pathlib.Path(path) / "tokenizer.json"
  if tokenizer is None and hf_tokenizer.is_file() and config.data.vocabulary != "byte":
    tokenizer = str(hf_tokenizer)
  if tokenizer is not None:
    if not pathlib.Path(tokenizer).is_file():
      raise ConfigError(f"--tokenizer={tokenizer} names no file: expected the model's "
                        "tokenizer.json")
    config.data.update(vocabulary="llada_hf", tokenizer=str(tokenizer))
  codec = text_codec(config)
  step = None
  if not (pathlib.Path(path) / "config.json").is_file():
    from llada_jax.training.checkpoint import latest_step  # pylint: disable=g-import-not-at-top
    step = latest_step(path)
  return eval_model_from_params(config, params, codec, step, str(path))


def eval_model_from_params(config: ml_collections.ConfigDict, params: Any, codec: Any,
                           step: int | None, path: str) -> EvalModel:
  """An EvalModel of in-memory parameters (e.g. the trainer's), replicated on this host's devices.

  The parameters must be addressable by this process (true in single-process runs).
  """
  mesh = Mesh(np.asarray(jax.local_devices()), (ITEMS,))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  return EvalModel(config, params, codec, mesh, step, path)
