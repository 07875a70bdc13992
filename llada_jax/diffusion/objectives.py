"""Training objectives of the mask predictor.

The pre-training loss is the LLaDA upper bound on the negative log-likelihood:
  L = sum over masked positions of CE(logits_i, x_i) / p   /  (batch * sequence length).
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
                     eps: float, random_length_prob: float) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLaDA pre-training loss on clean `tokens` [B, L], with the random-length cut.

  Returns the loss (nats per token, an upper bound on -log p / token) and metrics.
  """
  len_key, noise_key = jax.random.split(rng)
  batch, seq_len = tokens.shape
  length = random_length(len_key, seq_len, random_length_prob)
  valid = jnp.broadcast_to(jnp.arange(seq_len) < length, tokens.shape)
  noised = forward_process(noise_key, tokens, mask_id=mask_id, eps=eps, valid=valid)
  logits = apply_fn(noised.tokens, valid)
  loss = masked_diffusion_loss(logits, tokens, noised.masked, noised.p_mask, batch * length)
  metrics = {"loss": loss,
             "masked_fraction": jnp.sum(noised.masked) / (batch * length),
             "length": length}
  return loss, metrics
