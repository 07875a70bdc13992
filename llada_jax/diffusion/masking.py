"""The forward (noising) process of LLaDA: mask each token independently with probability p.

p = (1 - eps) * t + eps with t ~ U(0, 1) drawn once per sequence, so that no sequence is left with
a masking rate of exactly zero (docs/llada.md; LLaDA paper Eq. 3, official GUIDELINES.md). Block
diffusion (BD3-LM, arXiv 2503.09573, Eq. 8) draws one t per block of `block_size` tokens instead,
with the same eps; BD3-LM's clipped schedule draws t ~ U(t_min, t_max).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Noised(NamedTuple):
  """One draw of the forward process for a batch."""

  tokens: jax.Array  # [B, L] input to the mask predictor: mask_id where masked
  masked: jax.Array  # [B, L] bool, positions replaced by the mask id
  p_mask: jax.Array  # [B] masking probability of each sequence; [B, L] per token with blocks


def mask_probability(t: jax.Array, eps: float) -> jax.Array:
  """Maps diffusion time t in [0, 1] to the per-token masking probability."""
  return (1.0 - eps) * t + eps


def sample_times(rng: jax.Array, batch: int, method: str = "uniform") -> jax.Array:
  """Diffusion times [batch] in [0, 1).

  "uniform": independent U(0, 1). "stratified" (antithetic, as in MD4): one u ~ U(0, 1) and
  t_i = (u + i / batch) mod 1, so every t is still U(0, 1) (same expected loss) but the batch covers
  [0, 1) evenly, which lowers the variance of the 1/p-weighted loss.
  """
  if method == "uniform":
    return jax.random.uniform(rng, (batch,))
  if method == "stratified":
    return jnp.mod(jax.random.uniform(rng) + jnp.arange(batch) / batch, 1.0)
  raise ValueError(f"time sampling {method!r} is not one of uniform, stratified")


def forward_process(
    rng: jax.Array,
    tokens: jax.Array,
    *,
    mask_id: int,
    eps: float,
    valid: jax.Array | None = None,
    time_sampling: str = "uniform",
    block_size: int = 0,
    t_range: tuple[float, float] = (0.0, 1.0),
) -> Noised:
  """Masks every token of `tokens` [B, L] with its sequence's (or block's) probability p.

  valid: optional bool [B, L]; positions outside it are never masked (the prompt in SFT, positions
  beyond a cut length).
  block_size: 0: one t per sequence (p_mask [B]); B > 0 (a divisor of L): one t per block of B
    tokens (p_mask [B, L], each token its block's p). With one block (B = L) the draws are those
    of block_size=0.
  t_range: (t_min, t_max), t = t_min + (t_max - t_min) u with u ~ U(0, 1); (0, 1) is exact.
  """
  t_key, mask_key = jax.random.split(rng)
  batch, length = tokens.shape
  blocks = length // block_size if block_size else 1
  u = sample_times(t_key, batch * blocks, time_sampling).reshape(batch, blocks)
  t_min, t_max = t_range
  p_mask = mask_probability(t_min + (t_max - t_min) * u, eps)
  per_token = jnp.repeat(p_mask, length // blocks, axis=1)
  masked = jax.random.uniform(mask_key, (batch, length)) < per_token
  p_mask = per_token if block_size else p_mask[:, 0]
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


def maskable_positions(batch: dict[str, jax.Array]) -> jax.Array:
  """bool [B, L]: the positions the forward process may mask, valid ones and, in SFT (the batch
  has prompt_length [B]), those after the prompt."""
  valid = batch["valid"]
  if "prompt_length" not in batch:
    return valid
  return valid & (jnp.arange(valid.shape[1])[None, :] >= batch["prompt_length"][:, None])


def noise_batch(
    rng: jax.Array,
    batch: dict[str, jax.Array],
    *,
    mask_id: int,
    eps: float,
    random_length_prob: float,
    time_sampling: str = "uniform",
    block_size: int = 0,
    t_range: tuple[float, float] = (0.0, 1.0),
) -> dict[str, jax.Array]:
  """On-device forward process for a feature batch (llada_jax.data.features): adds inputs, masked
  and p_mask, and applies the batch-level random-length cut to `valid` (pre-training only).
  block_size and t_range as in `forward_process`.

  SFT batches (with prompt_length) are never cut and never masked inside the prompt.
  """
  len_key, noise_key = jax.random.split(rng)
  targets = batch["targets"]
  seq_len = targets.shape[1]
  valid = batch["valid"]
  if "prompt_length" not in batch:
    valid = valid & (jnp.arange(seq_len) < random_length(len_key, seq_len, random_length_prob))
  maskable = maskable_positions(dict(batch, valid=valid))
  noised = forward_process(
      noise_key,
      targets,
      mask_id=mask_id,
      eps=eps,
      valid=maskable,
      time_sampling=time_sampling,
      block_size=block_size,
      t_range=t_range,
  )
  return dict(batch, valid=valid, inputs=noised.tokens, masked=noised.masked, p_mask=noised.p_mask)


def with_complements(batch: dict[str, jax.Array], mask_id: int) -> dict[str, jax.Array]:
  """A noised feature batch (inputs, masked, p_mask [B] or [B, L], targets, valid[,
  prompt_length]) of B rows, each followed by its complement: 2B rows, row 2i + 1 masking exactly
  the maskable tokens row 2i leaves clean (maskable: valid and, in SFT, after the prompt), with
  p_mask 1 - p (LLaDA 2.0's complementary masking). Each token's complement is masked with
  probability 1 - p, so the 1/(1 - p)-weighted loss of row 2i + 1 is a second unbiased estimate
  of the same bound, and every maskable token is scored exactly once in the pair. The rows of a
  pair stay adjacent, so a batch sharded over devices keeps each pair on its device."""
  masked = maskable_positions(batch) & ~batch["masked"]
  complement = dict(
      batch,
      inputs=jnp.where(masked, mask_id, batch["targets"]),
      masked=masked,
      p_mask=1.0 - batch["p_mask"],
  )
  return jax.tree.map(
      lambda a, b: jnp.stack([a, b], axis=1).reshape((-1,) + a.shape[1:]), batch, complement
  )
