"""The LLaDA mask predictor: embed -> pre-norm LLaMA blocks -> RMSNorm -> output head (its own,
or the embedding transposed with model.tie_embeddings).

Bidirectional by default; `causal=True` turns the same network into the autoregressive baseline.
Parameter names follow the official HF checkpoint (wte, attn_norm, q_proj, ..., ln_f, ff_out) and
every parameter carries logical axis names that `llada_jax.parallel` maps onto a device mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.ad_checkpoint import checkpoint_name

from llada_jax.model.attention import attention
from llada_jax.model.layers import Projection, RMSNorm, apply_rope, dense_init
from llada_jax.model.masks import BlockCausal
from llada_jax.model.moe import MoEConfig, MoEFeedForward

ACTIVATION = ("activation_batch", "activation_length", "activation_embed")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Static architecture settings (the `model` section of the config), and the block-causal
  attention pattern of one call of a block diffusion model (None: causal or bidirectional as
  `causal` says; set with dataclasses.replace by the callers that run a block model)."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  mlp_hidden_size: int
  max_sequence_length: int
  rope_theta: float
  rms_norm_eps: float
  causal: bool
  dtype: str
  param_dtype: str
  init_std: float
  scan_layers: bool
  remat: str
  attention: str
  qk_norm: bool
  rotary_dim: int
  tie_embeddings: bool
  moe: MoEConfig
  pattern: BlockCausal | None = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ModelConfig:
    values = config.model.to_dict()
    return cls(**{**values, "moe": MoEConfig(**values["moe"])})

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads

  @property
  def dense_layers(self) -> int:
    """How many layers (the first ones) have a dense SwiGLU; the rest are MoE layers."""
    return (
        min(self.moe.first_k_dense_replace, self.n_layers)
        if self.moe.num_experts
        else (self.n_layers)
    )


# What the backward pass may keep of a block, for each name of llada_jax.config.REMAT_POLICIES
# (model.remat); everything else is recomputed. none: no rematerialisation (None: the block is not
# wrapped in jax.checkpoint at all); minimal: the attention inputs and output (recompute the MLP
# and norms, the cheap-per-byte part); save_dots: every matmul output without a batch dimension
# (the projections); full: nothing.
REMAT_POLICIES = {
    "none": None,
    "minimal": jax.checkpoint_policies.save_only_these_names("qkv", "attention"),
    "save_dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
    "full": jax.checkpoint_policies.nothing_saveable,
}


KVCache = tuple[jax.Array, jax.Array]  # keys, values [(layers,) batch, length, kv_heads, head_dim]
RouterStats = dict[str, jax.Array]  # llada_jax.model.moe.router_statistics, stacked over MoE layers


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(attn_norm(x)); x + ffn(ff_norm(x)), the feed-forward a
  SwiGLU or, with moe_layer, the Mixture-of-Experts of `llada_jax.model.moe` (whose router
  statistics the block returns; {} otherwise).

  With `cache` (this layer's keys and values of the whole sequence) x is a window of the sequence
  starting at `cache_start`: its fresh keys and values overwrite the window's in the cache (except
  where `cache_keep` [batch, S] is True: a row whose own window starts later keeps its cached
  ones) and its queries attend to the whole sequence. With emit_kv the block also returns the keys
  and values it attended to (the sampler's prefix and dual caches).
  """

  cfg: ModelConfig
  emit_kv: bool = False
  moe_layer: bool = False

  @nn.compact
  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      key_mask: jax.Array | None,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
      cache_start: jax.Array | None = None,
      cache_keep: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[KVCache | None, RouterStats]]:
    cfg = self.cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)

    def norm(name: str) -> RMSNorm:
      return RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name=name)

    def proj(
        features: tuple[int, ...], axes: tuple[str, ...], name: str, in_dims: int = 1
    ) -> Projection:
      return Projection(features, axes, cfg.init_std, dtype, param_dtype, in_dims, name=name)

    h = norm("attn_norm")(x)
    q = proj((cfg.n_heads, cfg.head_dim), ("embed", "heads", "kv"), "q_proj")(h)
    k = proj((cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), "k_proj")(h)
    v = proj((cfg.n_kv_heads, cfg.head_dim), ("embed", "kv_heads", "kv"), "v_proj")(h)
    if cfg.qk_norm:
      q, k = norm("q_norm")(q), norm("k_norm")(k)
    length = max(cfg.max_sequence_length, x.shape[1] if cache is None else cache[0].shape[1])
    q = apply_rope(q, positions, cfg.rope_theta, length, cfg.rotary_dim)
    k = apply_rope(k, positions, cfg.rope_theta, length, cfg.rotary_dim)
    q, k, v = (checkpoint_name(t, "qkv") for t in (q, k, v))
    if cache is not None:
      k, v = (
          jax.lax.dynamic_update_slice_in_dim(c, t.astype(c.dtype), cache_start, axis=1)
          for c, t in zip(cache, (k, v))
      )
      if cache_keep is not None:
        k, v = (jnp.where(cache_keep[:, :, None, None], c, t) for c, t in zip(cache, (k, v)))
    a = attention(
        q,
        k,
        v,
        causal=cfg.causal,
        key_mask=key_mask,
        segment_ids=segment_ids,
        implementation=cfg.attention,
        pattern=cfg.pattern,
    )
    a = checkpoint_name(a, "attention")
    x = x + proj((cfg.d_model,), ("heads", "kv", "embed"), "attn_out", in_dims=2)(a)
    x = nn.with_logical_constraint(x, ACTIVATION)

    h = norm("ff_norm")(x)
    stats = {}
    if self.moe_layer:
      valid = key_mask if key_mask is not None and key_mask.shape == x.shape[:2] else None
      ffn, stats = MoEFeedForward(
          cfg.moe, cfg.d_model, cfg.init_std, dtype, param_dtype, name="moe"
      )(h, valid)
    else:
      gate = proj((cfg.mlp_hidden_size,), ("embed", "mlp"), "ff_proj")(h)
      up = proj((cfg.mlp_hidden_size,), ("embed", "mlp"), "up_proj")(h)
      hidden = nn.with_logical_constraint(
          nn.silu(gate) * up, ("activation_batch", "activation_length", "mlp")
      )
      ffn = proj((cfg.d_model,), ("mlp", "embed"), "ff_out")(hidden)
    x = nn.with_logical_constraint(x + ffn, ACTIVATION)
    return x, ((k, v) if self.emit_kv else None, stats)


