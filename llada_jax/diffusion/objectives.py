"""Training objectives: LLaDA pre-training and SFT losses, and the autoregressive baseline.

Pre-training (an upper bound on the negative log-likelihood per token):
  L = sum over masked positions of CE(logits_i, x_i) / p   /  (batch * sequence length).
SFT: the prompt is never masked; each sequence's sum is divided by its response length (EOS padding
included), then averaged over the batch. ARM: next-token cross-entropy of the causal model.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from llada_jax.diffusion.masking import noise_batch

ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]  # (tokens, attention_mask) -> logits


def masked_diffusion_loss(
    logits: jax.Array,
    targets: jax.Array,
    masked: jax.Array,
    p_mask: jax.Array,
    num_tokens: jax.Array | int,
) -> jax.Array:
  """Sum of CE / p over masked positions, divided by `num_tokens` (batch x length).

  logits [B, L, V] (cast to float32), targets [B, L], masked bool [B, L], p_mask [B].
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weighted = jnp.where(masked, ce / p_mask[:, None], 0.0)
  return jnp.sum(weighted) / num_tokens


def diffusion_loss(
    logits: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The LLaDA loss of a noised feature batch (targets, masked, p_mask, valid[, prompt_length]).

  Pre-training: the CE / p sum over masked positions divided by the number of tokens in the
  sequences (batch x length when nothing is padded or cut). SFT (prompt_length present): each
  sequence's sum divided by its response length, EOS padding included, then the batch mean.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  return diffusion_loss_from_ce(ce, batch)


def diffusion_loss_from_ce(
    ce: jax.Array, batch: dict[str, jax.Array]
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """diffusion_loss given the cross-entropy of every position, ce [B, L] (e.g. computed in chunks
  by chunked_cross_entropy)."""
  per_token = jnp.where(batch["masked"], ce / batch["p_mask"][:, None], 0.0)
  seq_len = batch["targets"].shape[1]
  metrics = {}
  if "prompt_length" in batch:
    response_len = jnp.maximum(seq_len - batch["prompt_length"], 1).astype(jnp.float32)
    loss = jnp.mean(jnp.sum(per_token, axis=-1) / response_len)
    maskable = jnp.sum(response_len)
  else:
    maskable = jnp.maximum(jnp.sum(batch["valid"]), 1)
    loss = jnp.sum(per_token) / maskable
    metrics["length"] = maskable / batch["targets"].shape[0]
  return loss, dict(metrics, loss=loss, masked_fraction=jnp.sum(batch["masked"]) / maskable)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    chunk: int,
    dtype: jnp.dtype = jnp.float32,
) -> jax.Array:
  """CE [B, L] of logits = hidden @ head, `chunk` positions at a time, without full logits.

  hidden [B, L, d] (after the final norm), head [d, V], targets [B, L]; L a multiple of chunk.
  Each chunk's logits (in `dtype`, softmax in float32) are recomputed in the backward pass, so
  memory holds B x chunk x V logits instead of B x L x V (126k vocabulary: 2 GB per 4096-token
  sequence in float32).
  """
  batch, length, width = hidden.shape
  chunks = hidden.reshape(batch, length // chunk, chunk, width).swapaxes(0, 1)
  labels = targets.reshape(batch, length // chunk, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(h: jax.Array, y: jax.Array) -> jax.Array:
    logits = jnp.einsum("bcd,dv->bcv", h.astype(dtype), head.astype(dtype))
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)

  ce = jax.lax.map(lambda args: one(*args), (chunks, labels))
  return ce.swapaxes(0, 1).reshape(batch, length)


def unpacked_batch(tokens: jax.Array, **extra: jax.Array) -> dict[str, jax.Array]:
  """The feature batch of unpacked full-length rows `tokens` [B, L] (one segment each, no cut)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return dict(
      targets=tokens,
      valid=jnp.ones(tokens.shape, bool),
      positions=positions,
      segment_ids=jnp.ones(tokens.shape, jnp.int32),
      **extra,
  )


def pretraining_loss(
    apply_fn: ApplyFn,
    tokens: jax.Array,
    rng: jax.Array,
    *,
    mask_id: int,
    eps: float,
    random_length_prob: float,
    time_sampling: str = "uniform",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLaDA pre-training loss on clean `tokens` [B, L], with the random-length cut.

  Returns the loss (nats per token, an upper bound on -log p / token) and metrics.
  """
  batch = noise_batch(
      rng,
      unpacked_batch(tokens),
      mask_id=mask_id,
      eps=eps,
      random_length_prob=random_length_prob,
      time_sampling=time_sampling,
  )
  return diffusion_loss(apply_fn(batch["inputs"], batch["valid"]), batch)


def sft_loss(
    apply_fn: ApplyFn,
    tokens: jax.Array,
    prompt_lengths: jax.Array,
    rng: jax.Array,
    *,
    mask_id: int,
    eps: float,
    time_sampling: str = "uniform",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLaDA SFT loss on prompt ++ response (EOS-padded to L) with prompt_lengths [B].

  The prompt is never masked; masked response tokens (EOS padding included) are weighted by 1/p
  and each sequence is normalised by its response length L - prompt_length.
  """
  batch = noise_batch(
      rng,
      unpacked_batch(tokens, prompt_length=prompt_lengths),
      mask_id=mask_id,
      eps=eps,
      random_length_prob=0.0,
      time_sampling=time_sampling,
  )
  return diffusion_loss(apply_fn(batch["inputs"], batch["valid"]), batch)


def autoregressive_loss(
    apply_fn: ApplyFn, tokens: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Next-token cross-entropy (nats per predicted token) of a causal model on `tokens` [B, L]."""
  logits = apply_fn(tokens, jnp.ones(tokens.shape, bool))[:, :-1]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
  loss = jnp.mean(ce)
  return loss, {"loss": loss}
