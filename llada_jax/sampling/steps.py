"""The small pure steps every sampler is built from (MD4's sampler: a loop over such steps).

`SamplerSpec` is everything that shapes one compiled sampler, `Rows` the per-row arrays each step
reads; `draws` gives a step's random numbers as functions of (row key, step, position), `propose`
turns logits into proposals and their confidences, `commit_top_k` / `commit_above` decide which
proposals a step keeps. The drivers live in `llada_jax.sampling.generate` (the reverse process of
the diffusion models) and `llada_jax.sampling.autoregressive` (next-token decoding of an ARM).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from llada_jax.config import objective_of
from llada_jax.diffusion import alignment
from llada_jax.model import ModelConfig
from llada_jax.sampling.ending import end_ids
from llada_jax.sampling.options import SamplerOptions
from llada_jax.sampling.remasking import DRAWS_UNIFORM, REMASKING_RULES
from llada_jax.sampling.schedule import top_k_mask
from llada_jax.sampling.truncation import truncate


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
  """Everything that shapes the compiled program (one compilation per distinct spec)."""

  model: ModelConfig
  steps: int
  gen_length: int
  block_length: int
  remasking: str
  mask_id: int
  eos_id: int
  eot_id: int
  logits_eos_inf: bool
  confidence_eos_eot_inf: bool
  use_cfg: bool
  use_noise: bool
  return_trajectory: bool
  float64: bool
  use_threshold: bool = False
  cache: str = "none"
  cache_refresh: int = 0
  prompt_has_masks: bool = False
  block_model: int = 0  # the block size of a block diffusion model; 0 for LLaDA models
  early_stop: bool = False
  end_ids: tuple[int, ...] = ()
  shifted: bool = False  # the shifted logit alignment (llada_jax.diffusion.alignment)
  truncate: bool = False  # top-k / top-p truncation of sampled proposals (not greedy ones)
  causal: bool = False  # an autoregressive model: next-token decoding
  excluded: int | None = None  # the id an autoregressive model never proposes (its mask row)
  return_steps: bool = False  # also return each row's forward passes [B] int32

  @classmethod
  def of(
      cls,
      config: ml_collections.ConfigDict,
      options: SamplerOptions,
      *,
      return_trajectory: bool = False,
      prompt_has_masks: bool = False,
      return_steps: bool = False,
  ) -> SamplerSpec:
    """The spec of `options` for config's model and token ids."""
    tokens = config.tokens
    objective = objective_of(config)
    block_model = config.diffusion.block_size if objective.blocks else 0
    causal = objective.causal
    return cls(
        ModelConfig.from_config(config),
        options.steps,
        options.gen_length,
        options.block_length,
        options.remasking,
        tokens.mask_id,
        tokens.eos_id,
        tokens.eot_id,
        options.logits_eos_inf,
        options.confidence_eos_eot_inf,
        options.cfg_scale > 0,
        options.temperature > 0,
        return_trajectory,
        options.float64,
        options.use_threshold,
        options.cache,
        options.cache_refresh,
        prompt_has_masks,
        block_model,
        options.early_stop or block_model > 0 or causal,
        end_ids(tokens),
        alignment.resolve(config) == "shifted",
        options.temperature > 0 and (options.top_k > 0 or options.top_p < 1),  # greedy: none
        causal,
        alignment.excluded_mask_id(config) if causal else None,
        return_steps,
    )

  @property
  def num_blocks(self) -> int:
    return self.gen_length // self.block_length

  @property
  def steps_per_block(self) -> int:
    return self.steps // self.num_blocks

  @property
  def real(self) -> Any:
    """The dtype of noise, logits and confidences."""
    return jnp.float64 if self.float64 else jnp.float32


class Rows(NamedTuple):
  """The per-row arrays every step of a call reads (B rows of T = P + gen_length positions)."""

  attention_mask: jax.Array  # bool [B, T], False on left padding
  positions: jax.Array  # int32 [B, T], counted from each row's first real token
  keys: jax.Array  # uint32 [B, 2], one PRNG key per row
  temperature: jax.Array  # float32 [], the Gumbel noise scale
  top_k: jax.Array  # int32 [], 0: no top-k truncation
  top_p: jax.Array  # float32 [], 1: no nucleus truncation


