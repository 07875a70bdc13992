"""The train state and its creation directly into the shardings the logical axis rules give."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from llada_jax.keys import Stream
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.sharding import abstract_on_mesh, axis_rules


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
  """Initialises parameters and optimizer state, each created already sharded on `mesh`."""
  _, shardings = state_shardings(config, model, tx, mesh)
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.INIT)
  init = jax.jit(lambda r: nn.meta.unbox(_init_boxed(model, tx, r)), out_shardings=shardings)
  return init(rng), shardings
