"""A checkpoint made ready to evaluate: config, parameters on the local devices, text codec."""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from llada_jax.data.codec import text_codec
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.loading import load_model_and_step

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

  @functools.cached_property
  def lm(self) -> MaskedDiffusionLM:
    """The model object of `config`: what evaluations score and sample through."""
    return MaskedDiffusionLM(self.config)

  @property
  def item_sharding(self) -> NamedSharding:
    """Splits the leading (item) axis of an input over the local devices."""
    return NamedSharding(self.mesh, PartitionSpec(ITEMS))


def load_eval_model(path: str | pathlib.Path, tokenizer: str | None = None) -> EvalModel:
  """A training workdir or HF LLaDA folder, ready to evaluate (`load_model_and_step`).

  tokenizer: a tokenizer.json for checkpoints without a bundled vocabulary (default: the one in an
  HF folder or workdir, or the config's data.tokenizer).
  """
  step, config, params = load_model_and_step(path, tokenizer)
  return eval_model_from_params(config, params, text_codec(config), step, str(path))


def eval_model_from_params(
    config: ml_collections.ConfigDict, params: Any, codec: Any, step: int | None, path: str
) -> EvalModel:
  """An EvalModel of in-memory parameters (e.g. the trainer's), replicated on this host's devices.

  The parameters must be addressable by this process (true in single-process runs).
  """
  mesh = Mesh(np.asarray(jax.local_devices()), (ITEMS,))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))
  return EvalModel(config, params, codec, mesh, step, path)
