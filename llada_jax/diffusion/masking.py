"""The forward (noising) process of LLaDA: mask each token independently with probability p.

p = (1 - eps) * t + eps with t ~ U(0, 1) drawn once per sequence, so that no sequence is left with
a masking rate of exactly zero (DESIGN.md section 2).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Noised(NamedTuple):
  """One draw of the forward process for a batch."""
  tokens: jax.Array      # [B, L] input to the mask predictor: mask_id where masked
  masked: jax.Array      # [B, L] bool, positions replaced by the mask id
  p_mask: jax.Array      # [B] masking probability of each sequence


def mask_probability(t: jax.Array, eps: float) -> jax.Array:
  """Maps diffusion time t in [0, 1] to the per-token masking probability."""
  return (1.0 - eps) * t + eps


def forward_process(rng: jax.Array, tokens: jax.Array, *, mask_id: int, eps: float,
                    valid: jax.Array | None = None) -> Noised:
  """Masks every token of `tokens` [B, L] with its sequence's probability p.

  valid: optional bool [B, L]; positions outside it are never masked (e.g. beyond a cut length).
  """
  t_key, mask_key = jax.random.split(rng)
  batch, length = tokens.shape
  p_mask = mask_probability(jax.random.uniform(t_key, (batch,)), eps)
  masked = jax.random.uniform(mask_key, (batch, length)) < p_mask[:, None]
  if valid is not None:
    masked = masked & valid
  return Noised(jnp.where(masked, mask_id, tokens), masked, p_mask)


def random_length(rng: jax.Array, seq_len: int, prob: float) -> jax.Array:
  """With probability `prob`, a length drawn uniformly from [1, seq_len]; else seq_len.

  LLaDA cuts 1% of pre-training batches to a random length so the model also sees short inputs.
  The cut is applied by masking positions >= length out of attention and loss, which is the same
  computation as truncating (positions are unchanged) but keeps shapes static under jit.
  """
  cut_key, len_key = jax.random.split(rng)
  cut = jax.random.uniform(cut_key) < prob
  drawn = jax.random.randint(len_key, (), 1, seq_len + 1)
  return jnp.where(cut, drawn, seq_len)
