"""The reverse process of LLaDA as one compiled XLA program.

x starts as prompt ++ [MASK] * gen_length. The answer is filled block by block (semi-autoregressive
when block_length < gen_length); in each step the mask predictor proposes a token for every masked
position and the most confident proposals of the current block are committed. Mask tokens inside
the prompt are filled too (infilling): they count towards the first block and are candidates from
the first step. The whole loop is `lax.fori_loop`s inside one `jit`, its randomness drawn from
`fold_in(rng, step)`, so a sample costs no host round trip per step.

With `parallel_threshold` τ > 0 (Fast-dLLM's confidence-threshold parallel decoding, an
approximation) a block runs until it has no mask left: each step commits every masked position of
the block whose proposal has probability > τ, and at least the most confident one, so easy spans
take one forward pass instead of one per token. τ = 1 commits exactly one token a step, which is
exact low-confidence decoding with steps = gen_length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from llada_jax.config import validate_sampling
from llada_jax.errors import ConfigError
from llada_jax.model import ModelConfig, Transformer, apply_model
from llada_jax.sampling.remasking import confidence_of
from llada_jax.sampling.schedule import num_transfer_tokens, top_k_mask


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """Everything that shapes the compiled program (one compilation per distinct spec)."""
  model: ModelConfig
  steps: int
  gen_length: int
  block_length: int
  remasking: str
  mask_id: int
  eos_id: int
  eot_id: int
  logits_eos_inf: bool
  confidence_eos_eot_inf: bool
  use_cfg: bool
  use_noise: bool
  return_trajectory: bool
  float64: bool
  use_threshold: bool = False


def generate(config: ml_collections.ConfigDict, params: Any, prompt: Any,
             attention_mask: Any = None, *, steps: int, gen_length: int, block_length: int,
             temperature: float = 0.0, cfg_scale: float = 0.0, remasking: str = "low_confidence",
             mask_id: int | None = None, logits_eos_inf: bool = False,
             confidence_eos_eot_inf: bool = False, rng: jax.Array | None = None,
             return_trajectory: bool = False, float64: bool = False,
             parallel_threshold: float = 0.0) -> Any:
  """Samples answers for a batch of prompts with the LLaDA reverse process.

  Args:
    config: the model's config (architecture and token ids in config.tokens).
    params: mask predictor parameters.
    prompt: int [B, P] token ids; prompts of different lengths are left-padded with tokens.pad_id.
      A jax.Array keeps its sharding (e.g. the batch split over devices); so does attention_mask.
    attention_mask: optional [B, P], 0 on padding; padding is neither attended to nor counted in
      the positions, so a padded prompt gives the tokens it gives alone.
    steps, gen_length, block_length: gen_length is a multiple of block_length, steps a multiple of
      the number of blocks and at most gen_length; each block gets steps / num_blocks steps.
    temperature: Gumbel-max noise scale on the logits (0 is greedy).
    cfg_scale: classifier-free guidance w: logits = u + (w + 1)(c - u), u with the prompt masked.
    remasking: how proposals are ranked: low_confidence, random, margin or entropy.
    mask_id: defaults to config.tokens.mask_id.
    logits_eos_inf: never propose EOS.
    confidence_eos_eot_inf: commit positions proposing EOS or EoT after every other position.
    rng: PRNG key (default from config.seed).
    return_trajectory: also return the token state after every step, [steps, B, P + gen_length].
    float64: Gumbel noise and probabilities in float64 (needs jax_enable_x64), as the official code.
    parallel_threshold: 0 (exact schedule) or τ in (0, 1]: commit every proposal of the current
      block with probability > τ (at least one per step); steps is then unused. Needs
      remasking="low_confidence" and no trajectory.

  Returns:
    int32 [B, P + gen_length] (and the trajectory when asked).
  """
  tokens = config.tokens
  mask_id = tokens.mask_id if mask_id is None else mask_id
  placed = [a for a in (prompt, attention_mask) if isinstance(a, jax.Array)]
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2:
    raise ConfigError(f"prompt of shape {prompt.shape} is not allowed: expected [batch, length]")
  attention_mask = (np.ones(prompt.shape, bool) if attention_mask is None
                    else np.asarray(attention_mask).astype(bool))
  check_generate_arguments(config, prompt, attention_mask, steps, gen_length, block_length,
                           temperature, cfg_scale, remasking, mask_id, float64)
  _check_threshold(parallel_threshold, remasking, return_trajectory)
  spec = SamplerSpec(ModelConfig.from_config(config), steps, gen_length, block_length, remasking,
                     mask_id, tokens.eos_id, tokens.eot_id, logits_eos_inf,
                     confidence_eos_eot_inf, cfg_scale > 0, temperature > 0, return_trajectory,
                     float64, parallel_threshold > 0)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  device_prompt, device_mask = jnp.asarray(prompt), jnp.asarray(attention_mask)
  if placed:
    device_prompt, device_mask = (jax.device_put(a, placed[0].sharding)
                                  for a in (prompt, attention_mask))
  return _compiled_sampler(spec)(params, device_prompt, device_mask, jnp.float32(temperature),
                                 jnp.float32(cfg_scale), rng, jnp.float32(parallel_threshold))


def _check_threshold(threshold: float, remasking: str, return_trajectory: bool) -> None:
  """parallel_threshold is 0 (off) or a probability in (0, 1] with low-confidence remasking."""
  if threshold == 0:
    return
  if not 0 < threshold <= 1:
    raise ConfigError(f"parallel_threshold={threshold} is not allowed: expected 0 (exact "
                      "schedule) or a probability in (0, 1]")
  if remasking != "low_confidence":
    raise ConfigError(f"remasking={remasking!r} is not allowed with parallel_threshold: expected "
                      "low_confidence (the threshold is on the proposal's probability)")
  if return_trajectory:
    raise ConfigError("return_trajectory is not allowed with parallel_threshold (the number of "
                      "steps is not fixed)")


def check_generate_arguments(config: ml_collections.ConfigDict, prompt: np.ndarray,
                             attention_mask: np.ndarray, steps: int, gen_length: int,
                             block_length: int, temperature: float, cfg_scale: float,
                             remasking: str, mask_id: int, float64: bool = False) -> None:
  """Raises ConfigError (a ValueError) with one line for any argument generate cannot take."""
  validate_sampling(steps, gen_length, block_length, temperature, remasking)
  if cfg_scale < 0:
    raise ConfigError(f"cfg_scale={cfg_scale} is not allowed: expected a number >= 0")
  vocab = config.model.vocab_size
  if not 0 <= mask_id < vocab:
    raise ConfigError(f"mask_id={mask_id} is not allowed: expected an id in [0, {vocab})")
  if config.tokens.pad_id == mask_id:
    raise ConfigError(f"tokens.pad_id={config.tokens.pad_id} is not allowed: it equals the mask "
                      "id, so padding would be generated over")
  if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab):
    bad = int(prompt.min() if prompt.min() < 0 else prompt.max())
    raise ConfigError(f"prompt token id {bad} is not allowed: expected ids in [0, {vocab})")
  if attention_mask.shape != prompt.shape:
    raise ConfigError(f"attention_mask of shape {attention_mask.shape} is not allowed: expected "
                      f"the prompt's shape {prompt.shape}")
  total = prompt.shape[1] + gen_length
  if total > config.model.max_sequence_length:
    raise ConfigError(f"prompt length {prompt.shape[1]} + gen_length={gen_length} is not allowed: "
                      f"expected at most model.max_sequence_length="
                      f"{config.model.max_sequence_length}")
  if float64 and not jax.config.jax_enable_x64:
    raise ConfigError("float64=True is not allowed while jax_enable_x64 is off: set "
                      "JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True))")


@functools.lru_cache(maxsize=32)
def _compiled_sampler(spec: SamplerSpec) -> Callable[..., Any]:
  """Builds (once per spec) the jitted reverse process."""
  model = Transformer(spec.model)
  num_blocks = spec.gen_length // spec.block_length
  steps_per_block = spec.steps // num_blocks
  real = jnp.float64 if spec.float64 else jnp.float32

  def run(params, prompt, prompt_mask, temperature, cfg_scale, rng, threshold):
    batch, prompt_len = prompt.shape
    total = prompt_len + spec.gen_length
    x = jnp.concatenate([prompt, jnp.full((batch, spec.gen_length), spec.mask_id, jnp.int32)], 1)
    attention_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, spec.gen_length), bool)], 1)
    is_prompt = (jnp.arange(total) < prompt_len) & (x != spec.mask_id)
    index = jnp.arange(total)
    trajectory = jnp.zeros((spec.steps if spec.return_trajectory else 0, batch, total), jnp.int32)

    def propose(x, step, block_end):
      """Proposals x0 for every position and the confidence of the masked ones up to block_end
      (-inf elsewhere), from one forward pass; randomness from fold_in(rng, step)."""
      noise_key, remask_key = jax.random.split(jax.random.fold_in(rng, step))
      unconditional = jnp.where(is_prompt, spec.mask_id, x) if spec.use_cfg else None
      logits = apply_model(model, params, x, attention_mask, unconditional, cfg_scale)
      logits = logits.astype(real)
      if spec.logits_eos_inf:
        logits = logits.at[..., spec.eos_id].set(-jnp.inf)
      if spec.use_noise:  # Gumbel-max: argmax(logits + T * g) samples softmax(logits / T)
        logits_noised = logits + temperature.astype(real) * jax.random.gumbel(
            noise_key, logits.shape, real)
      else:
        logits_noised = logits
      x0 = jnp.argmax(logits_noised, axis=-1).astype(jnp.int32)
      confidence = confidence_of(spec.remasking, logits, x0, remask_key)
      candidate = (x == spec.mask_id) & (index < block_end) & attention_mask
      if spec.confidence_eos_eot_inf:
        last = (x0 == spec.eos_id) | (x0 == spec.eot_id)
        confidence = jnp.where(last, jnp.finfo(confidence.dtype).min, confidence)
      return x0, jnp.where(candidate, confidence, -jnp.inf), candidate

    def block_bounds(block):
      block_end = prompt_len + (block + 1) * spec.block_length
      block_start = jnp.where(block == 0, 0, block_end - spec.block_length)
      return block_start, block_end

    def exact_block(block, carry):
      x, trajectory = carry
      block_start, block_end = block_bounds(block)
      in_block = (index >= block_start) & (index < block_end) & attention_mask
      schedule = num_transfer_tokens(jnp.sum((x == spec.mask_id) & in_block, -1), steps_per_block)

      def step_body(i, carry):
        x, trajectory = carry
        step = block * steps_per_block + i
        x0, confidence, candidate = propose(x, step, block_end)
        x = jnp.where(top_k_mask(confidence, schedule[:, i]) & candidate, x0, x)
        if spec.return_trajectory:
          trajectory = trajectory.at[step].set(x)
        return x, trajectory

      return jax.lax.fori_loop(0, steps_per_block, step_body, (x, trajectory))

    def threshold_block(block, carry):
      _, block_end = block_bounds(block)

      def masked_left(carry):
        return jnp.any((carry[0] == spec.mask_id) & (index < block_end) & attention_mask)

      def step_body(carry):
        x, step = carry
        x0, confidence, candidate = propose(x, step, block_end)
        best = top_k_mask(confidence, jnp.any(candidate, -1).astype(jnp.int32))
        commit = candidate & ((confidence > threshold.astype(confidence.dtype)) | best)
        return jnp.where(commit, x0, x), step + 1

      return jax.lax.while_loop(masked_left, step_body, carry)

    if spec.use_threshold:
      x, _ = jax.lax.fori_loop(0, num_blocks, threshold_block, (x, jnp.int32(0)))
      return x
    x, trajectory = jax.lax.fori_loop(0, num_blocks, exact_block, (x, trajectory))
    return (x, trajectory) if spec.return_trajectory else x

  return jax.jit(run)
