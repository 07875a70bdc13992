"""Step schedule and selection rules of the reverse process (pure array functions)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def num_transfer_tokens(mask_counts: jax.Array, steps: int) -> jax.Array:
  """Tokens to commit at each step of a block: [B] mask counts -> [B, steps].

  The count is split evenly; the first (count mod steps) steps take one more, as in LLaDA.
  """
  base = mask_counts // steps
  remainder = mask_counts % steps
  extra = jnp.arange(steps)[None, :] < remainder[:, None]
  return base[:, None] + extra.astype(base.dtype)


def top_k_mask(confidence: jax.Array, k: jax.Array) -> jax.Array:
  """Bool [B, L] marking the k[b] highest-confidence positions of each row.

  Ties are broken by position (earlier first) through a stable sort, so the choice is well defined.
  """
  order = jnp.argsort(-confidence, axis=-1, stable=True)
  ranks = jnp.argsort(order, axis=-1)
  return ranks < k[:, None]