class Transformer(nn.Module):
  """Maps token ids [batch, seq] to float32 logits [batch, seq, vocab_size]."""

  cfg: ModelConfig

  @nn.compact
  def __call__(
      self,
      tokens: jax.Array,
      attention_mask: jax.Array | None = None,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      return_hidden: bool = False,
      kv_cache: KVCache | None = None,
      cache_start: jax.Array | int = 0,
      return_kv: bool = False,
      cache_keep: jax.Array | None = None,
      return_aux: bool = False,
  ) -> Any:
    """attention_mask: bool [batch, seq], False for keys no position may attend to (padding);
    segment_ids: int [batch, seq], attention stays within a segment (packed documents);
    return_hidden: the final-norm output [batch, seq, d_model] instead of the logits (for a loss
    that applies the head `ff_out` in chunks);
    kv_cache: keys and values of every layer for a whole sequence of length S ([n_layers, batch, S,
    n_kv_heads, head_dim] each); tokens and positions are then the window starting at cache_start,
    attention_mask covers all S keys, and only the window is computed (its keys and values fresh,
    the rest from the cache);
    return_kv: also return the keys and values every layer attended to, as (logits, kv_cache);
    cache_keep: bool [batch, S] with kv_cache: positions of the window whose cached keys and values
    are used instead of fresh ones (rows of one batch whose own windows start at different
    positions);
    return_aux: also return the router statistics of the MoE layers (`RouterStats`: each of
    `llada_jax.model.moe.router_statistics` stacked over the MoE layers; {} for a dense model), as
    (what is returned otherwise, aux)."""
    cfg = self.cfg
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)

    wte = nn.Embed(
        cfg.vocab_size,
        cfg.d_model,
        dtype=dtype,
        param_dtype=param_dtype,
        embedding_init=dense_init(cfg.init_std, ("vocab", "embed")),
        name="wte",
    )
    x = wte(tokens)
    x = nn.with_logical_constraint(x, ACTIVATION)

    block = Block
    if REMAT_POLICIES[cfg.remat] is not None:
      block = nn.remat(block, prevent_cse=not cfg.scan_layers, policy=REMAT_POLICIES[cfg.remat])
    cache_start = jnp.asarray(cache_start, jnp.int32)
    inputs = (positions, attention_mask, segment_ids)
    layer_kv, aux = [], {}
    # Dense layers first, then MoE layers: one scan each, so compile time does not grow with depth.
    for name, moe_layer, first, end in (
        ("blocks", False, 0, cfg.dense_layers),
        ("moe_blocks", True, cfg.dense_layers, cfg.n_layers),
    ):
      if first == end:
        continue
      cache = None if kv_cache is None else (kv_cache[0][first:end], kv_cache[1][first:end])
      if cfg.scan_layers:
        x, (kv, stats) = nn.scan(
            block,
            variable_axes={"params": 0, "intermediates": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, nn.broadcast),
            length=end - first,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(cfg, return_kv, moe_layer, name=name)(x, *inputs, cache, cache_start, cache_keep)
        layer_kv.append(kv)
      else:
        per_layer = []
        for i in range(first, end):
          layer_cache = None if cache is None else (cache[0][i - first], cache[1][i - first])
          x, (kv, stats) = block(cfg, return_kv, moe_layer, name=f"blocks_{i}")(
              x, *inputs, layer_cache, cache_start, cache_keep
          )
          per_layer.append((kv, stats))
        kvs, stats = (jax.tree.map(lambda *a: jnp.stack(a), *t) for t in zip(*per_layer))
        layer_kv.append(kvs)
      if moe_layer:
        aux = stats
    kv = tuple(jnp.concatenate(t) for t in zip(*layer_kv)) if return_kv else None

    x = RMSNorm(cfg.rms_norm_eps, dtype, param_dtype, name="ln_f")(x)
    if return_hidden and not self.is_initializing():
      out = x
    else:
      if cfg.tie_embeddings:  # nn.Embed.attend: x @ embedding.T, both cast to dtype
        logits = wte.attend(x)
      else:
        logits = Projection(
            (cfg.vocab_size,), ("embed", "vocab"), cfg.init_std, dtype, param_dtype, name="ff_out"
        )(x)
      logits = logits.astype(jnp.float32)
      out = (logits, kv) if return_kv else logits
    return (out, aux) if return_aux else out
