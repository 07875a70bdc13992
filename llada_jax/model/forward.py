"""The public model forward: token ids -> float32 logits, used by training, sampling and scoring."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from llada_jax.diffusion.alignment import has_predecessor
from llada_jax.model.masks import BlockCausal
from llada_jax.model.transformer import ModelConfig, Transformer


@functools.lru_cache(maxsize=64)
def network(
    model_cfg: ModelConfig, pattern: BlockCausal | None = None, causal: bool | None = None
) -> Transformer:
  """The mask predictor of `model_cfg` for one kind of call: the one place the package builds the
  Flax network (the trainer's `MaskedDiffusionLM`, the scorers, the samplers, the importers'
  shapes all come here), so that every caller runs the same module and the same parameters.

  pattern: a block diffusion model's block-causal attention (`BlockCausal`) for this call; None:
  as model_cfg says. causal: overrides model_cfg.causal (False for a causal model's one-query
  decoding step, whose key mask already hides the future). Hashable arguments: the module is
  built once per kind (the jitted programs key on it)."""
  changes: dict[str, Any] = {}
  if pattern is not None:
    changes["pattern"] = pattern
  if causal is not None:
    changes["causal"] = causal
  return Transformer(dataclasses.replace(model_cfg, **changes) if changes else model_cfg)


def positions_from_mask(attention_mask: jax.Array) -> jax.Array:
  """Position ids that skip padding: 0 at the first attended token of each row.

  With left-padded prompts this gives every row the positions it would have alone, so a padded
  batch computes the same logits as its prompts one by one. Without padding it is arange(L).
  """
  mask = attention_mask.astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def apply_model(
    model: Transformer,
    params: Any,
    tokens: jax.Array,
    attention_mask: jax.Array,
    unconditional: jax.Array | None = None,
    cfg_scale: jax.Array | float = 0.0,
    *,
    return_aux: bool = False,
) -> Any:
  """Logits of `model` for tokens [B, L] with padding-aware positions (traceable, not jitted).

  With `unconditional` tokens (the same rows with the prompt masked), both passes run as one batch
  and classifier-free guidance combines them: u + (cfg_scale + 1) * (c - u).
  return_aux: (logits, the MoE router statistics of the pass: `Transformer`'s return_aux, over
  both halves of a guided pass; {} for a dense model).
  """
  mask = attention_mask.astype(bool)
  positions = positions_from_mask(mask)
  if unconditional is None:
    return model.apply({"params": params}, tokens, mask, positions, return_aux=return_aux)
  both = model.apply(
      {"params": params},
      jnp.concatenate([tokens, unconditional]),
      jnp.concatenate([mask, mask]),
      jnp.concatenate([positions, positions]),
      return_aux=return_aux,
  )
  both, aux = both if return_aux else (both, None)
  cond, uncond = jnp.split(both, 2)
  out = uncond + (cfg_scale + 1.0) * (cond - uncond)
  return (out, aux) if return_aux else out


def two_stream_hidden(
    model_cfg: ModelConfig,
    params: Any,
    noisy: jax.Array,
    clean: jax.Array,
    valid: jax.Array,
    positions: jax.Array,
    segment_ids: jax.Array | None,
    *,
    block_size: int,
    shifted: bool = False,
    return_aux: bool = False,
) -> Any:
  """Final-norm hidden states [B, L, d_model] of the noisy stream of a block diffusion model's
  two-stream pass (BD3-LM, arXiv 2503.09573, Sec. 3.2): the network runs once on [noisy ; clean]
  (2L positions, both copies at `positions`) under `BlockCausal(block_size,
  two_stream=True)`, so each block of `noisy` [B, L] sees itself and the clean blocks before it.
  valid [B, L] bool hides padding; segment_ids [B, L] (or None) keeps packed documents apart.

  shifted: the hidden state that predicts each position under the shifted logit alignment
  (`llada_jax.diffusion.alignment`): position i - 1's of the noisy stream inside a block, of the
  clean stream for a block's first token (the previous block's last clean token, which sees only
  clean blocks), its own where the position has no predecessor (position id 0).

  return_aux: (hidden, the MoE router statistics of the pass, `Transformer`'s return_aux)."""
  model = network(model_cfg, BlockCausal(block_size, two_stream=True))

  def twice(a: jax.Array | None) -> jax.Array | None:
    return None if a is None else jnp.concatenate([a, a], 1)

  hidden, aux = model.apply(
      {"params": params},
      jnp.concatenate([noisy, clean], 1),
      twice(valid),
      twice(positions),
      twice(segment_ids),
      return_hidden=True,
      return_aux=True,
  )
  length = noisy.shape[1]
  noisy_hidden = hidden[:, :length]
  if not shifted:
    return (noisy_hidden, aux) if return_aux else noisy_hidden
  first_in_block = jnp.arange(length) % block_size == 0
  before = jnp.where(
      first_in_block[None, :, None],
      jnp.concatenate([hidden[:, length : length + 1], hidden[:, length:-1]], 1),
      jnp.concatenate([noisy_hidden[:, :1], noisy_hidden[:, :-1]], 1),
  )
  out = jnp.where(has_predecessor(positions)[..., None], before, noisy_hidden)
  return (out, aux) if return_aux else out


def head_kernel(params: Any) -> jax.Array:
  """The output head [d_model, V] of a parameter tree: `ff_out`'s kernel, or the embedding
  transposed for a model with tied embeddings (model.tie_embeddings: it has no `ff_out`)."""
  if "ff_out" in params:
    return params["ff_out"]["kernel"]
  return params["wte"]["embedding"].T


def head_logits(params: Any, hidden: jax.Array, dtype: Any) -> jax.Array:
  """float32 logits [B, L, V] of hidden states [B, L, d_model] through the output head
  (`head_kernel`), computed in `dtype` as the model's own head."""
  head = head_kernel(params)
  return jnp.einsum("bld,dv->blv", hidden.astype(dtype), head.astype(dtype)).astype(jnp.float32)


def logits(
    config: ml_collections.ConfigDict,
    params: Any,
    tokens: jax.Array,
    attention_mask: jax.Array | None = None,
) -> jax.Array:
  """float32 logits [B, L, V] of the mask predictor for `tokens` [B, L].

  attention_mask: optional bool/int [B, L]; 0 marks padding, which no position attends to and which
  does not advance the position ids.
  """
  tokens = jnp.asarray(tokens, jnp.int32)
  mask = jnp.ones(tokens.shape, bool) if attention_mask is None else jnp.asarray(attention_mask)
  return _forward(ModelConfig.from_config(config))(params, tokens, mask)


@functools.lru_cache(maxsize=16)
def _forward(model_cfg: ModelConfig):
  model = network(model_cfg)
  return jax.jit(lambda params, tokens, mask: apply_model(model, params, tokens, mask))