def draws(
    spec: SamplerSpec, rows: Rows, step: jax.Array, start: Any, width: int
) -> tuple[jax.Array | None, jax.Array | None]:
  """This step's random numbers for positions [start, start + width) of every row: Gumbel noise
  [B, W, V] (None without noise) and uniforms [B, W] (None unless the remasking rule draws them),
  in spec.real. step is a scalar or one step count per row [B]. Each number comes from
  fold_in(fold_in(row key, step), position), the position counted from the row's first real token:
  a row's draws do not depend on its batch, padding or window."""
  batch = rows.keys.shape[0]
  keys = jax.vmap(jax.random.fold_in)(rows.keys, jnp.broadcast_to(step, (batch,)))
  noise_keys, remask_keys = jnp.moveaxis(jax.vmap(jax.random.split)(keys), 1, 0)
  where = jax.lax.dynamic_slice_in_dim(rows.positions, start, width, axis=1)

  def per_position(row_key, draw):
    return jax.vmap(jax.vmap(lambda k, p: draw(jax.random.fold_in(k, p)), (None, 0)))(
        row_key, where
    )

  gumbel = uniform = None
  if spec.use_noise:
    vocab = spec.model.vocab_size
    gumbel = per_position(noise_keys, lambda k: jax.random.gumbel(k, (vocab,), spec.real))
  if spec.remasking in DRAWS_UNIFORM:
    uniform = per_position(remask_keys, lambda k: jax.random.uniform(k, (), spec.real))
  return gumbel, uniform


def propose(
    spec: SamplerSpec,
    rows: Rows,
    x: jax.Array,
    logits: jax.Array,
    start: Any,
    step: jax.Array,
    block_end: Any,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Proposals and their confidences from the predictions [B, W, V] of positions
  [start, start + W) (the logits that predict each of those positions).

  Returns x0 int32 [B, T] (x with every computed position replaced by its proposal), the
  confidence [B, T] (spec.real) of the candidates, -inf elsewhere, and the candidates bool [B, T]:
  the masked real positions before block_end. With Gumbel-max, argmax(logits + T * g) samples
  softmax(logits / T), truncated to the top-k and the nucleus when asked; the remasking rule
  ranks the proposals by the noiseless (truncated) logits.
  """
  batch, total = x.shape
  gumbel, uniform = draws(spec, rows, step, start, logits.shape[1])
  logits = logits.astype(spec.real)
  if spec.logits_eos_inf:
    logits = logits.at[..., spec.eos_id].set(-jnp.inf)
  if spec.truncate:
    logits = truncate(logits, rows.top_k, rows.top_p, rows.temperature)
  logits_noised = logits
  if spec.use_noise:
    logits_noised = logits + rows.temperature.astype(spec.real) * gumbel
  x0 = jnp.argmax(logits_noised, axis=-1).astype(jnp.int32)
  confidence = REMASKING_RULES[spec.remasking](logits, x0, uniform)
  x0 = jax.lax.dynamic_update_slice_in_dim(x, x0, start, axis=1)
  confidence = jax.lax.dynamic_update_slice_in_dim(
      jnp.full((batch, total), -jnp.inf, confidence.dtype), confidence, start, axis=1
  )
  candidate = (x == spec.mask_id) & (jnp.arange(total) < block_end) & rows.attention_mask
  if spec.confidence_eos_eot_inf:
    last = (x0 == spec.eos_id) | (x0 == spec.eot_id)
    confidence = jnp.where(last, jnp.finfo(confidence.dtype).min, confidence)
  return x0, jnp.where(candidate, confidence, -jnp.inf), candidate


def commit_top_k(
    x: jax.Array, x0: jax.Array, confidence: jax.Array, candidate: jax.Array, k: jax.Array
) -> jax.Array:
  """x [B, T] with the k[b] most confident candidates of row b set to their proposals."""
  return jnp.where(top_k_mask(confidence, k) & candidate, x0, x)


def commit_above(
    x: jax.Array, x0: jax.Array, confidence: jax.Array, candidate: jax.Array, threshold: jax.Array
) -> tuple[jax.Array, jax.Array]:
  """x [B, T] with every candidate more confident than threshold committed, and at least the most
  confident one of each row that has a candidate; and whether each row had one (bool [B])."""
  active = jnp.any(candidate, -1)
  best = top_k_mask(confidence, active.astype(jnp.int32))
  commit = candidate & ((confidence > threshold.astype(confidence.dtype)) | best)
  return jnp.where(commit, x0, x), active


def finished(spec: SamplerSpec, x: jax.Array, total: int) -> jax.Array:
  """bool [B]: rows whose answer holds a committed end token (EOS or EoT, `end_ids`)."""
  answer = jnp.arange(total) >= total - spec.gen_length
  return jnp.any(jnp.isin(x, jnp.asarray(spec.end_ids, jnp.int32)) & answer, axis=-1)
