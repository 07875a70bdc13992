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

The program is built from small pure functions: `propose` (logits -> proposals and confidences,
with the step's random draws), `commit_top_k` / `commit_above` (which proposals a step keeps), the
remasking rules (`remasking.REMASKING_RULES`), one logits function per cache mode
(`cache.STEP_LOGITS`) and two block drivers: `fixed_schedule` (a fori_loop of steps_per_block
steps) and `threshold_schedule` (a while_loop until the block has no mask). Without a cache the
blocks run in a fori_loop; with one they are unrolled, so that every window has a static shape.
The steps themselves are in `llada_jax.sampling.steps`. Through the same `generate`, a block
diffusion model (objective block) runs its own reverse process (`llada_jax.sampling.blocks`: blocks
aligned at the prompt's start, LLaDA 2.x's step rule) and an autoregressive model (objective arm)
decodes token by token (`llada_jax.sampling.autoregressive`).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from llada_jax.config import objective_of
from llada_jax.diffusion.alignment import excluded_mask_id
from llada_jax.errors import ConfigError
from llada_jax.keys import item_keys
from llada_jax.model import network, positions_from_mask
from llada_jax.parallel.sharding import axis_rules, placement_context
from llada_jax.sampling import autoregressive
from llada_jax.sampling import blocks as block_diffusion
from llada_jax.sampling.cache import STEP_LOGITS, Block, Forward, empty_cache
from llada_jax.sampling.options import SamplerOptions
from llada_jax.sampling.schedule import num_transfer_tokens
from llada_jax.sampling.steps import (
    Rows,
    SamplerSpec,
    commit_above,
    commit_top_k,
    finished,
    propose,
)

__all__ = ["SamplerSpec", "compiled_sampler", "generate"]


def generate(
    config: ml_collections.ConfigDict,
    params: Any,
    prompt: Any,
    attention_mask: Any = None,
    options: SamplerOptions | None = None,
    *,
    rng: jax.Array | None = None,
    return_trajectory: bool = False,
    return_steps: bool = False,
    **overrides: Any,
) -> Any:
  """Samples answers for a batch of prompts with the LLaDA reverse process.

  Args:
    config: the model's config (architecture and token ids in config.tokens).
    params: mask predictor parameters.
    prompt: int [B, P] token ids; prompts of different lengths are left-padded with tokens.pad_id.
      A jax.Array keeps its sharding (e.g. the batch split over devices); so does attention_mask.
      With a NamedSharding the program is traced in its mesh, the batch split as it is split.
      A global array spread over several processes (a multi-host batch, `global_batch`) is
      sampled on the whole mesh: each process checks the rows it holds, every process must pass
      the same rng, and the result is spread the same way.
    attention_mask: optional [B, P], 0 on padding; padding is neither attended to nor counted in
      the positions, so a padded prompt gives the tokens it gives alone.
    options: the sampler options (`SamplerOptions`, whose fields document each option); default
      SamplerOptions.from_config(config), i.e. config.sampling.
    rng: one PRNG key (row r draws from fold_in(rng, r)) or one key per prompt [B, 2] (e.g.
      `llada_jax.keys.item_keys(seed_key, item_indices)`, so that an item's answer does not
      depend on the batch it is generated in); default from config.seed. Every random number of
      row r at step s and position p (counted from the row's first real token) comes from
      fold_in(fold_in(key_r, s), p): padding, neighbours and caches do not change it.
    return_trajectory: also return the token state after every step, [steps, B, P + gen_length]
      (not with parallel_threshold, whose number of steps is not fixed).
    return_steps: also return int32 [B], the forward passes each row's answer took (a row whose
      block is done waits without counting): gen_length / steps is the tokens committed per step,
      what confidence-threshold decoding (parallel_threshold) and CAP training raise. For LLaDA
      models with parallel_threshold or the fixed schedule without early_stop (where it is
      `steps`), and for block diffusion models.
    **overrides: options changed on top of `options` (steps=, gen_length=, temperature=, ...).

  Returns:
    int32 [B, P + gen_length] (and the trajectory or the steps when asked).

  Raises:
    ConfigError (a ValueError), one line: options `SamplerOptions.validate` refuses for this
    model, an unknown option, a prompt or mask of the wrong shape or ids, a prompt too long for
    gen_length, or rng of the wrong shape.
  """
  options = (SamplerOptions.from_config(config) if options is None else options).replace(
      **overrides
  )
  placed = [a for a in (prompt, attention_mask) if isinstance(a, jax.Array)]
  spread = any(not a.is_fully_addressable for a in placed)
  if spread and len(placed) < 2:
    raise ConfigError(
        "a prompt spread over several processes is not allowed without its attention_mask "
        "spread the same way: expected both as global arrays"
    )
  global_shape = tuple(placed[0].shape) if spread else None
  prompt = _readable(prompt).astype(np.int32)
  if prompt.ndim != 2:
    raise ConfigError(f"prompt of shape {prompt.shape} is not allowed: expected [batch, length]")
  attention_mask = (
      np.ones(prompt.shape, bool)
      if attention_mask is None
      else _readable(attention_mask).astype(bool)
  )
  options.validate(config)
  _check_call(config, options, prompt, attention_mask, return_trajectory, return_steps)
  mask_id = config.tokens.mask_id
  has_masks = np.any((prompt == mask_id) & attention_mask)
  if spread:  # every process must compile the same program
    has_masks = np.any(multihost_utils.process_allgather(np.asarray(has_masks)))
  spec = SamplerSpec.of(
      config,
      options,
      return_trajectory=return_trajectory,
      prompt_has_masks=bool(has_masks),
      return_steps=return_steps,
  )
  rows = global_shape[0] if spread else prompt.shape[0]
  row_keys = _row_keys(jax.random.PRNGKey(config.seed) if rng is None else rng, rows)
  sharding = placed[0].sharding if placed else None
  if spread:
    keys = np.asarray(row_keys)
    device_prompt, device_mask = placed[0].astype(jnp.int32), placed[1].astype(bool)
    row_keys = jax.make_array_from_callback(keys.shape, sharding, lambda index: keys[index])
  elif placed:
    device_prompt, device_mask, row_keys = (
        jax.device_put(a, sharding) for a in (prompt, attention_mask, row_keys)
    )
  else:
    device_prompt, device_mask = jnp.asarray(prompt), jnp.asarray(attention_mask)
  with placement_context(sharding, axis_rules(config)):
    return compiled_sampler(spec)(
        params,
        device_prompt,
        device_mask,
        row_keys,
        sampler_scalars(options),
    )


def _readable(a: Any) -> np.ndarray:
  """a on this host, for the checks: all of it, or for an array spread over several processes
  (a multi-host batch) the blocks this process holds, stacked on axis 0; each process checks its
  own rows."""
  if isinstance(a, jax.Array) and not a.is_fully_addressable:
    return np.concatenate([np.asarray(shard.data) for shard in a.addressable_shards])
  return np.asarray(a)


def sampler_scalars(options: SamplerOptions) -> dict[str, jax.Array]:
  """The options a compiled sampler takes as traced scalars (one program for every value):
  temperature, cfg_scale, parallel_threshold, top_k, top_p."""
  return dict(
      temperature=jnp.float32(options.temperature),
      cfg_scale=jnp.float32(options.cfg_scale),
      threshold=jnp.float32(options.parallel_threshold),
      top_k=jnp.int32(options.top_k),
      top_p=jnp.float32(options.top_p),
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


def _check_call(
    config: ml_collections.ConfigDict,
    options: SamplerOptions,
    prompt: np.ndarray,
    attention_mask: np.ndarray,
    return_trajectory: bool,
    return_steps: bool = False,
) -> None:
  """Raises ConfigError (one line) for what this call adds to valid options: token ids, the
  prompt, its mask and its length, a trajectory of threshold decoding, steps that are not
  counted."""
  vocab, mask_id = config.model.vocab_size, config.tokens.mask_id
  if not 0 <= mask_id < vocab:
    raise ConfigError(f"tokens.mask_id={mask_id} is not allowed: expected an id in [0, {vocab})")
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
  if prompt.shape[1] + options.gen_length > config.model.max_sequence_length:
    raise ConfigError(
        f"prompt length {prompt.shape[1]} + gen_length={options.gen_length} is not "
        f"allowed: expected at most model.max_sequence_length="
        f"{config.model.max_sequence_length}"
    )
  if return_trajectory and options.use_threshold:
    raise ConfigError(
        "return_trajectory is not allowed with parallel_threshold (the number of "
        "steps is not fixed)"
    )
  objective = objective_of(config)
  blocks, causal = objective.blocks, objective.causal
  if return_trajectory and (options.early_stop or blocks or causal):
    raise ConfigError(
        "return_trajectory is not allowed with early_stop, a block diffusion model or an "
        "autoregressive one (the number of steps is not fixed)"
    )
  uncounted = not blocks and options.early_stop and not options.use_threshold
  if return_steps and (causal or return_trajectory or uncounted):
    raise ConfigError(
        "return_steps is not allowed with return_trajectory, an autoregressive model (one token "
        "a step) or early_stop on LLaDA's fixed schedule: expected parallel_threshold, the fixed "
        "schedule or a block diffusion model"
    )
  if causal and np.any(~attention_mask.any(-1)):
    raise ConfigError(
        "an empty prompt is not allowed for an autoregressive model: expected at least one token "
        "(e.g. BOS) to predict the first answer token from"
    )
  if (
      causal
      and excluded_mask_id(config) is not None
      and np.any((prompt == mask_id) & attention_mask)
  ):
    raise ConfigError(
        f"prompt token id {mask_id} (tokens.mask_id) is not allowed for an autoregressive model: "
        "expected ids other than the mask id (it writes after the prompt, no infilling)"
    )
  if blocks and np.any((prompt == mask_id) & attention_mask):
    raise ConfigError(
        f"prompt token id {mask_id} (tokens.mask_id) is not allowed for a block diffusion "
        "model: expected ids other than the mask id (it fills only the blocks after the "
        "prompt, no infilling)"
    )


StepLogits = Callable[[jax.Array, jax.Array, Any, Block], tuple[jax.Array, int, Any]]


def fixed_schedule(
    spec: SamplerSpec,
    rows: Rows,
    step_logits: StepLogits,
    block: Block,
    carry: tuple[jax.Array, jax.Array, Any],
) -> tuple[jax.Array, jax.Array, Any]:
  """The block's steps_per_block steps (a fori_loop), each committing its share of the block's
  masks (`num_transfer_tokens`). carry: (x [B, T], trajectory [steps or 0, B, T], cache)."""
  x, trajectory, cache = carry
  index = jnp.arange(x.shape[1])
  start = block.start if block.row_start is None else block.row_start[:, None]
  in_block = (index >= start) & (index < block.end) & rows.attention_mask
  schedule = num_transfer_tokens(jnp.sum((x == spec.mask_id) & in_block, -1), spec.steps_per_block)

  def step_body(i, carry):
    x, trajectory, cache = carry
    step = block.index * spec.steps_per_block + i
    logits, start, cache = step_logits(x, i, cache, block)
    x0, confidence, candidate = propose(spec, rows, x, logits, start, step, block.end)
    x = commit_top_k(x, x0, confidence, candidate, schedule[:, i])
    if spec.return_trajectory:
      trajectory = trajectory.at[step].set(x)
    return x, trajectory, cache

  return jax.lax.fori_loop(0, spec.steps_per_block, step_body, (x, trajectory, cache))


def threshold_schedule(
    spec: SamplerSpec,
    rows: Rows,
    step_logits: StepLogits,
    block: Block,
    carry: tuple[jax.Array, jax.Array, Any],
    threshold: jax.Array,
) -> tuple[jax.Array, jax.Array, Any]:
  """Steps until the block has no mask (a while_loop), each committing `commit_above`. carry:
  (x [B, T], step int32 [B], cache); `step` counts each row's own steps (a row whose block is
  done waits without counting), so its draws do not depend on how long its batch-mates take."""
  x, step, cache = carry
  index = jnp.arange(x.shape[1])

  def masked_left(carry):
    return jnp.any((carry[0] == spec.mask_id) & (index < block.end) & rows.attention_mask)

  def step_body(carry):
    x, step, i, cache = carry
    logits, start, cache = step_logits(x, i, cache, block)
    x0, confidence, candidate = propose(spec, rows, x, logits, start, step, block.end)
    x, active = commit_above(x, x0, confidence, candidate, threshold)
    return x, step + active, i + 1, cache

  x, step, _, cache = jax.lax.while_loop(masked_left, step_body, (x, step, jnp.int32(0), cache))
  return x, step, cache


def _block(spec: SamplerSpec, total: int, index: Any, infilling: jax.Array) -> Block:
  """Block `index` (a Python int or an int32 scalar) of a sequence of `total` positions; the
  first block also fills the masks of the prompts that hold some (infilling bool [B]): it starts
  at 0 for those rows (`Block.row_start`), and its window at 0 when any row holds masks."""
  end = total - spec.gen_length + (index + 1) * spec.block_length
  start = end - spec.block_length
  if not spec.prompt_has_masks:
    return Block(index, start, end)
  first = index == 0
  row_start = jnp.where(infilling & first, 0, start).astype(jnp.int32)
  return Block(index, start * (1 - first), end, row_start)


def _over_blocks(
    spec: SamplerSpec, total: int, block_of: Callable[[Any], Block], body: Callable, carry: Any
) -> Any:
  """carry after body(block_of(index), carry) for every block: a fori_loop without a cache;
  unrolled with one (its windows need static bounds). With early_stop the blocks after the one in
  which every row has finished are skipped (a while_loop, or a cond around each unrolled block);
  carry[0] is x [B, T]."""

  def done(carry):
    return jnp.all(finished(spec, carry[0], total))

  if spec.cache == "none":
    if not spec.early_stop:
      return jax.lax.fori_loop(0, spec.num_blocks, lambda b, c: body(block_of(b), c), carry)
    _, carry = jax.lax.while_loop(
        lambda bc: (bc[0] < spec.num_blocks) & ~done(bc[1]),
        lambda bc: (bc[0] + 1, body(block_of(bc[0]), bc[1])),
        (jnp.int32(0), carry),
    )
    return carry
  for index in range(spec.num_blocks):
    block = block_of(index)
    if spec.early_stop:
      carry = jax.lax.cond(done(carry), lambda c: c, functools.partial(body, block), carry)
    else:
      carry = body(block, carry)
  return carry


def compiled_sampler(spec: SamplerSpec) -> Callable[..., Any]:
  """The jitted sampler of spec (built once per spec): run(params, prompt [B, P] int32,
  prompt_mask [B, P] bool, row_keys [B, 2] uint32, scalars) -> int32 [B, P + gen_length] (and the
  trajectory when spec asks for it), scalars as `sampler_scalars` gives them. The reverse process
  of a diffusion model, or next-token decoding for an autoregressive one."""
  if spec.causal:
    return autoregressive.compiled_sampler(spec)
  if spec.block_model:
    return block_diffusion.compiled_sampler(spec)
  return _compiled_reverse_process(spec)


@functools.lru_cache(maxsize=32)
def _compiled_reverse_process(spec: SamplerSpec) -> Callable[..., Any]:
  """The reverse process of a LLaDA (mask diffusion) model (see `compiled_sampler`)."""
  model = network(spec.model)

  def run(params, prompt, prompt_mask, row_keys, scalars):
    batch, prompt_len = prompt.shape
    total = prompt_len + spec.gen_length
    x = jnp.concatenate([prompt, jnp.full((batch, spec.gen_length), spec.mask_id, jnp.int32)], 1)
    attention_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, spec.gen_length), bool)], 1)
    rows = Rows(
        attention_mask,
        positions_from_mask(attention_mask),
        row_keys,
        scalars["temperature"],
        scalars["top_k"],
        scalars["top_p"],
    )
    infilling = jnp.any((prompt == spec.mask_id) & prompt_mask, axis=-1)
    is_prompt = (jnp.arange(total) < prompt_len) & (x != spec.mask_id)
    forward = Forward(
        model,
        params,
        attention_mask,
        scalars["cfg_scale"],
        is_prompt if spec.use_cfg else None,
        spec.mask_id,
        spec.shifted,
    )
    step_logits = functools.partial(
        STEP_LOGITS[spec.cache], forward, refresh_every=spec.cache_refresh
    )
    cache = (
        ()
        if spec.cache == "none"
        else empty_cache(spec.model, batch * (2 if spec.use_cfg else 1), total)
    )

    def over_blocks(schedule, carry):
      def body(block, carry):
        active = rows
        if spec.early_stop:  # finished rows take no more tokens
          active = rows._replace(
              attention_mask=rows.attention_mask & ~finished(spec, carry[0], total)[:, None]
          )
        return schedule(active, block, carry)

      block_of = functools.partial(_block, spec, total, infilling=infilling)
      x, *rest = _over_blocks(spec, total, block_of, body, carry)
      if spec.early_stop:  # what finished rows did not generate ends the answer
        x = jnp.where((x == spec.mask_id) & (jnp.arange(total) >= prompt_len), spec.eos_id, x)
      return (x, *rest)

    if spec.use_threshold:
      x, steps, _ = over_blocks(
          lambda r, block, c: threshold_schedule(
              spec, r, step_logits, block, c, scalars["threshold"]
          ),
          (x, jnp.zeros((batch,), jnp.int32), cache),
      )
      return (x, steps) if spec.return_steps else x
    trajectory = jnp.zeros((spec.steps if spec.return_trajectory else 0, batch, total), jnp.int32)
    x, trajectory, _ = over_blocks(
        lambda r, block, c: fixed_schedule(spec, r, step_logits, block, c),
        (x, trajectory, cache),
    )
    if spec.return_steps:  # every row takes every step of the fixed schedule
      return x, jnp.full((batch,), spec.steps, jnp.int32)
    return (x, trajectory) if spec.return_trajectory else x

  return jax.jit(run)
