"""Pallas splash attention (TPU flash attention) behind the model's attention entry point.

The kernel works per example and per key/value head on [heads, length, head_dim] blocks; grouped
query heads go in as the kernel's multi-query form (the G query heads of one key/value head share
it). Padding and packed documents become segment ids: a query attends to keys of its own segment,
padding keys get segment 0, which no real query has. Off TPU the kernel runs in Pallas interpret
mode (slow; for tests). Lengths must be multiples of 128 (the kernel's lane width).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

LANES = 128


def supports(q_len: int, kv_len: int) -> bool:
  """Whether splash attention can run these lengths (both multiples of 128)."""
  return q_len % LANES == 0 and kv_len % LANES == 0


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, causal: bool,
                     key_mask: jax.Array | None, segment_ids: jax.Array | None) -> jax.Array:
  """attention() through the splash kernel; q [B, T, H, D], k and v [B, S, KH, D]."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib)

  batch, q_len, n_heads, head_dim = q.shape
  kv_len, n_kv_heads = k.shape[1], k.shape[2]
  if not supports(q_len, kv_len):
    raise ValueError(f"splash attention needs lengths that are multiples of {LANES}, got queries "
                     f"{q_len} and keys {kv_len}: use model.attention='xla' or 'auto'")
  groups = n_heads // n_kv_heads
  kernel = _kernel(q_len, kv_len, groups, causal, jax.default_backend() != "tpu")
  q_segments, kv_segments = _segments(batch, q_len, kv_len, key_mask, segment_ids)
  q = (q * (1.0 / np.sqrt(head_dim)).astype(q.dtype))
  q = q.reshape(batch, q_len, n_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  k, v = (t.transpose(0, 2, 1, 3) for t in (k, v))

  def one_head(qh, kh, vh, q_seg, kv_seg):
    segments = None if q_seg is None else kernel_lib.SegmentIds(q=q_seg, kv=kv_seg)
    return kernel(qh, kh, vh, segment_ids=segments)

  per_example = jax.vmap(one_head, in_axes=(0, 0, 0, None, None))
  out = jax.vmap(per_example)(q, k, v, q_segments, kv_segments)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, n_heads, head_dim).astype(v.dtype)


def _segments(batch: int, q_len: int, kv_len: int, key_mask: jax.Array | None,
              segment_ids: jax.Array | None) -> tuple[jax.Array | None, jax.Array | None]:
  """Query and key segment ids [B, T], [B, S]: documents numbered from 1, padding keys 0."""
  if key_mask is None and segment_ids is None:
    return None, None
  if segment_ids is None:
    q_segments = jnp.ones((batch, q_len), jnp.int32)
    kv_segments = key_mask.astype(jnp.int32)
  else:
    kv_segments = segment_ids.astype(jnp.int32) + 1
    if key_mask is not None:
      kv_segments = jnp.where(key_mask, kv_segments, 0)
    q_segments = kv_segments
  return q_segments, kv_segments


@functools.lru_cache(maxsize=32)
def _kernel(q_len: int, kv_len: int, groups: int, causal: bool, interpret: bool):
  """The multi-query splash kernel for one key/value head and its `groups` query heads (cached:
  building one preprocesses the mask)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib, splash_attention_mask as mask_lib)

  shape = (q_len, kv_len)
  one = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
  block_q, block_kv = _block(q_len), _block(kv_len)
  sizes = kernel_lib.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv, block_q_dkv=block_q,
      block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv, block_q_dq=block_q,
      block_kv_dq=block_kv)
  with jax.ensure_compile_time_eval():  # the mask tables are constants, not tracers of the caller
    return kernel_lib.make_splash_mqa_single_device(
        mask_lib.MultiHeadMask([one] * groups), block_sizes=sizes, interpret=interpret)


def _block(length: int) -> int:
  """The largest of 512, 256, 128 that divides length."""
  return next(b for b in (512, 256, 128) if length % b == 0)
