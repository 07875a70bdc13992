"""diffu-GRPO (d1, Zhao et al. 2025, arXiv 2504.12216): group-relative policy optimisation for a
masked diffusion LM, with d1's one-pass estimate of the per-token log-probabilities.

For each prompt q, G answers o_1..o_G are sampled from the policy (the compiled sampler) and
scored by a reward r_i. The advantage of answer i is group-relative,
A_i = (r_i - mean_j r_j) / (std_j r_j + eps). Per-token log-probabilities come from ONE forward
pass over [q' ; all-mask answer], q' the prompt with each token masked with probability
`prompt_mask_prob` (d1: 0.15; a fresh mask per update): log pi(o_ik | q') at every answer position
k, a mean-field stand-in for the intractable sequence likelihood. The loss of answer i (d1 Eq. 3):

  L_i = -(1/|o_i|) sum_k [ min(rho_ik A_i, clip(rho_ik, 1 - eps, 1 + eps) A_i) - beta KL_ik ],
  rho_ik = exp(log pi_theta(o_ik) - log pi_old(o_ik)),
  KL_ik = exp(log pi_ref - log pi_theta) - (log pi_ref - log pi_theta) - 1   (k3 estimator),

averaged over the answers of the batch. |o_i| counts the answer's tokens up to and including its
first end token (what follows it is not the policy's choice). A block diffusion model's per-token
log-probabilities come from the block-level one pass of EBPO (LLaDA 2.1): the two-stream pass
with the whole answer masked, each token predicted from its block and the clean blocks before it
(`token_log_probs`).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from llada_jax.config import objective_of
from llada_jax.diffusion import alignment
from llada_jax.diffusion.objectives import Metrics, with_router_losses
from llada_jax.model import apply_model, network, positions_from_mask
from llada_jax.model.forward import head_logits, two_stream_hidden
from llada_jax.model.transformer import ModelConfig, RouterStats


class Rollouts(NamedTuple):
  """A batch of sampled answers, one row per (prompt, sample): tokens int32 [R, P + A] (the
  left-padded prompt, then the answer), valid bool [R, P + A] (the prompt's padding False),
  is_answer bool [R, P + A] (answer tokens up to and including the first end token),
  advantages float32 [R], mask_keys [R, 2] (the prompt masks of the log-probability pass), rewards
  float32 [R]; old_logp float32 [R, P + A]: the sampling policy's `token_log_probs` under this
  update's prompt masks, with posttrain.inner_updates > 1 (None: one update per rollout batch,
  whose sampling policy is the policy being updated)."""

  tokens: jax.Array
  valid: jax.Array
  is_answer: jax.Array
  advantages: jax.Array
  mask_keys: jax.Array
  rewards: jax.Array
  old_logp: jax.Array | None = None


def group_advantages(rewards: jax.Array, eps: float = 1e-4) -> jax.Array:
  """A_i = (r_i - mean(r)) / (std(r) + eps) within each group: rewards [num_prompts, G] ->
  advantages [num_prompts, G] (GRPO, arXiv 2402.03300 Sec. 4.1.2; 0 for a group of equal
  rewards)."""
  mean = rewards.mean(axis=-1, keepdims=True)
  std = rewards.std(axis=-1, keepdims=True)
  return (rewards - mean) / (std + eps)


def answer_mask(tokens: jax.Array, answer_start: int, end_ids: jax.Array) -> jax.Array:
  """bool [R, T]: positions >= answer_start up to and including the row's first end token (all
  of the answer when it has none)."""
  positions = jnp.arange(tokens.shape[1])
  in_answer = positions[None, :] >= answer_start
  is_end = in_answer & jnp.isin(tokens, end_ids)
  ended_before = jnp.cumsum(is_end, axis=1) - is_end  # end tokens strictly before the position
  return in_answer & (ended_before == 0)


def token_log_probs(
    model_cfg: ModelConfig,
    params: Any,
    rollouts: Rollouts,
    answer_start: int,
    mask_id: int,
    prompt_mask_prob: float,
    *,
    block_size: int = 0,
    shifted: bool = False,
    return_aux: bool = False,
) -> Any:
  """One-pass per-token log-probabilities log pi(o_k | q') [R, T] float32 (0 off
  rollouts.is_answer): every position from answer_start on masked, each prompt token masked
  with probability prompt_mask_prob by the row's mask key (the uniforms indexed by the position
  counted from the row's first real token, so left padding does not move them).

  block_size 0 (an MDM): d1's pass over [q' ; all-mask answer]. block_size B (a block diffusion
  model): the block-level one-pass of EBPO (LLaDA 2.1), the two-stream pass with every answer
  token masked in the noisy stream, so o_k is predicted from its masked block and the clean
  blocks before it (the block NELBO's term at t = 1; with B = 1 the exact chain rule), blocks
  counted from the row's first real token as in training and sampling; q' masked in both
  streams. shifted: the shifted logit alignment (`llada_jax.diffusion.alignment`).
  return_aux: (log-probabilities, the MoE router statistics of the pass; {} for a dense model)."""
  width = rollouts.tokens.shape[1]
  index = jnp.arange(width)[None, :]
  first = jnp.argmax(rollouts.valid, axis=1)[:, None]  # the row's first real token

  def from_first(x: jax.Array) -> jax.Array:  # [R, T] re-indexed from the first real token
    return jnp.take_along_axis(x, jnp.clip(index + first, 0, width - 1), axis=1)

  def back(x: jax.Array) -> jax.Array:  # the inverse, 0 where the left padding was
    return jnp.where(
        index >= first, jnp.take_along_axis(x, jnp.clip(index - first, 0, width - 1), axis=1), 0
    )

  tokens, answer_region = from_first(rollouts.tokens), from_first(index >= answer_start)
  valid = from_first(rollouts.valid) & (index < width - first)
  uniforms = jax.vmap(lambda k: jax.random.uniform(k, (width,)))(rollouts.mask_keys)
  masked_prompt = valid & ~answer_region & (uniforms < prompt_mask_prob)
  noisy = jnp.where(masked_prompt | answer_region, mask_id, tokens)
  positions = positions_from_mask(valid)
  dtype = jnp.dtype(model_cfg.dtype)
  if block_size:
    clean = jnp.where(masked_prompt, mask_id, tokens)
    hidden, router = two_stream_hidden(
        model_cfg,
        params,
        noisy,
        clean,
        valid,
        positions,
        None,
        block_size=block_size,
        shifted=shifted,
        return_aux=True,
    )
    logits = head_logits(params, hidden, dtype)
  else:
    logits, router = apply_model(network(model_cfg), params, noisy, valid, return_aux=True)
    if shifted:
      logits = alignment.shift(logits, positions)
  logp = -optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
  logp = jnp.where(rollouts.is_answer, back(logp), 0.0)
  return (logp, router) if return_aux else logp


class GRPOTerms(NamedTuple):
  """Means over the answers: the loss, the clipped-objective part, the KL to the reference, the
  fraction of answer tokens whose ratio was clipped, the mean answer length, and the mean ratio
  pi / pi_old over answer tokens (1 at a rollout batch's first update)."""

  loss: jax.Array
  objective: jax.Array
  kl: jax.Array
  clipped: jax.Array
  length: jax.Array
  ratio: jax.Array


def grpo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    ref_logp: jax.Array,
    is_answer: jax.Array,
    advantages: jax.Array,
    clip_eps: float,
    kl_beta: float,
) -> GRPOTerms:
  """d1's loss from per-token log-probabilities [R, T] of the policy, the policy that sampled
  (old) and the reference (see the module docstring); is_answer [R, T] bool, advantages [R]."""
  ratio = jnp.exp(logp - old_logp)
  a = advantages[:, None]
  surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps) * a)
  diff = ref_logp - logp
  kl = jnp.exp(diff) - diff - 1.0
  count = jnp.maximum(is_answer.sum(axis=1), 1)

  def per_answer(x):
    return jnp.where(is_answer, x, 0.0).sum(axis=1) / count

  objective = per_answer(surrogate)
  kl_answer = per_answer(kl)
  clipped = per_answer(((ratio < 1.0 - clip_eps) | (ratio > 1.0 + clip_eps)).astype(jnp.float32))
  return GRPOTerms(
      loss=(-(objective - kl_beta * kl_answer)).mean(),
      objective=objective.mean(),
      kl=kl_answer.mean(),
      clipped=clipped.mean(),
      length=is_answer.sum(axis=1).mean(),
      ratio=per_answer(ratio).mean(),
  )


