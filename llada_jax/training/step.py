"""The compiled train and eval steps, with explicit input and output shardings."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh

from llada_jax.config import block_size_at, block_sizes, objective_of
from llada_jax.keys import Stream
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model.moe import balance_expert_bias
from llada_jax.parallel.sharding import axis_rules, batch_sharding, mesh_context, replicated
from llada_jax.training.optimizer import learning_rate_schedule
from llada_jax.training.state import TrainState

Metrics = dict[str, jax.Array]
Batch = dict[str, jax.Array]  # model features, see llada_jax.data.features


def step_rng(config: ml_collections.ConfigDict, step: jax.Array, stream: int) -> jax.Array:
  """The key of one step: fold_in(seed) by stream (`llada_jax.keys.Stream`) then by step."""
  return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(config.seed), stream), step)


def make_train_step(
    config: ml_collections.ConfigDict,
    model: MaskedDiffusionLM,
    tx: optax.GradientTransformation,
    mesh: Mesh,
    shardings: Any,
    loss: Callable[..., tuple[jax.Array, Metrics]] | None = None,
    frozen_shardings: Any = None,
) -> Callable[..., tuple[TrainState, Metrics]]:
  """jit(state, batch, step=0, frozen=None) -> (new state, metrics); the state's buffers are
  donated. The Python int `step` picks the block size of a `diffusion.block_size_schedule` (one
  compiled program per size, each compiled when first used); other objectives ignore it.

  loss(params, batch, rng, block_size, frozen) -> (scalar loss, metrics): what the step
  minimises (`llada_jax.training.sources`; default: the objective's bound, `model.loss`).
  frozen: parameters every step reads and never updates (a post-training reference), placed as
  `frozen_shardings`; None without."""
  objective = loss or (
      lambda params, batch, rng, block_size, frozen: model.loss(
          params, batch, rng, block_size=block_size or None
      )
  )
  rules = axis_rules(config)
  schedule = learning_rate_schedule(config)

  inject = config.train.inject_nan_at_step

  accum = config.train.grad_accum_steps

  blocks = objective_of(config).blocks
  bias_rate = config.model.moe.bias_update_rate if config.model.moe.num_experts else 0.0

  def loss_fn(
      params: Any,
      state: TrainState,
      batch: Batch,
      frozen: Any,
      micro: jax.Array | int = 0,
      block_size: int = 0,
  ) -> tuple[jax.Array, Metrics]:
    rng = step_rng(config, state.step, stream=Stream.TRAIN)
    if accum > 1:  # each micro-batch draws its own noise (device masking)
      rng = jax.random.fold_in(rng, micro)
    loss, metrics = objective(params, batch, rng, block_size, frozen)
    if inject >= 0:  # test knob: a divergence at one step that a cut learning rate avoids
      loss = loss * jnp.where((state.step == inject) & (state.lr_scale == 1.0), jnp.nan, 1.0)
    return loss, metrics

  def gradients(
      state: TrainState, batch: Batch, frozen: Any, block_size: int
  ) -> tuple[tuple[jax.Array, Metrics], Any]:
    """Loss, metrics and gradients of the batch: at once, or as the mean over `accum`
    micro-batches (rows j, j + accum, ... form micro-batch j, so every device holds a share of
    each and the data sharding is kept)."""
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, block_size=block_size), argnums=0, has_aux=True
    )
    if accum == 1:
      return grad_fn(state.params, state, batch, frozen)
    micro_batches = jax.tree.map(
        lambda x: jnp.swapaxes(x.reshape((x.shape[0] // accum, accum) + x.shape[1:]), 0, 1), batch
    )

    def body(total, inputs):
      index, micro_batch = inputs
      value = grad_fn(state.params, state, micro_batch, frozen, index)
      return jax.tree.map(lambda t, v: t + v / accum, total, value), None

    zero = jax.tree.map(
        jnp.zeros_like,
        jax.eval_shape(
            grad_fn, state.params, state, jax.tree.map(lambda x: x[0], micro_batches), frozen, 0
        ),
    )
    total, _ = jax.lax.scan(body, zero, (jnp.arange(accum), micro_batches))
    return total

  def train_step(
      state: TrainState, batch: Batch, frozen: Any, block_size: int
  ) -> tuple[TrainState, Metrics]:
    (loss, metrics), grads = gradients(state, batch, frozen, block_size)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = jax.tree.map(lambda u: u * state.lr_scale.astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    if bias_rate and "router/load" in metrics:
      params = balance_expert_bias(params, metrics["router/load"], bias_rate)

    def keep(new: Any, old: Any) -> Any:
      """A non-finite step changes nothing but the counters (its batch counts as consumed)."""
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    metrics = dict(
        metrics,
        loss=loss,
        grad_norm=grad_norm,
        nonfinite=~finite,
        learning_rate=schedule(state.step) * state.lr_scale,
    )
    return (
        state.replace(
            step=state.step + 1,
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            skipped=state.skipped + (~finite).astype(jnp.int32),
        ),
        metrics,
    )

  jitted = {
      size: jax.jit(
          functools.partial(train_step, block_size=size),
          in_shardings=(shardings, batch_sharding(mesh, rules), frozen_shardings),
          out_shardings=(shardings, replicated(mesh)),
          donate_argnums=0,
      )
      for size in (block_sizes(config) if blocks else (0,))
  }
  final = config.diffusion.block_size if blocks else 0

  def run(
      state: TrainState, batch: Batch, step: int = 0, frozen: Any = None
  ) -> tuple[TrainState, Metrics]:
    with mesh_context(mesh, rules):
      return jitted[block_size_at(config, step) if blocks else 0](state, batch, frozen)

  def lower(state: Any, batch: Any, frozen: Any = None) -> jax.stages.Lowered:
    with mesh_context(mesh, rules):
      return jitted[final].lower(state, batch, frozen)

  run.lower = lower  # ahead-of-time compilation from abstract arguments (llada-compile)
  return run


def make_eval_step(
    config: ml_collections.ConfigDict, model: MaskedDiffusionLM, mesh: Mesh, param_shardings: Any
) -> Callable[[Any, Batch, int], jax.Array]:
  """jit(params, batch, batch_index) -> loss bound (nats/token) on full-length sequences.

  The noise of batch i is the same at every evaluation, so successive evaluations are comparable.
  """
  rules = axis_rules(config)

  def eval_step(params: Any, batch: Batch, index: jax.Array) -> jax.Array:
    _, metrics = model.loss(
        params,
        batch,
        step_rng(config, index, stream=Stream.EVAL),
        random_length_prob=0.0,
        exact=True,
    )
    return metrics["loss"]  # the bound alone: no router losses (MoE) or training terms

  jitted = jax.jit(
      eval_step,
      in_shardings=(param_shardings, batch_sharding(mesh, rules), None),
      out_shardings=replicated(mesh),
  )

  def run(params: Any, batch: Batch, index: int) -> jax.Array:
    with mesh_context(mesh, rules):
      return jitted(params, batch, index)

  return run
