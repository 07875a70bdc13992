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
block, refresh_every) and returns (logits [B, W, V] of positions [start, start + W), start, carry),
position i's logits being those that predict token i (`llada_jax.diffusion.alignment`: with the
shifted alignment a window starts one position early, so that its first token has its
predecessor's logits). The cached modes need the block's bounds as Python ints (static window
shapes). Every row of a batch computes what it would alone: a row whose own block starts after the
window's start (a plain prompt beside an infilling one) keeps its cached keys before it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from llada_jax.config import CACHE_MODES
from llada_jax.diffusion import alignment
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
  first block starts at 0 when a prompt of the batch holds masks). Python ints when the blocks are
  unrolled, int32 scalars inside a loop over blocks. row_start: int32 [B], where each row's own
  block starts (0 for a row whose prompt holds masks, the answer block's start for the others),
  when it differs between rows; None when every row's block is [start, end)."""

  index: Any
  start: Any
  end: Any
  row_start: jax.Array | None = None


class Forward(NamedTuple):
  """The mask predictor of one sampling call, guided when `prompt` is given."""

  model: Transformer
  params: Any
  attention_mask: jax.Array  # bool [B, T], False on padding
  cfg_scale: jax.Array  # float32 [], the guidance weight w
  prompt: jax.Array | None  # bool [B, T]: the prompt tokens CFG masks (None: no CFG)
  mask_id: int
  shifted: bool = False  # the shifted logit alignment (`llada_jax.diffusion.alignment`)

  @property
  def positions(self) -> jax.Array:
    """int32 [B, T]: each position counted from its row's first real token."""
    return positions_from_mask(self.attention_mask)

  def aligned(self, logits: jax.Array, start: Any, first: jax.Array | None = None) -> jax.Array:
    """Logits [B, W, V] of positions [start, start + W) as the predictions of those positions:
    unchanged, or with the shifted alignment each position's predecessor's (`first` [B, V]: the
    logits of position start - 1, when the window does not hold them)."""
    if not self.shifted:
      return logits
    where = jax.lax.dynamic_slice_in_dim(self.positions, start, logits.shape[1], axis=1)
    return alignment.shift(logits, where, first)

  def unconditional(self, x: jax.Array) -> jax.Array | None:
    """x [B, T] with the prompt masked (the unconditional rows of CFG), None without CFG."""
    return None if self.prompt is None else jnp.where(self.prompt, self.mask_id, x)

  def full(self, x: jax.Array) -> jax.Array:
    """The predictions [B, T, V] of a full pass (`aligned`)."""
    logits = apply_model(
        self.model, self.params, x, self.attention_mask, self.unconditional(x), self.cfg_scale
    )
    return self.aligned(logits, 0)

  def windowed(
      self,
      x: jax.Array,
      start: int,
      end: int,
      cache: KVCache | None,
      write: bool = False,
      keep: jax.Array | None = None,
      width: int | None = None,
  ) -> tuple[jax.Array, KVCache]:
    """`window_logits` of positions [start, end) of x [B, T] (not aligned)."""
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
        keep,
        width,
    )

  def up_to(self, end: Any) -> Forward:
    """The same forward with the keys at and after `end` hidden (a block model's later
    blocks)."""
    return self._replace(
        attention_mask=self.attention_mask & (jnp.arange(self.attention_mask.shape[1]) < end)
    )


def window(
    mode: str, block_start: int, block_end: int, total: int, lead: int = 0
) -> tuple[int, int]:
  """[start, end) of the positions a cached step computes for the block [block_start, block_end),
  `lead` positions before the block included (1 for the shifted alignment)."""
  return max(block_start - lead, 0), (total if mode == "prefix" else block_end)


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
    keep: jax.Array | None = None,
    width: int | None = None,
) -> tuple[jax.Array, KVCache]:
  """Logits [B, end - start, V] of the window of tokens [B, T], guided when `unconditional` is
  given (both rows in one batch, as apply_model), and the cache: with cache=None a full pass that
  returns the fresh cache of all T positions; otherwise the window alone against the cache, which
  is returned unchanged, or with `write` holding the window's fresh keys and values. keep: bool
  [B, T], positions of the window whose cached keys and values a row uses instead of fresh ones.
  start and end are Python ints, or int32 scalars with `width` (= end - start) given as an int."""
  width = end - start if width is None else width

  def cut(a: jax.Array) -> jax.Array:
    return jax.lax.dynamic_slice_in_dim(a, start, width, axis=1)

  mask = attention_mask.astype(bool)
  positions = positions_from_mask(mask)
  if unconditional is not None:
    tokens = jnp.concatenate([tokens, unconditional])
    mask, positions = jnp.concatenate([mask, mask]), jnp.concatenate([positions, positions])
    keep = None if keep is None else jnp.concatenate([keep, keep])
  if cache is None:
    logits, cache = model.apply({"params": params}, tokens, mask, positions, return_kv=True)
    logits = cut(logits)
  else:
    out = model.apply(
        {"params": params},
        cut(tokens),
        mask,
        cut(positions),
        kv_cache=cache,
        cache_start=start,
        return_kv=write,
        cache_keep=keep,
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
    mode: str,
    forward: Forward,
    x: jax.Array,
    i: jax.Array,
    cache: KVCache,
    block: Block,
    refresh_every: int,
) -> tuple[jax.Array, int, KVCache]:
  """The window of `mode` for the block: a full pass that refills the cache at the block's first
  step (and every refresh_every > 0 steps), else the window against the cache, each row's keys
  before its own window start (`Block.row_start`) kept from the cache."""
  lead = int(forward.shifted)
  start, end = window(mode, block.start, block.end, x.shape[1], lead)
  keep = None
  if block.row_start is not None:
    keep = jnp.arange(x.shape[1]) < jnp.maximum(block.row_start - lead, 0)[:, None]
  refresh = i == 0
  if refresh_every:
    refresh = i % refresh_every == 0
  logits, cache = jax.lax.cond(
      refresh,
      lambda x, c: forward.windowed(x, start, end, None),
      lambda x, c: forward.windowed(x, start, end, c, keep=keep),
      x,
      cache,
  )
  return forward.aligned(logits, start), start, cache


