"""The reverse process of LLaDA as one compiled XLA program.

x starts as prompt ++ [MASK] * gen_length. The answer is filled block by block (semi-autoregressive
when block_length < gen_length); in each step the mask predictor proposes a token for every masked
position and the most confident proposals of the current block are committed. The whole loop is
`lax.fori_loop`s inside one `jit`, with the step's randomness from `fold_in(rng, step)`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

from llada_jax.config import validate_sampling
from llada_jax.model import ModelConfig, Transformer
from llada_jax.sampling.schedule import num_transfer_tokens, top_k_mask


def generate(config: ml_collections.ConfigDict, params: Any, prompt: jax.Array,
             attention_mask: jax.Array | None = None, *, steps: int, gen_length: int,
             block_length: int, temperature: float = 0.0, remasking: str = "low_confidence",
             mask_id: int | None = None, rng: jax.Array | None = None) -> jax.Array:
  """Samples answers for a batch of prompts.

  Args:
    config: the run's config (model architecture and diffusion.mask_id).
    params: mask predictor parameters.
    prompt: int [B, P] token ids; batches of different lengths are left-padded.
    attention_mask: optional bool/int [B, P], 0 on padding (the answer is always attended to).
    steps, gen_length, block_length: reverse-process schedule; gen_length must be a multiple of
      block_length and steps a multiple of the number of blocks.
    temperature: Gumbel noise scale on the logits (0 is greedy).
    remasking: "low_confidence" commits the most probable proposals first.
    mask_id: defaults to config.diffusion.mask_id.
    rng: PRNG key for the noise; defaults to the config seed.

  Returns:
    int [B, P + gen_length]: the prompt followed by the generated answer.
  """
  validate_sampling(steps, gen_length, block_length, temperature, remasking)
  mask_id = config.diffusion.mask_id if mask_id is None else mask_id
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  prompt = jnp.asarray(prompt, jnp.int32)
  if attention_mask is None:
    attention_mask = jnp.ones(prompt.shape, bool)
  sampler = _compiled_sampler(ModelConfig.from_config(config), steps, gen_length, block_length,
                              remasking, mask_id)
  return sampler(params, prompt, jnp.asarray(attention_mask, bool), jnp.float32(temperature), rng)


@functools.lru_cache(maxsize=32)
def _compiled_sampler(model_cfg: ModelConfig, steps: int, gen_length: int, block_length: int,
                      remasking: str, mask_id: int) -> Callable[..., jax.Array]:
  """Builds (once per static setting) the jitted reverse process."""
  model = Transformer(model_cfg)
  num_blocks = gen_length // block_length
  steps_per_block = steps // num_blocks

  def run(params, prompt, prompt_mask, temperature, rng):
    batch, prompt_len = prompt.shape
    total = prompt_len + gen_length
    x = jnp.concatenate([prompt, jnp.full((batch, gen_length), mask_id, jnp.int32)], axis=1)
    attention_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, gen_length), bool)], axis=1)
    positions = jnp.arange(total)

    def block_body(block, x):
      block_start = prompt_len + block * block_length
      in_block = (positions >= block_start) & (positions < block_start + block_length)
      counts = jnp.sum((x == mask_id) & in_block, axis=-1)
      schedule = num_transfer_tokens(counts, steps_per_block)

      def step_body(i, x):
        key = jax.random.fold_in(rng, block * steps_per_block + i)
        logits = model.apply({"params": params}, x, attention_mask)
        gumbel = jax.random.gumbel(key, logits.shape, jnp.float32)
        x0 = jnp.argmax(logits + temperature * gumbel, axis=-1).astype(jnp.int32)
        probs = jax.nn.softmax(logits, axis=-1)
        confidence = jnp.take_along_axis(probs, x0[..., None], axis=-1)[..., 0]
        is_masked = x == mask_id
        candidate = is_masked & (positions < block_start + block_length)
        confidence = jnp.where(candidate, confidence, -jnp.inf)
        commit = top_k_mask(confidence, schedule[:, i])
        return jnp.where(commit & is_masked, x0, x)

      return jax.lax.fori_loop(0, steps_per_block, step_body, x)

    return jax.lax.fori_loop(0, num_blocks, block_body, x)

  return jax.jit(run)
