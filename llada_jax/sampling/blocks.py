"""The reverse process of a block diffusion model (BD3-LM, LLaDA 2.x) as one compiled program.

Blocks are aligned at each row's first real token, as in training (`BlockCausal` from position 0)
and in LLaDA 2.x's official `generate` (modeling_llada2_moe.py, ZHZisZZ/dllm): a prompt that ends
inside a block shares that block with the first answer tokens, and the prompt's earlier blocks
attend block-causally among themselves. The blocks are filled one after the other, each in at most
steps_per_block steps; step i of a block commits every masked position of the block whose
proposal's confidence exceeds τ (`parallel_threshold`; τ = 0 commits none this way) and at least
the n_i most confident ones, n being the block length split evenly over the steps with the first
(length mod steps) steps taking one more (the official `_get_num_transfer_tokens`, so a partial
block finishes early). A block ends when it has no mask left; a row ends after the block in which
it commits an end token (`llada_jax.sampling.ending`), the rest of its answer set to EOS. τ = 0 (or
τ >= 1: no probability exceeds 1) is the exact schedule of low-confidence decoding. Like the
official code, the last block runs to its end even past gen_length (its extra positions are part
of the block every earlier position of it attends to) and only gen_length tokens are returned.

Rows of different prompt lengths are laid out in one frame so that every row's first answer block
starts at the same index `first` (= the prompt width rounded down to a block): row r's tokens
start at first - (n_r rounded down to a block), each row ends with its last block, padding around
it. Every block is then one window [first + k B, first + (k + 1) B) of the frame for every row,
the blocks are a `while_loop` with dynamic windows (the compile time does not grow with the number
of blocks), and a row computes what it computes alone. With cache="prefix" the prompt's full
blocks are written to the cache once (`cache.prefill`), each step runs the current block alone
against the cache and each finished block is written once more (`cache.write_block`): exact,
since no block attends to a later one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.model import network, positions_from_mask
from llada_jax.model.masks import BlockCausal
from llada_jax.sampling.cache import (
    Block,
    Forward,
    block_cached_logits,
    empty_cache,
    prefill,
    uncached_logits,
    write_block,
)
from llada_jax.sampling.schedule import num_transfer_tokens, top_k_mask
from llada_jax.sampling.steps import Rows, SamplerSpec, propose

__all__ = ["Frame", "compiled_sampler", "layout"]


class Frame(NamedTuple):
  """Rows laid out so that their answers' first blocks share one window (module docstring).

  All arrays are [R, T] over the frame of T = first + (gen_length / B + 1) B positions."""

  tokens: jax.Array  # int32: prompt tokens, mask ids to fill, pad_id elsewhere
  valid: jax.Array  # bool: the row's prompt and answer blocks (padding is never attended to)
  is_prompt: jax.Array  # bool: the row's prompt tokens
  is_answer: jax.Array  # bool: the positions the row fills (through the end of its last block)
  answer_start: jax.Array  # int32 [R]: the frame index of each row's first answer token
  first: int  # the frame index of every row's first answer block


def layout(
    prompt: jax.Array,
    prompt_mask: jax.Array,
    gen_length: int,
    block_size: int,
    mask_id: int,
    pad_id: int,
) -> Frame:
  """The frame of prompts [R, P] int32 whose real tokens are marked by prompt_mask [R, P] bool (in
  order, wherever the padding is), each followed by gen_length mask ids through the end of its
  last block of block_size; pad_id fills the padding (never attended to)."""
  width = prompt.shape[1]
  length = jnp.sum(prompt_mask, axis=-1, dtype=jnp.int32)  # n_r
  first = width // block_size * block_size
  total = first + (gen_length // block_size + 1) * block_size
  start = first - length // block_size * block_size  # row r's position 0
  position = jnp.arange(total)[None, :] - start[:, None]
  is_prompt = (position >= 0) & (position < length[:, None])
  end = -(-(length + gen_length) // block_size) * block_size
  is_answer = (position >= length[:, None]) & (position < end[:, None])
  tokens = jnp.where(is_answer, mask_id, pad_id).astype(jnp.int32)
  if width:
    real = jnp.take_along_axis(prompt, jnp.argsort(~prompt_mask, axis=-1, stable=True), axis=-1)
    placed = jnp.take_along_axis(real, jnp.clip(position, 0, width - 1), axis=-1)
    tokens = jnp.where(is_prompt, placed, tokens)
  return Frame(tokens, is_prompt | is_answer, is_prompt, is_answer, start + length, first)


@functools.lru_cache(maxsize=32)
def compiled_sampler(spec: SamplerSpec) -> Callable[..., Any]:
  """The jitted reverse process of the block diffusion model of spec (spec.block_model = B):
  run(params, prompt [R, P] int32, prompt_mask [R, P] bool, row_keys [R, 2] uint32, scalars as
  `generate.sampler_scalars` gives them) -> int32 [R, P + gen_length], the prompt followed by
  each row's answer (and with spec.return_steps the forward passes of each row [R] int32: a pass
  counts for a row that still had masks in the block)."""
  size = spec.block_model
  plain = network(spec.model)
  patterned = network(spec.model, BlockCausal(size))
  quota = num_transfer_tokens(jnp.asarray([size], jnp.int32), spec.steps_per_block)[0]
  end_ids = jnp.asarray(spec.end_ids, jnp.int32)

  def run(params, prompt, prompt_mask, row_keys, scalars):
    frame = layout(prompt, prompt_mask, spec.gen_length, size, spec.mask_id, spec.eos_id)
    batch, total = frame.tokens.shape
    rows = Rows(
        frame.valid,
        positions_from_mask(frame.valid),
        row_keys,
        scalars["temperature"],
        scalars["top_k"],
        scalars["top_p"],
    )
    forward = Forward(
        plain,
        params,
        frame.valid,
        scalars["cfg_scale"],
        frame.is_prompt if spec.use_cfg else None,
        spec.mask_id,
        spec.shifted,
    )
    full = forward._replace(model=patterned)
    threshold = scalars["threshold"].astype(spec.real)
    threshold = jnp.where(threshold > 0, threshold, jnp.inf)
    index = jnp.arange(total)

    if spec.cache == "none":
      cache = ()
      step_logits = functools.partial(uncached_logits, full, refresh_every=0)
    else:
      rows_in_pass = batch * (2 if spec.use_cfg else 1)
      cache = prefill(full, frame.tokens, frame.first, empty_cache(spec.model, rows_in_pass, total))
      step_logits = functools.partial(block_cached_logits, forward, refresh_every=0, size=size)

    def finished(x):  # bool [R]: rows that have committed an end token
      return jnp.any(jnp.isin(x, end_ids) & frame.is_answer, axis=-1)

    def to_fill(x):  # bool [R, T]: the masks of the rows still generating
      return (x == spec.mask_id) & frame.is_answer & ~finished(x)[:, None]

    def fill_block(k, x, passes, cache):
      block = Block(k, frame.first + k * size, frame.first + (k + 1) * size)
      active = rows._replace(attention_mask=frame.valid & ~finished(x)[:, None])
      in_block = (index >= block.start) & (index < block.end)

      def waiting(x):  # bool [R]: rows with masks left in this block
        return jnp.any((x == spec.mask_id) & in_block & active.attention_mask, axis=-1)

      def more(carry):
        x, i, _, _ = carry
        return (i < spec.steps_per_block) & jnp.any(waiting(x))

      def step(carry):
        x, i, passes, cache = carry
        logits, start, cache = step_logits(x, i, cache, block)
        x0, confidence, candidate = propose(
            spec, active, x, logits, start, k * spec.steps_per_block + i, block.end
        )
        least = top_k_mask(confidence, jnp.full((batch,), quota[i]))
        commit = candidate & (least | (confidence > threshold))
        counted = passes + waiting(x) if spec.return_steps else passes
        return jnp.where(commit, x0, x), i + 1, counted, cache

      x, _, passes, cache = jax.lax.while_loop(more, step, (x, jnp.int32(0), passes, cache))
      if spec.cache != "none":
        cache = write_block(forward, x, cache, block, size=size)
      return x, passes, cache

    def blocks_left(carry):
      k, x, _, _ = carry
      return (k < spec.num_blocks + 1) & jnp.any(to_fill(x))

    _, x, passes, _ = jax.lax.while_loop(
        blocks_left,
        lambda carry: (carry[0] + 1, *fill_block(*carry)),
        (jnp.int32(0), frame.tokens, jnp.zeros((batch,), jnp.int32), cache),
    )
    x = jnp.where((x == spec.mask_id) & frame.is_answer, spec.eos_id, x)
    where = frame.answer_start[:, None] + jnp.arange(spec.gen_length)[None, :]
    tokens = jnp.concatenate([prompt, jnp.take_along_axis(x, where, axis=-1)], axis=1)
    return (tokens, passes) if spec.return_steps else tokens

  return jax.jit(run)
