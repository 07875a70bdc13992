"""Remasking rules: how the reverse process ranks its proposals before committing the top ones.

low_confidence (LLaDA): the probability of the proposed token. random (LLaDA): uniform noise.
margin (Dream): top-1 minus top-2 probability. entropy (Dream): minus the entropy of the
prediction, so confident (low-entropy) positions come first.

Each rule maps (logits [B, L, V], proposals int32 [B, L], uniform [B, L] or None) to the
confidence [B, L] of each proposal (higher is committed first), in the logits' dtype. `uniform`
holds the step's U(0, 1) draws, drawn only for the rules of DRAWS_UNIFORM.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

Rule = Callable[[jax.Array, jax.Array, "jax.Array | None"], jax.Array]

DRAWS_UNIFORM = ("random",)  # rules that rank by the step's uniform draws


def low_confidence(logits: jax.Array, proposal: jax.Array, uniform: jax.Array | None) -> jax.Array:
  """The probability of the proposed token."""
  del uniform
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.take_along_axis(probs, proposal[..., None], axis=-1)[..., 0]


def random(logits: jax.Array, proposal: jax.Array, uniform: jax.Array | None) -> jax.Array:
  """The step's uniform draw (a random order)."""
  del logits, proposal
  return uniform


def margin(logits: jax.Array, proposal: jax.Array, uniform: jax.Array | None) -> jax.Array:
  """Top-1 minus top-2 probability."""
  del proposal, uniform
  top2 = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), 2)[0]
  return top2[..., 0] - top2[..., 1]


def entropy(logits: jax.Array, proposal: jax.Array, uniform: jax.Array | None) -> jax.Array:
  """Minus the entropy of the prediction."""
  del proposal, uniform
  probs = jax.nn.softmax(logits, axis=-1)
  return jnp.sum(probs * jnp.log(probs + 1e-10), axis=-1)


# Keyed by exactly llada_jax.config.REMASKING (tests/test_sampling.py checks the coverage).
REMASKING_RULES: dict[str, Rule] = {
    "low_confidence": low_confidence,
    "random": random,
    "margin": margin,
    "entropy": entropy,
}
