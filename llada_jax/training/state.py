"""The train state and its creation directly into the shardings the logical axis rules give:
random parameters, or those of an autoregressive HF folder (train.init_from)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from llada_jax.checkpoint import PARAMETER_FIELDS
from llada_jax.config import default_config
from llada_jax.errors import ConfigError
from llada_jax.keys import Stream
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.sharding import abstract_on_mesh, axis_rules

# The model fields a train.init_from folder must share with the config: the parameter shapes
# (the layer layout aside: the import builds either) and what the weights were trained with.
INIT_FROM_FIELDS = tuple(f for f in PARAMETER_FIELDS if f != "scan_layers") + (
    "rope_theta",
    "rms_norm_eps",
)


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue training exactly.

  lr_scale multiplies the schedule (cut at each rollback after a non-finite step), rollbacks counts
  them and skipped counts the updates skipped for a non-finite loss or gradient.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  lr_scale: jax.Array
  rollbacks: jax.Array
  skipped: jax.Array

  @classmethod
  def fresh(cls, params: Any, opt_state: Any) -> TrainState:
    """The state at step 0."""
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        lr_scale=jnp.ones((), jnp.float32),
        rollbacks=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def _init_boxed(
    model: MaskedDiffusionLM, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  """Initial state whose leaves still carry their logical axis names."""
  params = model.init(rng)
  return TrainState.fresh(params, tx.init(params))


def state_shardings(
    config: ml_collections.ConfigDict,
    model: MaskedDiffusionLM,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[Any, Any]:
  """(abstract state of ShapeDtypeStructs carrying shardings, tree of NamedShardings)."""
  boxed = jax.eval_shape(lambda r: _init_boxed(model, tx, r), jax.random.PRNGKey(0))
  abstract = abstract_on_mesh(boxed, mesh, axis_rules(config))
  return abstract, jax.tree.map(lambda a: a.sharding, abstract)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: MaskedDiffusionLM,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[TrainState, Any]:
  """Initialises parameters and optimizer state, each created already sharded on `mesh`: the
  parameters random (config.seed) or, with train.init_from, that folder's (`imported_params`).

  Raises:
    ConfigError, CheckpointError: as imported_params.
  """
  _, shardings = state_shardings(config, model, tx, mesh)
  if config.train.init_from:
    params = imported_params(config, shardings.params)
    fresh = jax.jit(
        lambda p: TrainState.fresh(p, tx.init(p)), out_shardings=shardings, donate_argnums=0
    )
    logging.info("initialised the parameters from train.init_from=%s", config.train.init_from)
    return fresh(params), shardings
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.INIT)
  init = jax.jit(lambda r: nn.meta.unbox(_init_boxed(model, tx, r)), out_shardings=shardings)
  return init(rng), shardings


def imported_params(config: ml_collections.ConfigDict, shardings: Any = None) -> Any:
  """The parameters of config.train.init_from, a Llama/Mistral HF folder (the one import path,
  interop.llama.load_llama), in model.param_dtype, each placed in `shardings` (a tree of
  NamedShardings) as it is read.

  The mask token is an existing token when tokens.mask_id is below config.json's vocab_size, else
  the appended row (as `llada-convert from-hf` with / without --mask_id). model.causal is the
  config's (the objective's), not the imported causal model's: the AR network becomes the mask
  predictor.

  Raises:
    ConfigError: a model field of INIT_FROM_FIELDS differs from the folder's (checked before any
      tensor is read), or the import's ConfigErrors.
    CheckpointError: a folder that cannot be imported.
  """
  from llada_jax.interop.llama import (  # pylint: disable=g-import-not-at-top
      load_llama,
      read_llama_config,
  )

  path = config.train.init_from
  base = default_config()
  base.model.update(config.model.to_dict())  # the layer layout (scan_layers) to build
  hf_vocab = read_llama_config(path).model.vocab_size - 1  # without the appended mask row
  mask_id = config.tokens.mask_id if config.tokens.mask_id < hf_vocab else None
  imported = read_llama_config(path, base, mask_id).model
  for field in INIT_FROM_FIELDS:
    if config.model[field] != imported[field]:
      appended = field == "vocab_size" and mask_id is None
      raise ConfigError(
          f"model.{field}={config.model[field]!r} is not allowed with train.init_from={path}: "
          f"the imported model has {imported[field]!r}"
          + (" (config.json's vocab_size plus the appended mask row)" if appended else "")
      )
  dtype = config.model.param_dtype
  return load_llama(path, mask_id=mask_id, dtype=dtype, base=base, shardings=shardings)[1]
