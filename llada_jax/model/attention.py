"""The one attention entry point of the mask predictor.

Every transformer block calls `attention`; implementations are chosen by name so that fast kernels
(cuDNN flash attention on GPU, Pallas splash attention on TPU) slot in without touching the model.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from llada_jax.config import ATTENTION_IMPLEMENTATIONS
from llada_jax.model import splash
from llada_jax.model.masks import BlockCausal
from llada_jax.parallel.kernels import target_platform


def resolve(
    implementation: str,
    dtype: str,
    platform: str | None = None,
    lengths: tuple[int, int] | None = None,
) -> str:
  """The implementation `auto` stands for: cuDNN flash attention on GPUs for 16-bit compute,
  Pallas splash attention on TPUs for (query, key) lengths that are multiples of 128, else the
  XLA one. Others are returned unchanged. platform defaults to the one the current trace compiles
  for (`llada_jax.parallel.kernels.target_platform`: a TPU mesh on a CPU host says "tpu")."""
  if implementation != "auto":
    return implementation
  platform = platform or target_platform()
  if platform == "gpu" and dtype in ("bfloat16", "float16"):
    return "cudnn"
  if platform == "tpu" and lengths is not None and splash.supports(*lengths):
    return "splash"
  return "xla"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool,
    key_mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    implementation: str = "xla",
    pattern: BlockCausal | None = None,
) -> jax.Array:
  """Scaled dot-product attention with grouped-query heads.

  Args:
    q: queries [batch, q_len, n_heads, head_dim].
    k, v: keys and values [batch, kv_len, n_kv_heads, head_dim]; n_kv_heads divides n_heads and kv
      head j serves query heads j*G .. j*G+G-1 (G = n_heads / n_kv_heads), as repeat_interleave
      does.
    causal: mask keys after each query (the autoregressive baseline); LLaDA itself is bidirectional.
    key_mask: optional bool [batch, kv_len]; False keys are never attended to (padding, cut length).
    segment_ids: optional int [batch, len] (self-attention); a query attends only to keys of its
      own segment (documents packed into one row).
    implementation: "xla" (materialises the scores; softmax in float32), "jax_nn"
      (`jax.nn.dot_product_attention` lowered by XLA), "cudnn" (the same call as cuDNN flash
      attention: GPU, 16-bit inputs, head_dim <= 256), "splash" (Pallas TPU flash attention,
      lengths multiples of 128; interpreted off TPU) or "auto" (see `resolve`).
    pattern: optional static block-causal pattern (`llada_jax.model.masks.BlockCausal`) of a
      block diffusion model, on top of the masks above; self-attention only (q_len == kv_len).

  Returns:
    [batch, q_len, n_heads, head_dim] in the dtype of v.
  """
  implementation = resolve(implementation, str(v.dtype), lengths=(q.shape[1], k.shape[1]))
  if implementation not in KERNELS:
    raise ValueError(
        f"attention implementation {implementation!r} is not one of {ATTENTION_IMPLEMENTATIONS}"
    )
  return KERNELS[implementation](q, k, v, causal, key_mask, segment_ids, pattern)


def _xla(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    causal: bool,
    key_mask: jax.Array | None,
    segment_ids: jax.Array | None,
    pattern: BlockCausal | None = None,
) -> jax.Array:
  """Grouped-query attention in plain XLA ops: materialises the scores, softmax in float32."""
  batch, q_len, n_heads, head_dim = q.shape
  kv_len, n_kv_heads = k.shape[1], k.shape[2]
  groups = n_heads // n_kv_heads
  q = q.reshape(batch, q_len, n_kv_heads, groups, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores * (1.0 / jnp.sqrt(jnp.float32(head_dim)))
  allowed = jnp.ones((1, 1, 1, q_len, kv_len), dtype=bool)
  if causal:
    allowed = allowed & jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))
  if pattern is not None:
    allowed = allowed & pattern.dense(q_len, kv_len)
  if key_mask is not None:
    allowed = allowed & key_mask[:, None, None, None, :]
  if segment_ids is not None:
    allowed = allowed & (segment_ids[:, None, None, :, None] == segment_ids[:, None, None, None, :])
  scores = jnp.where(allowed, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(batch, q_len, n_heads, head_dim)


def _jax_nn(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    causal: bool,
    key_mask: jax.Array | None,
    segment_ids: jax.Array | None,
    pattern: BlockCausal | None,
    implementation: str,
) -> jax.Array:
  """jax.nn.dot_product_attention with native GQA. Padding at the end of every row (training's
  cut sequences) goes in as key lengths, the cuDNN fast path; any other padding (left-padded
  prompts), packing or a block-causal pattern goes in as one boolean mask [B, 1, T, S]. The
  choice is a lax.cond on the mask, so both are compiled and the right one runs."""
  implementation = None if implementation == "jax_nn" else "cudnn"

  def dense() -> jax.Array:
    mask = None
    if key_mask is not None:
      mask = key_mask[:, None, None, :]
    if segment_ids is not None:
      same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
      mask = same if mask is None else mask & same
    if pattern is not None:
      blocks = jnp.asarray(pattern.dense(q.shape[1], k.shape[1]))[None, None]
      mask = blocks if mask is None else mask & blocks
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask, is_causal=causal, implementation=implementation
    )

  if key_mask is None or segment_ids is not None or pattern is not None:
    return dense()
  lengths = jnp.sum(key_mask, axis=-1, dtype=jnp.int32)
  right_padded = jnp.all(key_mask == (jnp.arange(key_mask.shape[1]) < lengths[:, None]))
  return jax.lax.cond(
      right_padded,
      lambda: jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, key_value_seq_lengths=lengths, implementation=implementation
      ),
      dense,
  )


# The kernel of each name in llada_jax.config.ATTENTION_KERNELS ("auto" is resolved before).
KERNELS = {
    "xla": _xla,
    "jax_nn": functools.partial(_jax_nn, implementation="jax_nn"),
    "cudnn": functools.partial(_jax_nn, implementation="cudnn"),
    "splash": splash.splash_attention,
}