def prefix_logits(
    forward: Forward, x: jax.Array, i: jax.Array, cache: KVCache, block: Block, refresh_every: int
) -> tuple[jax.Array, int, KVCache]:
  """Mode "prefix": the block and everything after it."""
  return _cached_logits("prefix", forward, x, i, cache, block, refresh_every)


def dual_logits(
    forward: Forward, x: jax.Array, i: jax.Array, cache: KVCache, block: Block, refresh_every: int
) -> tuple[jax.Array, int, KVCache]:
  """Mode "dual": the block alone."""
  return _cached_logits("dual", forward, x, i, cache, block, refresh_every)


BlockCache = tuple[KVCache, jax.Array]  # keys/values, and the logits [B, V] before the block


def prefill(patterned: Forward, x: jax.Array, prompt_len: int, cache: KVCache) -> BlockCache:
  """A block model's cache with the keys and values of the prompt, positions [0, prompt_len) of
  x [B, T], written by one pass of the prompt under its block-causal pattern (`patterned.model`
  carries it), and the logits [B, V] of the prompt's last position (what the shifted alignment
  reads for the answer's first token; zeros for an empty prompt)."""
  batch = x.shape[0]
  if not prompt_len:
    return cache, jnp.zeros((batch, patterned.model.cfg.vocab_size), jnp.float32)
  tokens, mask = x[:, :prompt_len], patterned.attention_mask[:, :prompt_len]
  unconditional = patterned.unconditional(x)
  if unconditional is not None:
    tokens = jnp.concatenate([tokens, unconditional[:, :prompt_len]])
    mask = jnp.concatenate([mask, mask])
  logits, kv = patterned.model.apply(
      {"params": patterned.params}, tokens, mask, positions_from_mask(mask), return_kv=True
  )
  last = logits[:, -1]
  if unconditional is not None:
    cond, uncond = jnp.split(last, 2)
    last = uncond + (patterned.cfg_scale + 1.0) * (cond - uncond)
  cache = tuple(
      jax.lax.dynamic_update_slice_in_dim(c, t.astype(c.dtype), 0, axis=2)
      for c, t in zip(cache, kv)
  )
  return cache, last


def block_cached_logits(
    forward: Forward,
    x: jax.Array,
    i: jax.Array,
    cache: BlockCache,
    block: Block,
    refresh_every: int,
    *,
    size: int,
) -> tuple[jax.Array, Any, BlockCache]:
  """A block model's exact cache: the block of `size` positions alone against the prompt's and
  finished blocks' keys and values (nothing at or after the block's end is attended to); with the
  shifted alignment the block's first token reads the carried logits of the position before it.
  block.start may be an int32 scalar (a loop over blocks)."""
  del i, refresh_every
  kv, previous = cache
  logits, _ = forward.up_to(block.end).windowed(x, block.start, block.end, kv, width=size)
  return forward.aligned(logits, block.start, previous), block.start, cache


def write_block(
    forward: Forward, x: jax.Array, cache: BlockCache, block: Block, *, size: int
) -> BlockCache:
  """The cache with the finished block's keys and values, from one pass of the block (`size`
  positions) against the cache (what later blocks of a block model attend to; they never change
  it), and the logits of its last position."""
  logits, kv = forward.up_to(block.end).windowed(
      x, block.start, block.end, cache[0], write=True, width=size
  )
  return kv, logits[:, -1]


StepLogits = Callable[[Forward, jax.Array, jax.Array, Any, Block, int], tuple[jax.Array, int, Any]]
# Keyed by exactly llada_jax.config.CACHE_MODES (tests/test_sampling.py checks the coverage).
STEP_LOGITS: dict[str, StepLogits] = {
    "none": uncached_logits,
    "prefix": prefix_logits,
    "dual": dual_logits,
}
