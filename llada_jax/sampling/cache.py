"""Prefix and dual key/value caches for the reverse process (Fast-dLLM), an approximation.

Within a block only the positions near the block change, so the keys and values of the rest can be
reused. A refresh step runs the full forward pass and keeps every layer's keys and values; the
other steps compute only a window of the sequence and attend to the cache for the rest:
prefix: the window is the current block and everything after it (the prompt and finished blocks
come from the cache); dual: the window is the current block alone (the masked suffix is cached
too). The cache is refreshed at every block boundary and, with `refresh_every` = k > 0, every k
steps inside a block; refreshing every step is exact decoding.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from llada_jax.model import ModelConfig, Transformer, positions_from_mask
from llada_jax.model.transformer import KVCache

CACHE_MODES = ("none", "prefix", "dual")


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
) -> tuple[jax.Array, KVCache]:
  """Logits [B, end - start, V] of the window of tokens [B, T], guided when `unconditional` is
  given (both rows in one batch, as apply_model), and the cache: with cache=None a full pass that
  returns the fresh cache of all T positions; otherwise the window alone against the cache, which
  is returned unchanged."""
  mask = attention_mask.astype(bool)
  positions = positions_from_mask(mask)
  if unconditional is not None:
    tokens = jnp.concatenate([tokens, unconditional])
    mask, positions = jnp.concatenate([mask, mask]), jnp.concatenate([positions, positions])
  if cache is None:
    logits, cache = model.apply({"params": params}, tokens, mask, positions, return_kv=True)
    logits = logits[:, start:end]
  else:
    logits = model.apply(
        {"params": params},
        tokens[:, start:end],
        mask,
        positions[:, start:end],
        kv_cache=cache,
        cache_start=start,
    )
  if unconditional is not None:
    cond, uncond = jnp.split(logits, 2)
    logits = uncond + (cfg_scale + 1.0) * (cond - uncond)
  return logits, cache
