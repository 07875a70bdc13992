"""The reverse process of LLaDA as one compiled XLA program.

x starts as prompt ++ [MASK] * gen_length. The answer is filled block by block (semi-autoregressive
when block_length < gen_length); in each step the mask predictor proposes a token for every masked
position and the most confident proposals of the current block are committed. Mask tokens inside
the prompt are filled too (infilling): they count towards the first block and are candidates from
the first step. The whole loop is `lax.fori_loop`s inside one `jit`, its randomness drawn per row,
step and position by `fold_in`, so a sample costs no host round trip per step and a row's answer
does not depend on the rows it is batched with.

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
from llada_jax.keys import item_keys
from llada_jax.model import ModelConfig, Transformer, apply_model, positions_from_mask
from llada_jax.parallel.sharding import axis_rules, placement_context
from llada_jax.sampling.cache import CACHE_MODES, empty_cache, window, window_logits
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
  cache: str = "none"
  cache_refresh: int = 0
  prompt_has_masks: bool = False


def generate(
    config: ml_collections.ConfigDict,
    params: Any,
    prompt: Any,
    attention_mask: Any = None,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    cfg_scale: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int | None = None,
    logits_eos_inf: bool = False,
    confidence_eos_eot_inf: bool = False,
    rng: jax.Array | None = None,
    return_trajectory: bool = False,
    float64: bool = False,
    parallel_threshold: float = 0.0,
    cache: str = "none",
    cache_refresh: int = 0,
) -> Any:
  """Samples answers for a batch of prompts with the LLaDA reverse process.

  Args:
    config: the model's config (architecture and token ids in config.tokens).
    params: mask predictor parameters.
    prompt: int [B, P] token ids; prompts of different lengths are left-padded with tokens.pad_id.
      A jax.Array keeps its sharding (e.g. the batch split over devices); so does attention_mask.
      With a NamedSharding the program is traced in its mesh, the batch split as it is split.
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
    rng: one PRNG key (row r draws from fold_in(rng, r)) or one key per prompt [B, 2] (e.g.
      `llada_jax.keys.item_keys(seed_key, item_indices)`, so that an item's answer does not
      depend on the batch it is generated in); default from config.seed. Every random number of
      row r at step s and position p (counted from the row's first real token) comes from
      fold_in(fold_in(key_r, s), p): padding, neighbours and caches do not change it.
    return_trajectory: also return the token state after every step, [steps, B, P + gen_length].
    float64: Gumbel noise and probabilities in float64 (needs jax_enable_x64), as the official code.
    parallel_threshold: 0 (exact schedule) or τ in (0, 1]: commit every proposal of the current
      block with probability > τ (at least one per step); steps is then unused. Needs
      remasking="low_confidence" and no trajectory.
    cache: "none" (exact), "prefix" or "dual" key/value caches (llada_jax.sampling.cache; an
      approximation), refreshed at every block boundary and every cache_refresh > 0 steps.

  Returns:
    int32 [B, P + gen_length] (and the trajectory when asked).
  """
  tokens = config.tokens
  mask_id = tokens.mask_id if mask_id is None else mask_id
  placed = [a for a in (prompt, attention_mask) if isinstance(a, jax.Array)]
  prompt = np.asarray(prompt, np.int32)
  if prompt.ndim != 2:
    raise ConfigError(f"prompt of shape {prompt.shape} is not allowed: expected [batch, length]")
  attention_mask = (
      np.ones(prompt.shape, bool)
      if attention_mask is None
      else np.asarray(attention_mask).astype(bool)
  )
  check_generate_arguments(
      config,
      prompt,
      attention_mask,
      steps,
      gen_length,
      block_length,
      temperature,
      cfg_scale,
      remasking,
      mask_id,
      float64,
  )
  _check_threshold(parallel_threshold, remasking, return_trajectory)
  _check_cache(cache, cache_refresh, config.model.causal)
  spec = SamplerSpec(
      ModelConfig.from_config(config),
      steps,
      gen_length,
      block_length,
      remasking,
      mask_id,
      tokens.eos_id,
      tokens.eot_id,
      logits_eos_inf,
      confidence_eos_eot_inf,
      cfg_scale > 0,
      temperature > 0,
      return_trajectory,
      float64,
      parallel_threshold > 0,
      cache,
      cache_refresh,
      bool(np.any((prompt == mask_id) & attention_mask)),
  )
  row_keys = _row_keys(jax.random.PRNGKey(config.seed) if rng is None else rng, prompt.shape[0])
  device_prompt, device_mask = jnp.asarray(prompt), jnp.asarray(attention_mask)
  sharding = placed[0].sharding if placed else None
  if placed:
    device_prompt, device_mask, row_keys = (
        jax.device_put(a, sharding) for a in (prompt, attention_mask, row_keys)
    )
  with placement_context(sharding, axis_rules(config)):
    return _compiled_sampler(spec)(
        params,
        device_prompt,
        device_mask,
        jnp.float32(temperature),
        jnp.float32(cfg_scale),
        row_keys,
        jnp.float32(parallel_threshold),
    )


def _row_keys(rng: Any, rows: int) -> jax.Array:
  """One raw key per row [rows, 2]: rng's own rows when it holds one per row, else
  fold_in(rng, row) (`llada_jax.keys.item_keys`)."""
  rng = jnp.asarray(rng)
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  if rng.shape == (2,):
    return item_keys(rng, rows)
  if rng.shape != (rows, 2):
    raise ConfigError(
        f"rng of shape {rng.shape} is not allowed: expected one key (2,) or one "
        f"per prompt ({rows}, 2)"
    )
  return rng


def _check_threshold(threshold: float, remasking: str, return_trajectory: bool) -> None:
  """parallel_threshold is 0 (off) or a probability in (0, 1] with low-confidence remasking."""
  if threshold == 0:
    return
  if not 0 < threshold <= 1:
    raise ConfigError(
        f"parallel_threshold={threshold} is not allowed: expected 0 (exact "
        "schedule) or a probability in (0, 1]"
    )
  if remasking != "low_confidence":
    raise ConfigError(
        f"remasking={remasking!r} is not allowed with parallel_threshold: expected "
        "low_confidence (the threshold is on the proposal's probability)"
    )
  if return_trajectory:
    raise ConfigError(
        "return_trajectory is not allowed with parallel_threshold (the number of "
        "steps is not fixed)"
    )


def _check_cache(cache: str, cache_refresh: int, causal: bool) -> None:
  """cache is one of CACHE_MODES, for a bidirectional model; cache_refresh a count >= 0."""
  if cache not in CACHE_MODES:
    raise ConfigError(f"cache={cache!r} is not allowed: expected one of {', '.join(CACHE_MODES)}")
  if not isinstance(cache_refresh, (int, np.integer)) or cache_refresh < 0:
    raise ConfigError(
        f"cache_refresh={cache_refresh!r} is not allowed: expected an integer >= 0 "
        "(0 refreshes at block boundaries only)"
    )
  if cache != "none" and causal:
    raise ConfigError(
        f"cache={cache!r} is not allowed for a causal model.causal=True: expected "
        "cache='none' (the caches reuse keys of a bidirectional mask predictor)"
    )


def check_sampler_options(
    config: ml_collections.ConfigDict,
    *,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    cfg_scale: float = 0.0,
    parallel_threshold: float = 0.0,
    cache: str = "none",
    cache_refresh: int = 0,
    **unused: Any,
) -> None:
  """Raises ConfigError (one line) for sampler options `generate` would refuse for any prompt of
  this model (the prompt-dependent checks run in generate). Other keywords are ignored."""
  del unused
  validate_sampling(steps, gen_length, block_length, temperature, remasking)
  if cfg_scale < 0:
    raise ConfigError(f"cfg_scale={cfg_scale} is not allowed: expected a number >= 0")
  if gen_length >= config.model.max_sequence_length:
    raise ConfigError(
        f"gen_length={gen_length} is not allowed: expected less than "
        f"model.max_sequence_length={config.model.max_sequence_length}"
    )
  _check_threshold(parallel_threshold, remasking, False)
  _check_cache(cache, cache_refresh, config.model.causal)


def check_generate_arguments(
    config: ml_collections.ConfigDict,
    prompt: np.ndarray,
    attention_mask: np.ndarray,
    steps: int,
    gen_length: int,
    block_length: int,
    temperature: float,
    cfg_scale: float,
    remasking: str,
    mask_id: int,
    float64: bool = False,
) -> None:
  """Raises ConfigError (a ValueError) with one line for any argument generate cannot take."""
  validate_sampling(steps, gen_length, block_length, temperature, remasking)
  if cfg_scale < 0:
    raise ConfigError(f"cfg_scale={cfg_scale} is not allowed: expected a number >= 0")
  vocab = config.model.vocab_size
  if not 0 <= mask_id < vocab:
    raise ConfigError(f"mask_id={mask_id} is not allowed: expected an id in [0, {vocab})")
  if config.tokens.pad_id == mask_id:
    raise ConfigError(
        f"tokens.pad_id={config.tokens.pad_id} is not allowed: it equals the mask "
        "id, so padding would be generated over"
    )
  if prompt.size and (prompt.min() < 0 or prompt.max() >= vocab):
    bad = int(prompt.min() if prompt.min() < 0 else prompt.max())
    raise ConfigError(f"prompt token id {bad} is not allowed: expected ids in [0, {vocab})")
  if attention_mask.shape != prompt.shape:
    raise ConfigError(
        f"attention_mask of shape {attention_mask.shape} is not allowed: expected "
        f"the prompt's shape {prompt.shape}"
    )
  total = prompt.shape[1] + gen_length
  if total > config.model.max_sequence_length:
    raise ConfigError(
        f"prompt length {prompt.shape[1]} + gen_length={gen_length} is not allowed: "
        f"expected at most model.max_sequence_length="
        f"{config.model.max_sequence_length}"
    )
  if float64 and not jax.config.jax_enable_x64:
    raise ConfigError(
        "float64=True is not allowed while jax_enable_x64 is off: set "
        "JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True))"
    )


@functools.lru_cache(maxsize=32)
def _compiled_sampler(spec: SamplerSpec) -> Callable[..., Any]:
  """Builds (once per spec) the jitted reverse process."""
  model = Transformer(spec.model)
  num_blocks = spec.gen_length // spec.block_length
  steps_per_block = spec.steps // num_blocks
  real = jnp.float64 if spec.float64 else jnp.float32

  def run(params, prompt, prompt_mask, temperature, cfg_scale, row_keys, threshold):
    batch, prompt_len = prompt.shape
    total = prompt_len + spec.gen_length
    x = jnp.concatenate([prompt, jnp.full((batch, spec.gen_length), spec.mask_id, jnp.int32)], 1)
    attention_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, spec.gen_length), bool)], 1)
    positions = positions_from_mask(attention_mask)
    is_prompt = (jnp.arange(total) < prompt_len) & (x != spec.mask_id)
    index = jnp.arange(total)
    trajectory = jnp.zeros((spec.steps if spec.return_trajectory else 0, batch, total), jnp.int32)

    def unconditional(x):
      return jnp.where(is_prompt, spec.mask_id, x) if spec.use_cfg else None

    def draws(step, start, width):
      """This step's random numbers for positions [start, start + width) of every row: Gumbel
      noise [B, W, V] (None without noise) and uniforms [B, W] (None unless random remasking).
      Each comes from fold_in(fold_in(row key, step), position), the position counted from the
      row's first real token: a row's draws do not depend on its batch, padding or window."""
      keys = jax.vmap(jax.random.fold_in)(row_keys, jnp.broadcast_to(step, (batch,)))
      noise_keys, remask_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
      where = positions[:, start : start + width]

      def per_position(row_key, draw):
        return jax.vmap(jax.vmap(lambda k, p: draw(jax.random.fold_in(k, p)), (None, 0)))(
            row_key, where
        )

      gumbel = uniform = None
      if spec.use_noise:
        vocab = spec.model.vocab_size
        gumbel = per_position(noise_keys, lambda k: jax.random.gumbel(k, (vocab,), real))
      if spec.remasking == "random":
        uniform = per_position(remask_keys, lambda k: jax.random.uniform(k, (), real))
      return gumbel, uniform

    def propose(x, step, block_end, logits, start=0):
      """Proposals x0 for every position and the confidence of the masked ones up to block_end
      (-inf elsewhere) from the logits of positions [start, start + W); step is a scalar or one
      step count per row."""
      width = logits.shape[1]
      gumbel, uniform = draws(step, start, width)
      logits = logits.astype(real)
      if spec.logits_eos_inf:
        logits = logits.at[..., spec.eos_id].set(-jnp.inf)
      logits_noised = logits
      if spec.use_noise:  # Gumbel-max: argmax(logits + T * g) samples softmax(logits / T)
        logits_noised = logits + temperature.astype(real) * gumbel
      x0 = jnp.argmax(logits_noised, axis=-1).astype(jnp.int32)
      confidence = confidence_of(spec.remasking, logits, x0, uniform)
      x0 = jax.lax.dynamic_update_slice_in_dim(x, x0, start, axis=1)
      confidence = jax.lax.dynamic_update_slice_in_dim(
          jnp.full((batch, total), -jnp.inf, confidence.dtype), confidence, start, axis=1
      )
      candidate = (x == spec.mask_id) & (index < block_end) & attention_mask
      if spec.confidence_eos_eot_inf:
        last = (x0 == spec.eos_id) | (x0 == spec.eot_id)
        confidence = jnp.where(last, jnp.finfo(confidence.dtype).min, confidence)
      return x0, jnp.where(candidate, confidence, -jnp.inf), candidate

    def full_logits(x):
      return apply_model(model, params, x, attention_mask, unconditional(x), cfg_scale)

    def block_bounds(block):
      block_end = prompt_len + (block + 1) * spec.block_length
      block_start = jnp.where(block == 0, 0, block_end - spec.block_length)
      return block_start, block_end

    def exact_steps(block, x, trajectory, logits_fn):
      """The block's steps_per_block steps; logits_fn(x, i, carry) -> (logits, start, carry)."""
      block_start, block_end = block_bounds(block)
      in_block = (index >= block_start) & (index < block_end) & attention_mask
      schedule = num_transfer_tokens(jnp.sum((x == spec.mask_id) & in_block, -1), steps_per_block)

      def step_body(i, carry):
        x, trajectory, extra = carry
        step = block * steps_per_block + i
        logits, start, extra = logits_fn(x, i, extra)
        x0, confidence, candidate = propose(x, step, block_end, logits, start)
        x = jnp.where(top_k_mask(confidence, schedule[:, i]) & candidate, x0, x)
        if spec.return_trajectory:
          trajectory = trajectory.at[step].set(x)
        return x, trajectory, extra

      return step_body

    def threshold_steps(block_end, logits_fn):
      """A while_loop body committing every proposal above τ (at least one) per step. `step`
      counts each row's own steps (rows that finished their block wait without counting), so a
      row's random draws do not depend on how long its batch-mates take."""

      def step_body(carry):
        x, step, i, extra = carry
        logits, start, extra = logits_fn(x, i, extra)
        x0, confidence, candidate = propose(x, step, block_end, logits, start)
        active = jnp.any(candidate, -1)
        best = top_k_mask(confidence, active.astype(jnp.int32))
        commit = candidate & ((confidence > threshold.astype(confidence.dtype)) | best)
        return jnp.where(commit, x0, x), step + active, i + 1, extra

      return step_body

    def masked_left(block_end):
      return lambda carry: jnp.any(
          (carry[0] == spec.mask_id) & (index < block_end) & attention_mask
      )

    def uncached(x, i, extra):
      return full_logits(x), 0, extra

    if spec.cache == "none":
      if spec.use_threshold:

        def threshold_block(block, carry):
          body = threshold_steps(block_bounds(block)[1], uncached)
          x, step, _, _ = jax.lax.while_loop(
              masked_left(block_bounds(block)[1]), body, (*carry, jnp.int32(0), ())
          )
          return x, step

        x, _ = jax.lax.fori_loop(
            0, num_blocks, threshold_block, (x, jnp.zeros((batch,), jnp.int32))
        )
        return x

      def exact_block(block, carry):
        x, trajectory = carry
        body = exact_steps(block, x, trajectory, uncached)
        x, trajectory, _ = jax.lax.fori_loop(0, steps_per_block, body, (x, trajectory, ()))
        return x, trajectory

      x, trajectory = jax.lax.fori_loop(0, num_blocks, exact_block, (x, trajectory))
      return (x, trajectory) if spec.return_trajectory else x

    # Cached modes: blocks unrolled, so every window has a static shape.
    rows = batch * (2 if spec.use_cfg else 1)
    cache = empty_cache(spec.model, rows, total)
    step = jnp.zeros((batch,), jnp.int32)
    for block in range(num_blocks):
      block_end = prompt_len + (block + 1) * spec.block_length
      first = 0 if block == 0 and spec.prompt_has_masks else block_end - spec.block_length
      start, end = window(spec.cache, first, block_end, total)

      def cached(x, i, cache, start=start, end=end):
        refresh = i == 0
        if spec.cache_refresh:
          refresh = i % spec.cache_refresh == 0
        logits, cache = jax.lax.cond(
            refresh,
            lambda x, c: window_logits(
                model, params, x, attention_mask, unconditional(x), cfg_scale, start, end, None
            ),
            lambda x, c: window_logits(
                model, params, x, attention_mask, unconditional(x), cfg_scale, start, end, c
            ),
            x,
            cache,
        )
        return logits, start, cache

      if spec.use_threshold:
        x, step, _, cache = jax.lax.while_loop(
            masked_left(block_end),
            threshold_steps(block_end, cached),
            (x, step, jnp.int32(0), cache),
        )
      else:
        body = exact_steps(jnp.int32(block), x, trajectory, cached)
        x, trajectory, cache = jax.lax.fori_loop(0, steps_per_block, body, (x, trajectory, cache))
    if spec.use_threshold:
      return x
    return (x, trajectory) if spec.return_trajectory else x

  return jax.jit(run)
