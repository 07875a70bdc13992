"""Building blocks of the LLaMA-style mask predictor: initializers, RMSNorm, rotary embeddings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


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
    weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(variance + self.eps)).astype(x.dtype)
    return weight.astype(self.dtype) * normed.astype(self.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary embedding, "rotate-half" convention, computed in float32.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq] integer positions.
  Frequencies theta^(-2i/d) for i < d/2 apply to both halves of the head dim, as in LLaDA.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)



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
    shape = tuple(x.shape[-self.in_dims:]) + tuple(self.features)
    kernel = self.param("kernel", dense_init(self.init_std, self.axes), shape, self.param_dtype)
    return jnp.tensordot(x.astype(self.dtype), kernel.astype(self.dtype), axes=self.in_dims)
