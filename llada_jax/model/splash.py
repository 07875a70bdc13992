"""Pallas splash attention (TPU flash attention) behind the model's attention entry point.

The kernel works per example and per key/value head on [heads, length, head_dim] blocks; grouped
query heads go in as the kernel's multi-query form (the G query heads of one key/value head share
it). Padding and packed documents become segment ids: a query attends to keys of its own segment,
padding keys get segment 0, which no real query has. Off TPU the kernel runs in Pallas interpret
mode (slow; for tests). Lengths must be multiples of 128 (the kernel's lane width). Inside a
device mesh the kernel runs per shard (`llada_jax.parallel.kernels`), never on gathered operands.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from llada_jax.model.masks import BlockCausal
from llada_jax.parallel.kernels import shard_map_logical

LANES = 128


def supports(q_len: int, kv_len: int) -> bool:
  """Whether splash attention can run these lengths (both multiples of 128)."""
  return q_len % LANES == 0 and kv_len % LANES == 0


def splash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    causal: bool,
    key_mask: jax.Array | None,
    segment_ids: jax.Array | None,
    pattern: BlockCausal | None = None,
) -> jax.Array:
  """attention() through the splash kernel; q [B, T, H, D], k and v [B, S, KH, D]. A block-causal
  `pattern` becomes a splash mask computed inside the kernel (no [T, S] table in memory), and its
  fully masked tiles are skipped.

  Inside a mesh (`jax.set_mesh`) the kernel runs per device under `shard_map`: the batch split as
  the logical axis rules split "activation_batch", the heads as they split "heads" and "kv_heads";
  the sequence is never split (each device needs every key of its rows). No activation is
  gathered. Raises ValueError for lengths that are not multiples of 128, or rules that split query
  and key/value heads differently (a device must hold whole groups of query heads).
  """
  batch, q_len, n_heads, _ = q.shape
  kv_len, n_kv_heads = k.shape[1], k.shape[2]
  if not supports(q_len, kv_len):
    raise ValueError(
        f"splash attention needs lengths that are multiples of {LANES}, got queries "
        f"{q_len} and keys {kv_len}: use model.attention='xla' or 'auto'"
    )
  q_segments, kv_segments = _segments(batch, q_len, key_mask, segment_ids)
  groups = n_heads // n_kv_heads
  q_names = ("activation_batch", None, "heads", None)
  kv_names = ("activation_batch", None, "kv_heads", None)
  segment_names = ("activation_batch", None)

  def local(q, k, v, q_segments, kv_segments):
    if q.shape[2] != k.shape[2] * groups:
      raise ValueError(
          f"splash attention got {q.shape[2]} query heads and {k.shape[2]} key/value "
          f"heads per device: mesh.axis_rules must split 'heads' and 'kv_heads' over "
          f"the same mesh axes (groups of {groups} query heads per key/value head)"
      )
    return _local_splash(q, k, v, causal, q_segments, kv_segments, pattern)

  return shard_map_logical(
      local,
      (q, k, v, q_segments, kv_segments),
      (q_names, kv_names, kv_names, segment_names, segment_names),
      q_names,
      q.shape,
  )


def _local_splash(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    causal: bool,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
    pattern: BlockCausal | None = None,
) -> jax.Array:
  """The splash kernel on one device's rows and heads: the compiled Mosaic kernel when lowered for
  TPU, the same kernel interpreted elsewhere (decided at lowering, by the target platform)."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib,
  )

  batch, q_len, n_heads, head_dim = q.shape
  kv_len, n_kv_heads = k.shape[1], k.shape[2]
  groups = n_heads // n_kv_heads
  q = q * (1.0 / np.sqrt(head_dim)).astype(q.dtype)
  q = q.reshape(batch, q_len, n_kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)
  k, v = (t.transpose(0, 2, 1, 3) for t in (k, v))

  def run(interpret: bool, q, k, v, q_segments, kv_segments):
    kernel = _kernel(q_len, kv_len, groups, causal, interpret, pattern)

    def one_head(qh, kh, vh, q_seg, kv_seg):
      segments = None if q_seg is None else kernel_lib.SegmentIds(q=q_seg, kv=kv_seg)
      return kernel(qh, kh, vh, segment_ids=segments)

    per_example = jax.vmap(one_head, in_axes=(0, 0, 0, None, None))
    return jax.vmap(per_example)(q, k, v, q_segments, kv_segments)

  def call(q, k, v, q_segments, kv_segments):
    return jax.lax.platform_dependent(
        q,
        k,
        v,
        q_segments,
        kv_segments,
        tpu=functools.partial(run, False),
        default=functools.partial(run, True),
    )

  if jnp.dtype(q.dtype).itemsize == 2:
    out = _at_default_precision(call, q, k, v, q_segments, kv_segments)
  else:
    out = call(q, k, v, q_segments, kv_segments)
  return out.transpose(0, 3, 1, 2, 4).reshape(batch, q_len, n_heads, head_dim).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _at_default_precision(
    fn: Callable[..., jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_segments: jax.Array | None,
    kv_segments: jax.Array | None,
) -> jax.Array:
  """fn(q, k, v, segments) with its forward and backward kernels traced at the default matmul
  precision. Mosaic refuses a "highest" request for 16-bit operands (their products are exact in
  the float32 accumulator anyway), and jax_default_matmul_precision=highest is a common setting;
  the backward kernel is traced at differentiation time, hence the custom_vjp."""
  with jax.default_matmul_precision("default"):
    return fn(q, k, v, q_segments, kv_segments)


def _at_default_precision_fwd(fn, q, k, v, q_segments, kv_segments):
  with jax.default_matmul_precision("default"):
    return jax.vjp(lambda q, k, v: fn(q, k, v, q_segments, kv_segments), q, k, v)


def _at_default_precision_bwd(fn, pullback, cotangent):
  del fn
  with jax.default_matmul_precision("default"):
    return (*pullback(cotangent), None, None)


_at_default_precision.defvjp(_at_default_precision_fwd, _at_default_precision_bwd)


def _segments(
    batch: int, q_len: int, key_mask: jax.Array | None, segment_ids: jax.Array | None
) -> tuple[jax.Array | None, jax.Array | None]:
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


def _kernel(
    q_len: int,
    kv_len: int,
    groups: int,
    causal: bool,
    interpret: bool,
    pattern: BlockCausal | None = None,
):
  """The multi-query splash kernel for one key/value head and its `groups` query heads.

  Built inside the caller's trace, so its mask tables are constants of that trace (eager arrays
  would need a device of the trace's mesh, and compile-only TPU devices have none); the expensive
  mask preprocessing is cached by the kernel library itself."""
  from jax.experimental.pallas.ops.tpu.splash_attention import (  # pylint: disable=g-import-not-at-top
      splash_attention_kernel as kernel_lib,
      splash_attention_mask as mask_lib,
  )

  shape = (q_len, kv_len)
  one = mask_lib.CausalMask(shape) if causal else mask_lib.FullMask(shape)
  if pattern is not None:
    blocks = _pattern_mask(mask_lib, pattern, shape)
    one = mask_lib.LogicalAnd(one, blocks) if causal else blocks
  block_q, block_kv = _block(q_len), _block(kv_len)
  sizes = kernel_lib.BlockSizes(
      block_q=block_q,
      block_kv=block_kv,
      block_kv_compute=block_kv,
      block_q_dkv=block_q,
      block_kv_dkv=block_kv,
      block_kv_dkv_compute=block_kv,
      block_q_dq=block_q,
      block_kv_dq=block_kv,
  )
  return kernel_lib.make_splash_mqa_single_device(
      mask_lib.MultiHeadMask([one] * groups), block_sizes=sizes, interpret=interpret
  )


def _pattern_mask(mask_lib: Any, pattern: BlockCausal, shape: tuple[int, int]) -> Any:
  """The block-causal `pattern` as a splash mask that the kernel computes from indices."""

  class _BlockCausalMask(mask_lib._ComputableMask):  # pylint: disable=protected-access
    """splash's computable-mask interface around BlockCausal.rule."""

    def __init__(self):
      self.pattern = pattern
      super().__init__(shape=shape, mask_function=pattern.rule(*shape))

    def __eq__(self, other: object) -> bool:
      return (
          isinstance(other, type(self))
          and other.pattern == self.pattern
          and other.shape == self.shape
      )

    def __hash__(self) -> int:
      return hash((BlockCausal, pattern, shape))

  return _BlockCausalMask()


def _block(length: int) -> int:
  """The largest of 512, 256, 128 that divides length."""
  return next(b for b in (512, 256, 128) if length % b == 0)
