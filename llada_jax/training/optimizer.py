"""AdamW with the Warmup-Stable-Decay schedule of LLaDA, and global-norm gradient clipping."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

NORM_MODULES = ("attn_norm", "ff_norm", "ln_f", "q_norm", "k_norm")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Warm-up 0 -> peak, hold (optionally stepping down once), then linear decay to final_lr.

  With lr_drop_step = 0 this is the usual WSD schedule; LLaDA-8B held 4e-4, stepped down to 1e-4 and
  decayed to 1e-5 over the last 0.3T of 2.3T tokens.
  """
  o = config.optimizer
  num_steps = config.train.num_steps
  decay_steps = int(round(o.decay_fraction * num_steps))
  decay_start = num_steps - decay_steps
  dropped = 0 < o.lr_drop_step <= decay_start
  stable_at_decay = o.lr_after_drop if dropped else o.peak_lr

  def schedule(step: jax.Array) -> jax.Array:
    step = jnp.asarray(step, jnp.float32)
    warmup = o.peak_lr * step / max(o.warmup_steps, 1)
    stable = (
        jnp.where(step >= o.lr_drop_step, o.lr_after_drop, o.peak_lr)
        if o.lr_drop_step > 0
        else jnp.float32(o.peak_lr)
    )
    progress = jnp.clip((step - decay_start) / max(decay_steps, 1), 0.0, 1.0)
    decay = stable_at_decay + (o.final_lr - stable_at_decay) * progress
    return jnp.where(step < o.warmup_steps, warmup, jnp.where(step < decay_start, stable, decay))

  return schedule


def weight_decay_mask(params: Any) -> Any:
  """True for every parameter except the RMSNorm weights and the MoE routers' `expert_bias`
  (no gradient reaches it, so AdamW leaves it alone; `llada_jax.model.moe.balance_expert_bias`
  moves it)."""

  def decays(path, _) -> bool:
    names = {getattr(k, "key", getattr(k, "name", None)) for k in path}
    return not names & {*NORM_MODULES, "expert_bias"}

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Clip by global norm (if grad_clip_norm > 0), then AdamW on the WSD schedule."""
  o = config.optimizer
  adamw = optax.adamw(
      learning_rate_schedule(config),
      b1=o.b1,
      b2=o.b2,
      eps=o.adam_eps,
      weight_decay=o.weight_decay,
      mask=weight_decay_mask,
  )
  if o.grad_clip_norm > 0:
    return optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), adamw)
  return adamw
