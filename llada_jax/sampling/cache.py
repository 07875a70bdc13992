"""Prefix and dual key/value caches for the reverse process (Fast-dLLM), an approximation.

Within a block only the positions near the block change, so the keys and values of the rest can be
reused. A refresh step runs the full forward pass and keeps every layer's keys and values; the
other steps compute only a window of the sequence and attend to the cache for the rest:
prefix: the window is the current block and everything after it (the prompt and finished blocks
come from the cache); dual: the window is the current block alone (the masked suffix is cached
too). The cache is refreshed at every block boundary and, with `refresh_every` = k > 0, every k
steps inside a block; refreshing every step is exact decoding.

STEP_LOGITS holds one logits function per mode of `llada_jax.config.CACHE_MODES` ("none": the full
pass, every step). Each takes (forward, x [B, T], the step i inside the block, the cache carry, the
block, refresh_every) and returns (logits [B, W, V] of positions [start, start + W), start, carry).
The cached modes need the block's bounds as Python ints (static window shapes).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.config import CACHE_MODES
from llada_jax.model import ModelConfig, Transformer, apply_model, positions_from_mask
from llada_jax.model.transformer import KVCache

__all__ = [
    "CACHE_MODES",
    "STEP_LOGITS",
    "Block",
    "Forward",
    "block_cached_logits",
    "empty_cache",
    "prefill",
    "write_block",
    "window",
    "window_logits",
]


class Block(NamedTuple):
  """A block of the answer: its index and the positions [start, end) whose masks it fills (the
  first block starts at 0 when the prompt holds masks). Python ints when the blocks are unrolled,
  int32 scalars inside a loop over blocks."""

  index: Any
  start: Any
  end: Any


class Forward(NamedTuple):
  """The mask predictor of one sampling call, guided when `prompt` is given."""

  model: Transformer
  params: Any
  attention_mask: jax.Array  # bool [B, T], False on padding
  cfg_scale: jax.Array  # float32 [], the guidance weight w
  prompt: jax.Array | None  # bool [B, T]: the prompt tokens CFG masks (None: no CFG)
  mask_id: int

  def unconditional(self, x: jax.Array) -> jax.Array | None:
    """x [B, T] with the prompt masked (the unconditional rows of CFG), None without CFG."""
    return None if self.prompt is None else jnp.where(self.prompt, self.mask_id, x)

  def full(self, x: jax.Array) -> jax.Array:
    """Logits [B, T, V] of a full pass."""
    return apply_model(
        self.model, self.params, x, self.attention_mask, self.unconditional(x), self.cfg_scale
    )

  def windowed(
      self, x: jax.Array, start: int, end: int, cache: KVCache | None, write: bool = False
  ) -> tuple[jax.Array, KVCache]:
    """`window_logits` of positions [start, end) of x [B, T]."""
    return window_logits(
        self.model,
        self.params,
        x,
        self.attention_mask,
        self.unconditional(x),
        self.cfg_scale,
        start,
        end,
        cache,
        write,
    )

  def up_to(self, end: int) -> Forward:
    """The same forward with the keys at and after `end` hidden (a block model's later
    blocks)."""
    return self._replace(
        attention_mask=self.attention_mask & (jnp.arange(self.attention_mask.shape[1]) < end)
    )


def window(mode: str, block_start: int, block_end: int, total: int) -> tuple[int, int]:
  """[start, end) of the positions a cached step computes for the block [block_start, block_end)."""
  return block_start, (total if mode == "prefix" else block_end)


def empty_cache(cfg: ModelConfig, rows: int, length: int) -> KVCache:
  """Zero keys and values for `rows` sequences of `length` (a loop carry before the first fill)."""
  shape = (cfg.n_layers, rows, length, cfg.n_kv_heads, cfg.head_dim)
  return jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)


def window_logits(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    attention_mask: jax.Array,
    unconditional: jax.Array | None,
    cfg_scale: jax.Array,
    start: int,
    end: int,
    cache: KVCache | None,
    write: bool = False,
) -> tuple[jax.Array, KVCache]:
  """Logits [B, end - start, V] of the window of tokens [B, T], guided when `unconditional` is
  given (both rows in one batch, as apply_model), and the cache: with cache=None a full pass that
  returns the fresh cache of all T positions; otherwise the window alone against the cache, which
  is returned unchanged, or with `write` holding the window's fresh keys and values."""
  mask = attention_mask.astype(bool)
  positions = positions_from_mask(mask)
  if unconditional is not None:
    tokens = jnp.concatenate([tokens, unconditional])
    mask, positions = jnp.concatenate([mask, mask]), jnp.concatenate([positions, positions])
  if cache is None:
    logits, cache = model.apply({"params": params}, tokens, mask, positions, return_kv=True)
    logits = logits[:, start:end]
  else:
    out = model.apply(
        {"params": params},
        tokens[:, start:end],
        mask,
        positions[:, start:end],
        kv_cache=cache,
        cache_start=start,
        return_kv=write,
    )
    logits, cache = out if write else (out, cache)
  if unconditional is not None:
    cond, uncond = jnp.split(logits, 2)
    logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
  return logits, cache


