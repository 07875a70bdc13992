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

from llada_jax.diffusion.masking import forward_process, random_length

ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]  # (tokens, attention_mask) -> logits


def masked_diffusion_loss(logits: jax.Array, targets: jax.Array, masked: jax.Array,
                          p_mask: jax.Array, num_tokens: jax.Array | int) -> jax.Array:
  """Sum of CE / p over masked positions, divided by `num_tokens` (batch x length).

  logits [B, L, V] (cast to float32), targets [B, L], masked bool [B, L], p_mask [B].
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  weighted = jnp.where(masked, ce / p_mask[:, None], 0.0)
  return jnp.sum(weighted) / num_tokens


def pretraining_loss(apply_fn: ApplyFn, tokens: jax.Array, rng: jax.Array, *, mask_id: int,
                     eps: float, random_length_prob: float,
                     time_sampling: str = "uniform") -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLaDA pre-training loss on clean `tokens` [B, L], with the random-length cut.

  Returns the loss (nats per token, an upper bound on -log p / token) and metrics.
  """
  len_key, noise_key = jax.random.split(rng)
  batch, seq_len = tokens.shape
  length = random_length(len_key, seq_len, random_length_prob)
  valid = jnp.broadcast_to(jnp.arange(seq_len) < length, tokens.shape)
  noised = forward_process(noise_key, tokens, mask_id=mask_id, eps=eps, valid=valid,
                           time_sampling=time_sampling)
  logits = apply_fn(noised.tokens, valid)
  loss = masked_diffusion_loss(logits, tokens, noised.masked, noised.p_mask, batch * length)
  metrics = {"loss": loss,
             "masked_fraction": jnp.sum(noised.masked) / (batch * length),
             "length": length}
  return loss, metrics


def sft_loss(apply_fn: ApplyFn, tokens: jax.Array, prompt_lengths: jax.Array, rng: jax.Array, *,
             mask_id: int, eps: float,
             time_sampling: str = "uniform") -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLaDA SFT loss on prompt ++ response (EOS-padded to L) with prompt_lengths [B].

  The prompt is never masked; masked response tokens (EOS padding included) are weighted by 1/p
  and each sequence is normalised by its response length L - prompt_length.
  """
  batch, seq_len = tokens.shape
  is_response = jnp.arange(seq_len)[None, :] >= prompt_lengths[:, None]
  noised = forward_process(rng, tokens, mask_id=mask_id, eps=eps, valid=is_response,
                           time_sampling=time_sampling)
  logits = apply_fn(noised.tokens, jnp.ones(tokens.shape, bool))
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
  per_token = jnp.where(noised.masked, ce / noised.p_mask[:, None], 0.0)
  response_len = jnp.maximum(seq_len - prompt_lengths, 1).astype(jnp.float32)
  loss = jnp.mean(jnp.sum(per_token, axis=-1) / response_len)
  return loss, {"loss": loss, "masked_fraction": jnp.sum(noised.masked) / jnp.sum(is_response)}


def autoregressive_loss(apply_fn: ApplyFn, tokens: jax.Array) -> tuple[jax.Array,
                                                                       dict[str, jax.Array]]:
  """Next-token cross-entropy (nats per predicted token) of a causal model on `tokens` [B, L]."""
  logits = apply_fn(tokens, jnp.ones(tokens.shape, bool))[:, :-1]
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
  loss = jnp.mean(ce)
  return loss, {"loss": loss}
