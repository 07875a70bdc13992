"""Remasking rules: how the reverse process ranks its proposals before committing the top ones.

low_confidence (LLaDA): the probability of the proposed token. random (LLaDA): uniform noise.
margin (Dream): top-1 minus top-2 probability. entropy (Dream): minus the entropy of the
prediction, so confident (low-entropy) positions come first.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from llada_jax.config import REMASKING


def confidence_of(
    remasking: str, logits: jax.Array, proposal: jax.Array, uniform: jax.Array | None
) -> jax.Array:
  """Confidence [B, L] of each proposal (higher is committed first) from logits [B, L, V] and
  proposals [B, L]; `uniform` [B, L] are the step's U(0, 1) draws (the "random" rule's ranks,
  unused by the others)."""
  if remasking == "random":
    return uniform
  probs = jax.nn.softmax(logits, axis=-1)
  if remasking == "low_confidence":
    return jnp.take_along_axis(probs, proposal[..., None], axis=-1)[..., 0]
  if remasking == "margin":
    top2 = jax.lax.top_k(probs, 2)[0]
    return top2[..., 0] - top2[..., 1]
  if remasking == "entropy":
    return jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)
  raise ValueError(f"remasking={remasking!r} is not one of {REMASKING}")