def uncached_logits(
    forward: Forward, x: jax.Array, i: jax.Array, carry: Any, block: Block, refresh_every: int
) -> tuple[jax.Array, int, Any]:
  """Mode "none": the full pass at every step (the carry passes through)."""
  del i, block, refresh_every
  return forward.full(x), 0, carry


def _cached_logits(
    forward: Forward,
    x: jax.Array,
    i: jax.Array,
    cache: KVCache,
    start: int,
    end: int,
    refresh_every: int,
) -> tuple[jax.Array, int, KVCache]:
  """The window [start, end): a full pass that refills the cache at the block's first step (and
  every refresh_every > 0 steps), else the window against the cache."""
  refresh = i == 0
  if refresh_every:
    refresh = i % refresh_every == 0
  logits, cache = jax.lax.cond(
      refresh,
      lambda x, c: forward.windowed(x, start, end, None),
      lambda x, c: forward.windowed(x, start, end, c),
      x,
      cache,
  )
  return logits, start, cache


def prefix_logits(
    forward: Forward, x: jax.Array, i: jax.Array, cache: KVCache, block: Block, refresh_every: int
) -> tuple[jax.Array, int, KVCache]:
  """Mode "prefix": the block and everything after it."""
  return _cached_logits(
      forward, x, i, cache, *window("prefix", block.start, block.end, x.shape[1]), refresh_every
  )


def dual_logits(
    forward: Forward, x: jax.Array, i: jax.Array, cache: KVCache, block: Block, refresh_every: int
) -> tuple[jax.Array, int, KVCache]:
  """Mode "dual": the block alone."""
  return _cached_logits(
      forward, x, i, cache, *window("dual", block.start, block.end, x.shape[1]), refresh_every
  )


def prefill(patterned: Forward, x: jax.Array, prompt_len: int, cache: KVCache) -> KVCache:
  """A block model's cache with the keys and values of the prompt, positions [0, prompt_len) of
  x [B, T], written by one pass of the prompt under its block-causal pattern (`patterned.model`
  carries it)."""
  if not prompt_len:
    return cache
  tokens, mask = x[:, :prompt_len], patterned.attention_mask[:, :prompt_len]
  unconditional = patterned.unconditional(x)
  if unconditional is not None:
    tokens = jnp.concatenate([tokens, unconditional[:, :prompt_len]])
    mask = jnp.concatenate([mask, mask])
  _, kv = patterned.model.apply(
      {"params": patterned.params}, tokens, mask, positions_from_mask(mask), return_kv=True
  )
  return tuple(
      jax.lax.dynamic_update_slice_in_dim(c, t.astype(c.dtype), 0, axis=2)
      for c, t in zip(cache, kv)
  )


def block_cached_logits(
    forward: Forward, x: jax.Array, i: jax.Array, cache: KVCache, block: Block, refresh_every: int
) -> tuple[jax.Array, int, KVCache]:
  """A block model's exact cache: the block alone against the prompt's and finished blocks'
  keys and values (nothing at or after the block's end is attended to)."""
  del i, refresh_every
  logits, cache = forward.up_to(block.end).windowed(x, block.start, block.end, cache)
  return logits, block.start, cache


def write_block(forward: Forward, x: jax.Array, cache: KVCache, block: Block) -> KVCache:
  """The cache with the finished block's keys and values, from one pass of the block against
  the cache (what later blocks of a block model attend to; they never change it)."""
  _, cache = forward.up_to(block.end).windowed(x, block.start, block.end, cache, write=True)
  return cache


StepLogits = Callable[[Forward, jax.Array, jax.Array, Any, Block, int], tuple[jax.Array, int, Any]]
# Keyed by exactly llada_jax.config.CACHE_MODES (tests/test_sampling.py checks the coverage).
STEP_LOGITS: dict[str, StepLogits] = {
    "none": uncached_logits,
    "prefix": prefix_logits,
    "dual": dual_logits,
}
