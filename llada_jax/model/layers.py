"""Building blocks of the LLaMA-style mask predictor: initializers, RMSNorm, rotary embeddings."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def dense_init(std: float, axes: tuple[str, ...]) -> nn.initializers.Initializer:
  """Normal(0, std) initializer whose parameter carries logical axis names for sharding."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class RMSNorm(nn.Module):
  """RMSNorm with a weight and no bias; the variance is computed in float32 (as official LLaDA)."""

  eps: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    weight = self.param(
        "weight",
        nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
        (x.shape[-1],),
        self.param_dtype,
    )
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
    return weight.astype(self.dtype) * normed.astype(self.dtype)


@functools.lru_cache(maxsize=32)
def rope_tables(length: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin [length, head_dim] of the rotary angles of positions 0..length-1.

  The angles are float32 products, as in the official model; cos and sin are taken in float64 and
  rounded once. Frequencies theta^(-2i/d) for i < d/2 apply to both halves of the head dim.
  """
  inv_freq = (1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)).astype(np.float32)
  freqs = np.arange(length, dtype=np.float32)[:, None] * inv_freq
  angles = np.concatenate([freqs, freqs], axis=-1).astype(np.float64)
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(
    x: jax.Array, positions: jax.Array, theta: float, max_length: int = 0, rotary_dim: int = 0
) -> jax.Array:
  """Rotary embedding, "rotate-half" convention, computed in float32.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq] integer positions below
  max(max_length, seq). rotary_dim: partial rotary (LLaDA 2.x: head_dim * partial_rotary_factor):
  only the first rotary_dim dims of each head rotate, with the frequencies of a rotary_dim-wide
  head, and the rest pass through; 0 rotates the whole head. cos and sin are gathered from
  constant tables by position: computed in the graph, XLA evaluates them inside every per-head
  fusion (10% of a small forward on CPU).
  """
  width = rotary_dim or x.shape[-1]
  cos, sin = rope_tables(max(max_length, x.shape[1]), width, theta)
  cos, sin = (jnp.asarray(t)[positions][:, :, None, :] for t in (cos, sin))
  x32 = x.astype(jnp.float32)
  rotary, rest = x32[..., :width], x32[..., width:]
  first, second = jnp.split(rotary, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  out = rotary * cos + rotated * sin
  if rest.shape[-1]:
    out = jnp.concatenate([out, rest], axis=-1)
  return out.astype(x.dtype)


class Projection(nn.Module):
  """Bias-free linear map from the last `in_dims` axes of x to `features`.

  The kernel has shape x.shape[-in_dims:] + features and logical names `axes` (input axes first),
  so e.g. q_proj is [embed, heads, kv] and attn_out is [heads, kv, embed].
  """

  features: tuple[int, ...]
  axes: tuple[str, ...]
  init_std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  in_dims: int = 1

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = tuple(x.shape[-self.in_dims :]) + tuple(self.features)
    kernel = self.param("kernel", dense_init(self.init_std, self.axes), shape, self.param_dtype)
    return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_dims)
