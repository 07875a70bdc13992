"""The frozen reference model of a post-training run (posttrain.reference: a training workdir or
an HF folder), kept beside the train state, never inside it: checkpoints hold the policy only
(and keep their layout), and a resumed run reads the reference again from where it lives.

The policy is the reference's network: a run takes the reference's model, token ids, objective
and vocabulary (`config_with_reference`), keeping only how to compute (model.dtype, remat,
attention kernel) from its own config; a new run starts its policy from the reference's
parameters.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from llada_jax import loading
from llada_jax.config import take_fields, validate
from llada_jax.errors import ConfigError

# What a run computes with, its own whatever the reference was trained with.
COMPUTE_FIELDS = ("dtype", "remat", "attention")
# What the run takes from the reference besides the model section.
TAKEN = (
    "tokens",
    "diffusion.objective",
    "diffusion.block_size",
    "diffusion.block_size_schedule",
    "diffusion.logit_alignment",
    "data.vocabulary",
    "data.tokenizer",
    "data.sequence_length",
)


def reference_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The stored config of posttrain.reference (read without any parameter).

  Raises:
    ConfigError: no reference named, or nothing there to read.
    CheckpointError: a stored config this version cannot use.
  """
  path = config.posttrain.reference
  if not path:
    raise ConfigError(
        f"posttrain.reference='' is not allowed with posttrain.method={config.posttrain.method!r}: "
        "expected the workdir or HF folder of the model to start from"
    )
  stored = loading.stored_config(path)
  if stored is None:
    raise ConfigError(
        f"posttrain.reference={path} is not allowed: it holds no checkpoint or config.json"
    )
  return stored


def config_with_reference(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` with the reference's model (COMPUTE_FIELDS kept) and TAKEN fields; each change is
  logged. Raises as `reference_config`, and ConfigError for train.init_from set as well (the
  policy starts from the reference)."""
  if config.train.init_from:
    raise ConfigError(
        f"train.init_from={config.train.init_from} is not allowed with posttrain.method="
        f"{config.posttrain.method!r}: the policy starts from posttrain.reference"
    )
  reference = ml_collections.ConfigDict(reference_config(config).to_dict())
  reference.model.update({f: config.model[f] for f in COMPUTE_FIELDS})
  out, changed = take_fields(config, reference, ("model",) + TAKEN)
  if changed:
    logging.info(
        "posttrain.reference=%s: the run takes the reference's %s",
        config.posttrain.reference,
        "; ".join(changed),
    )
  return validate(out)


def reference_params(config: ml_collections.ConfigDict, shardings: Any) -> Any:
  """The reference's parameters, placed as the policy's (`shardings`: the train state's param
  shardings, which may span several processes), in model.param_dtype.

  Raises:
    ConfigError, CheckpointError: as `loading.load_model`, or a reference whose parameters are
      not the run's model's.
  """
  stored, params = loading.load_model(config.posttrain.reference)
  want = jax.tree.structure(shardings)
  if jax.tree.structure(params) != want:
    raise ConfigError(
        f"posttrain.reference={config.posttrain.reference} is not allowed: its parameters are "
        f"not those of the run's model (model.scan_layers={config.model.scan_layers}, the "
        f"reference has {stored.model.scan_layers})"
    )
  dtype = jnp.dtype(config.model.param_dtype)

  def place(p: Any, sharding: Any) -> jax.Array:  # each process puts its own blocks
    host = np.asarray(jax.device_get(p)).astype(dtype)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  return jax.tree.map(place, params, shardings)
