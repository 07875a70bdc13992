"""Next-token decoding of an autoregressive model (objective arm, or an imported Llama/Mistral) as
one compiled XLA program with a key/value cache.

A causal model's logits at position i predict token i + 1, so the answer is written one token a
step, left to right: the prompt runs once through the causal network (its keys and values written
to the cache, its last position's logits predicting the first answer token), then each step
samples a token from the last logits (`llada_jax.sampling.steps.propose`: temperature by
Gumbel-max, top-k, top-p, never EOS with logits_eos_inf; never the mask row, which a causal
model does not predict: `alignment.next_token_logits`) and runs that one token against the cache.
A row that has emitted EOS or EoT writes EOS from then on, and the loop ends once every row has
ended (what an ended row writes does not change, so a row's answer does not depend on its batch).
The token at step s of row r draws its noise from fold_in(fold_in(key_r, s), position), as the
reverse process does. steps, block_length, remasking and the caches of the diffusion samplers do
not apply: an ARM takes exactly one step per token.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from llada_jax.diffusion.alignment import next_token_logits
from llada_jax.model import network, positions_from_mask
from llada_jax.sampling.cache import empty_cache
from llada_jax.sampling.steps import Rows, SamplerSpec, commit_top_k, propose


@functools.lru_cache(maxsize=16)
def compiled_sampler(spec: SamplerSpec) -> Callable[..., Any]:
  """The jitted decoder of an autoregressive model: run(params, prompt [B, P] int32 (left-padded,
  every row with at least one token), prompt_mask [B, P] bool, row_keys [B, 2] uint32, scalars
  (`generate.sampler_scalars`)) -> int32 [B, P + gen_length], the answer's positions after a
  row's first end token set to EOS."""
  prefill_model = network(spec.model)
  # One query against the cache: which keys it may see is the key mask (keys up to its own
  # position), not the causal triangle of a square attention.
  step_model = network(spec.model, causal=False)
  ends = jnp.asarray(spec.end_ids, jnp.int32)

  def run(params, prompt, prompt_mask, row_keys, scalars):
    batch, prompt_len = prompt.shape
    total = prompt_len + spec.gen_length
    x = jnp.concatenate([prompt, jnp.full((batch, spec.gen_length), spec.mask_id, jnp.int32)], 1)
    attention_mask = jnp.concatenate([prompt_mask, jnp.ones((batch, spec.gen_length), bool)], 1)
    positions = positions_from_mask(attention_mask)
    rows = Rows(
        attention_mask,
        positions,
        row_keys,
        scalars["temperature"],
        scalars["top_k"],
        scalars["top_p"],
    )
    logits, kv = prefill_model.apply(
        {"params": params}, prompt, prompt_mask, positions[:, :prompt_len], return_kv=True
    )
    cache = tuple(
        jax.lax.dynamic_update_slice_in_dim(c, t.astype(c.dtype), 0, axis=2)
        for c, t in zip(empty_cache(spec.model, batch, total), kv)
    )
    index = jnp.arange(total)

    def step(carry):
      i, x, last, cache, ended = carry
      at = prompt_len + i
      x0, confidence, candidate = propose(
          spec, rows, x, next_token_logits(last, spec.excluded)[:, None], at, i, at + 1
      )
      x = commit_top_k(x, x0, confidence, candidate, jnp.ones((batch,), jnp.int32))
      token = jnp.where(ended, spec.eos_id, x[:, at])
      x = x.at[:, at].set(token)
      ended = ended | jnp.isin(token, ends)
      logits, cache = step_model.apply(
          {"params": params},
          token[:, None],
          attention_mask & (index <= at),
          jax.lax.dynamic_slice_in_dim(positions, at, 1, axis=1),
          kv_cache=cache,
          cache_start=at,
          return_kv=True,
      )
      return i + 1, x, logits[:, 0], cache, ended

    carry = (jnp.int32(0), x, logits[:, -1], cache, jnp.zeros((batch,), bool))
    _, x, _, _, _ = jax.lax.while_loop(
        lambda c: (c[0] < spec.gen_length) & ~jnp.all(c[4]), step, carry
    )
    return jnp.where((x == spec.mask_id) & (index >= prompt_len), spec.eos_id, x)

  return jax.jit(run)
