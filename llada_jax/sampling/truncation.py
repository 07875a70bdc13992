"""Top-k and nucleus (top-p) truncation of a proposal distribution, as transformers' logits
warpers define them (`TopKLogitsWarper`, `TopPLogitsWarper`; nucleus sampling: Holtzman et al.,
ICLR 2020, arXiv 1904.09751).

top-k keeps the k most probable tokens (tokens tied with the k-th kept too); top-p keeps the most
probable tokens whose probability mass before them, in decreasing order, is below p (so at least
the most probable one). Both are measured on softmax(logits / temperature), the distribution that
is sampled, and every other token's logit becomes -inf. k and p are traced scalars: one compiled
sampler serves every value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def truncate(
    logits: jax.Array, top_k: jax.Array, top_p: jax.Array, temperature: jax.Array
) -> jax.Array:
  """logits [..., V] with the tokens outside the top-k and the nucleus set to -inf.

  Args:
    logits: float [..., V].
    top_k: int32 scalar; 0 keeps every token.
    top_p: float scalar in (0, 1]; 1 keeps every token.
    temperature: float scalar >= 0; the sets are those of softmax(logits / temperature) (at 0,
      greedy decoding keeps the argmax whatever the sets are).
  """
  vocab = logits.shape[-1]
  scaled = logits / jnp.maximum(temperature, 1e-6).astype(logits.dtype)
  ordered = -jnp.sort(-scaled, axis=-1)  # decreasing
  k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
  kth = jax.lax.dynamic_index_in_dim(ordered, k - 1, axis=-1, keepdims=True)
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs
  kept = jnp.sum(before < top_p.astype(probs.dtype), axis=-1, keepdims=True)
  pth = jnp.take_along_axis(ordered, jnp.maximum(kept, 1) - 1, axis=-1)
  return jnp.where(scaled >= jnp.maximum(kth, pth), logits, -jnp.inf)