def policy_log_probs(
    config: Any, width: int
) -> Callable[[Any, Rollouts], tuple[jax.Array, RouterStats]]:
  """logp(params, rollouts) -> (`token_log_probs` [R, T] of config's model for rollouts whose
  prompts are `width` tokens wide, the router statistics of the pass): the one pass the update
  scores the policy, the sampling policy and the reference with."""
  p, cfg, mask_id = config.posttrain, ModelConfig.from_config(config), config.tokens.mask_id
  model_block = config.diffusion.block_size if objective_of(config).blocks else 0
  shifted = alignment.resolve(config) == "shifted"

  def logp(params: Any, rollouts: Rollouts) -> tuple[jax.Array, RouterStats]:
    return token_log_probs(
        cfg,
        params,
        rollouts,
        width,
        mask_id,
        p.prompt_mask_prob,
        block_size=model_block,
        shifted=shifted,
        return_aux=True,
    )

  return logp


def grpo_objective(config: Any, width: int) -> Callable[..., tuple[jax.Array, Metrics]]:
  """The train step's loss of posttrain.method="grpo" for rollouts whose prompts are `width`
  tokens wide: loss(params, rollouts, rng, block_size, frozen) -> (d1's loss against the
  reference `frozen` (`grpo_loss`; the sampling policy's log-probabilities are the rollouts'
  old_logp, or with one update per rollout batch the policy's own), metrics: the batch's mean
  reward and the terms' means; a MoE policy's router terms join as in pre-training,
  `with_router_losses`). rng and block_size are unused: the rollouts carry their prompt-mask
  keys."""
  p = config.posttrain
  logp = policy_log_probs(config, width)

  def loss(
      params: Any, batch: Rollouts, rng: jax.Array, block_size: int, frozen: Any
  ) -> tuple[jax.Array, Metrics]:
    del rng, block_size
    policy, router = logp(params, batch)
    old = jax.lax.stop_gradient(policy) if batch.old_logp is None else batch.old_logp
    terms = grpo_loss(
        policy,
        old,
        logp(jax.lax.stop_gradient(frozen), batch)[0],
        batch.is_answer,
        batch.advantages,
        p.clip_eps,
        p.kl_beta,
    )
    metrics = {
        "grpo/reward": batch.rewards.mean(),
        "grpo/objective": terms.objective,
        "grpo/kl": terms.kl,
        "grpo/clipped": terms.clipped,
        "grpo/answer_length": terms.length,
        "grpo/ratio": terms.ratio,
    }
    return with_router_losses(config, terms.loss, metrics, router, "mean")

  return loss


def abstract_rollouts(config: Any, width: int, sharding: Any) -> Rollouts:
  """ShapeDtypeStructs of a rollout batch (data.batch_size rows of `width` prompt tokens and
  sampling.gen_length answer tokens), rows placed by `sharding`: what `llada-compile` compiles
  the GRPO update on."""
  rows, length = config.data.batch_size, width + config.sampling.gen_length

  def spec(shape: tuple[int, ...], dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  return Rollouts(
      tokens=spec((rows, length), jnp.int32),
      valid=spec((rows, length), jnp.bool_),
      is_answer=spec((rows, length), jnp.bool_),
      advantages=spec((rows,), jnp.float32),
      mask_keys=spec((rows, 2), jnp.uint32),
      rewards=spec((rows,), jnp.float32),
      old_logp=spec((rows, length), jnp.float32) if config.posttrain.inner_updates > 1 else None,
  )
