"""Training objectives: LLaDA pre-training and SFT losses, and the autoregressive baseline.

Pre-training (an upper bound on the negative log-likelihood per token, LLaDA Eq. 3):
  L = sum over masked positions of CE(logits_i, x_i) / p   /  (batch * sequence length).
SFT (LLaDA Eq. 5): the prompt is never masked; each sequence's sum is divided by its response length
(EOS padding included), then averaged over the batch. ARM: next-token cross-entropy of the causal
model. Block diffusion (BD3-LM, Arriola et al., ICLR 2025, arXiv 2503.09573, Eq. 8): the same sum
with one t per block, each block's masked tokens predicted from the noisy block and the clean
blocks before it, all blocks in one pass over the two-stream input [x_t ; x_0]
(`llada_jax.model.masks`); B = 1 is the autoregressive chain rule, B = L the LLaDA bound.
`LOSSES` maps config.diffusion.objective to its loss: a new objective is one function here plus
its traits in `llada_jax.config.OBJECTIVES`.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import optax

from llada_jax.config import objective_of
from llada_jax.diffusion.alignment import excluded_mask_id, next_token_logits
from llada_jax.diffusion.masking import noise_batch, with_complements

ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]  # (tokens, attention_mask) -> logits
Metrics = dict[str, jax.Array]
# "mean": one scalar for the batch (training); "sequence": one value per row [B] (evaluation).
REDUCTIONS = ("mean", "sequence")


def diffusion_loss(
    logits: jax.Array, batch: dict[str, jax.Array], reduction: str = "mean"
) -> tuple[jax.Array, Metrics]:
  """The LLaDA loss of a noised feature batch (targets, masked, p_mask, valid[, prompt_length]).

  Pre-training: the CE / p sum over masked positions divided by the number of tokens in the
  sequences (batch x length when nothing is padded or cut). SFT (prompt_length present): each
  sequence's sum divided by its response length, EOS padding included, then the batch mean.
  """
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), batch["targets"])
  return diffusion_loss_from_ce(ce, batch, reduction)


def diffusion_loss_from_ce(
    ce: jax.Array, batch: dict[str, jax.Array], reduction: str = "mean"
) -> tuple[jax.Array, Metrics]:
  """diffusion_loss given the cross-entropy of every position, ce [B, L] (e.g. computed in chunks
  by chunked_cross_entropy). This is the one place of the 1/p weighting and the normalisation.

  reduction "mean": a scalar (pre-training: the sum over the batch divided by its tokens; SFT: the
  batch mean of per-sequence values); "sequence": per row [B], each row's sum divided by its own
  tokens (pre-training) or response length (SFT).
  """
  p_mask = batch["p_mask"]
  p_mask = p_mask if p_mask.ndim == 2 else p_mask[:, None]  # per block (block diffusion): [B, L]
  per_token = jnp.where(batch["masked"], ce / p_mask, 0.0)
  seq_len = batch["targets"].shape[1]
  metrics = {}
  if "prompt_length" in batch:
    response_len = jnp.maximum(seq_len - batch["prompt_length"], 1).astype(jnp.float32)
    per_sequence = jnp.sum(per_token, axis=-1) / response_len
    loss = jnp.mean(per_sequence)
    maskable = jnp.sum(response_len)
  else:
    tokens = jnp.sum(batch["valid"], axis=-1)
    per_sequence = jnp.sum(per_token, axis=-1) / jnp.maximum(tokens, 1)
    maskable = jnp.maximum(jnp.sum(tokens), 1)
    loss = jnp.sum(per_token) / maskable
    metrics["length"] = maskable / batch["targets"].shape[0]
  if reduction == "sequence":
    loss = per_sequence
  return loss, dict(metrics, loss=loss, masked_fraction=jnp.sum(batch["masked"]) / maskable)


class TokenTerms(NamedTuple):
  """What one pass gives the losses at each position [B, L]: ce (float32 nats); with confidence
  (CAP) also the entropy (float32 nats) of the predicted distribution and whether its argmax is
  the target (bool). None where not asked for."""

  ce: jax.Array
  entropy: jax.Array | None = None
  correct: jax.Array | None = None


def token_terms(logits: jax.Array, targets: jax.Array, confidence: bool = False) -> TokenTerms:
  """TokenTerms of logits [..., V] (softmax in float32) for integer targets [...]."""
  logits = logits.astype(jnp.float32)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if not confidence:
    return TokenTerms(ce)
  log_p = jax.nn.log_softmax(logits)
  entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
  return TokenTerms(ce, entropy, jnp.argmax(logits, axis=-1) == targets)


def chunked_cross_entropy(
    hidden: jax.Array,
    head: jax.Array,
    targets: jax.Array,
    chunk: int,
    dtype: jnp.dtype = jnp.float32,
    confidence: bool = False,
) -> TokenTerms:
  """TokenTerms [B, L] of logits = hidden @ head, `chunk` positions at a time, without full
  logits.

  hidden [B, L, d] (after the final norm), head [d, V], targets [B, L]; L a multiple of chunk.
  Each chunk's logits (in `dtype`, softmax in float32) are recomputed in the backward pass, so
  memory holds B x chunk x V logits instead of B x L x V (126k vocabulary: 2 GB per 4096-token
  sequence in float32).
  """
  batch, length, width = hidden.shape
  chunks = hidden.reshape(batch, length // chunk, chunk, width).swapaxes(0, 1)
  labels = targets.reshape(batch, length // chunk, chunk).swapaxes(0, 1)

  @jax.checkpoint
  def one(h: jax.Array, y: jax.Array) -> tuple[jax.Array, ...]:
    logits = jnp.einsum("bcd,dv->bcv", h.astype(dtype), head.astype(dtype))
    return tuple(t for t in token_terms(logits, y, confidence) if t is not None)

  terms = jax.lax.map(lambda args: one(*args), (chunks, labels))
  return TokenTerms(*(t.swapaxes(0, 1).reshape(batch, length) for t in terms))


def confidence_entropy(terms: TokenTerms, batch: dict[str, jax.Array]) -> jax.Array:
  """CAP's confidence term (LLaDA 2.0, inclusionAI 2025; DESIGN.md §8): the mean entropy (nats)
  of the predicted distribution over the masked positions whose argmax is already the target; 0
  when there are none. Minimising it sharpens what the model already gets right, so that confidence-
  threshold decoding commits more tokens per step."""
  chosen = batch["masked"] & terms.correct
  return jnp.sum(jnp.where(chosen, terms.entropy, 0.0)) / jnp.maximum(jnp.sum(chosen), 1)


def unpacked_batch(tokens: jax.Array, **extra: jax.Array) -> dict[str, jax.Array]:
  """The feature batch of unpacked full-length rows `tokens` [B, L] (one segment each, no cut)."""
  positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
  return dict(
      targets=tokens,
      valid=jnp.ones(tokens.shape, bool),
      positions=positions,
      segment_ids=jnp.ones(tokens.shape, jnp.int32),
      **extra,
  )


def pretraining_loss(
    apply_fn: ApplyFn,
    tokens: jax.Array,
    rng: jax.Array,
    *,
    mask_id: int,
    eps: float,
    random_length_prob: float,
    time_sampling: str = "uniform",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLaDA pre-training loss on clean `tokens` [B, L], with the random-length cut.

  Returns the loss (nats per token, an upper bound on -log p / token) and metrics.
  """
  batch = noise_batch(
      rng,
      unpacked_batch(tokens),
      mask_id=mask_id,
      eps=eps,
      random_length_prob=random_length_prob,
      time_sampling=time_sampling,
  )
  return diffusion_loss(apply_fn(batch["inputs"], batch["valid"]), batch)


def sft_loss(
    apply_fn: ApplyFn,
    tokens: jax.Array,
    prompt_lengths: jax.Array,
    rng: jax.Array,
    *,
    mask_id: int,
    eps: float,
    time_sampling: str = "uniform",
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LLaDA SFT loss on prompt ++ response (EOS-padded to L) with prompt_lengths [B].

  The prompt is never masked; masked response tokens (EOS padding included) are weighted by 1/p
  and each sequence is normalised by its response length L - prompt_length.
  """
  batch = noise_batch(
      rng,
      unpacked_batch(tokens, prompt_length=prompt_lengths),
      mask_id=mask_id,
      eps=eps,
      random_length_prob=0.0,
      time_sampling=time_sampling,
  )
  return diffusion_loss(apply_fn(batch["inputs"], batch["valid"]), batch)


def autoregressive_loss(
    logits: jax.Array, tokens: jax.Array, excluded: int | None, reduction: str = "mean"
) -> tuple[jax.Array, Metrics]:
  """Next-token cross-entropy (nats per predicted token) of a causal model's logits [B, L, V] on
  `tokens` [B, L], the id `excluded` (the mask row, `alignment.excluded_mask_id`; None: none)
  left out of the softmax: the batch mean, or per row [B] with reduction="sequence"."""
  logits = next_token_logits(logits[:, :-1], excluded)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:])
  loss = jnp.mean(ce, axis=-1) if reduction == "sequence" else jnp.mean(ce)
  return loss, {"loss": loss}


class LanguageModel(Protocol):
  """What an objective needs of `llada_jax.lm.MaskedDiffusionLM`."""

  config: Any

  def apply(self, params: Any, tokens: jax.Array, *args: Any, **kwargs: Any) -> jax.Array:
    ...

  def cross_entropy(
      self,
      params: Any,
      inputs: jax.Array,
      batch: dict[str, jax.Array],
      block_size: int = 0,
  ) -> jax.Array:
    ...


def forward_process_of(
    config: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    random_length_prob: float,
    block_size: int | None = None,
    exact: bool = False,
) -> dict[str, jax.Array]:
  """The objective's forward process on a feature batch (`noise_batch`): mdm one t per
  sequence; block one t per block of block_size (default config.diffusion.block_size), from the
  clipped schedule U(t_min, t_max) unless `exact` (evaluation: the bound itself); arm none (the
  batch unchanged)."""
  d, objective = config.diffusion, objective_of(config)
  if objective.causal:
    return batch
  blocks = objective.blocks
  return noise_batch(
      rng,
      batch,
      mask_id=config.tokens.mask_id,
      eps=d.eps,
      random_length_prob=random_length_prob,
      time_sampling=d.time_sampling,
      block_size=(block_size or d.block_size) if blocks else 0,
      t_range=(d.t_min, d.t_max) if blocks and not exact else (0.0, 1.0),
  )


def arm_objective(
    lm: LanguageModel,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    reduction: str,
    random_length_prob: float,
    exact: bool = False,
) -> tuple[jax.Array, Metrics]:
  """The autoregressive baseline: next-token CE of the causal network on the clean targets."""
  del rng, random_length_prob, exact
  tokens = batch["targets"]
  logits, aux = lm.apply(params, tokens, jnp.ones(tokens.shape, bool), return_aux=True)
  loss, metrics = autoregressive_loss(logits, tokens, excluded_mask_id(lm.config), reduction)
  return with_router_losses(lm.config, loss, metrics, aux, reduction)


def diffusion_bound(
    lm: LanguageModel,
    params: Any,
    batch: dict[str, jax.Array],
    rng: jax.Array,
    *,
    reduction: str,
    random_length_prob: float,
    block_size: int | None = None,
    exact: bool = False,
) -> tuple[jax.Array, Metrics]:
  """The bound of a masked diffusion model, objectives "mdm" and "block": the forward process
  (`forward_process_of`, unless the pipeline already noised the batch), then the 1/p-weighted
  masked cross-entropy (`diffusion_loss_from_ce`): LLaDA's of one pass (mdm), BD3-LM's NELBO of
  the noisy stream of one two-stream pass (block, blocks of block_size: the trainer passes the
  size of its `block_size_schedule`, default diffusion.block_size; exact: t ~ U(0, 1), not the
  clipped training schedule). The training options of config.diffusion apply to the training
  loss ("mean", not exact) and never to the bound itself (exact: validation; "sequence": a
  per-sequence bound):
  - complementary_masking: each row is scored twice, with its mask and with the complement of
    it (`masking.with_complements`): the bound's expectation is unchanged, its variance falls,
    the pass costs twice the FLOPs;
  - cap_weight λ: CAP, the loss gains λ x `confidence_entropy` (metric cap/entropy); the
    bound (metric loss) stays the bound.
  Then a MoE model's router losses (`with_router_losses`)."""
  d = lm.config.diffusion
  block_size = (block_size or d.block_size) if objective_of(lm.config).blocks else 0
  if "inputs" not in batch:
    batch = forward_process_of(
        lm.config,
        batch,
        rng,
        random_length_prob=random_length_prob,
        block_size=block_size or None,
        exact=exact,
    )
  training = reduction == "mean" and not exact
  if d.complementary_masking and training:
    batch = with_complements(batch, lm.config.tokens.mask_id)
  cap = d.cap_weight if training else 0.0
  terms, aux = lm.cross_entropy(
      params, batch["inputs"], batch, block_size=block_size, confidence=cap > 0
  )
  loss, metrics = diffusion_loss_from_ce(terms.ce, batch, reduction)
  if cap > 0:
    entropy = confidence_entropy(terms, batch)
    loss, metrics = loss + cap * entropy, dict(metrics, **{"cap/entropy": entropy})
  return with_router_losses(lm.config, loss, metrics, aux, reduction)


def with_router_losses(
    config: Any, loss: jax.Array, metrics: Metrics, aux: dict[str, jax.Array], reduction: str
) -> tuple[jax.Array, Metrics]:
  """An objective's (loss, metrics) with a MoE model's router terms (aux: the stacked
  `llada_jax.model.moe.router_statistics` of its MoE layers; {} for a dense model, returned
  unchanged). The training loss ("mean") gains model.moe.aux_loss_coef times the load-balancing
  loss and z_loss_coef times the z-loss, each averaged over the MoE layers; the metrics gain them
  as router/aux_loss and router/z_loss, the mean router entropy, the largest over layers of the
  max/min expert load ratio, and router/load [MoE layers, experts] (the step's expert-bias update
  reads it). A per-sequence bound ("sequence") stays the bound."""
  if not aux or reduction != "mean":
    return loss, metrics
  moe = config.model.moe
  balance, z = jnp.mean(aux["aux_loss"]), jnp.mean(aux["z_loss"])
  load = aux["load"]
  ratio = jnp.max(jnp.max(load, axis=-1) / jnp.maximum(jnp.min(load, axis=-1), 1e-9))
  metrics = dict(
      metrics,
      **{
          "router/aux_loss": balance,
          "router/z_loss": z,
          "router/entropy": jnp.mean(aux["entropy"]),
          "router/load_ratio": ratio,
          "router/load": load,
      },
  )
  return loss + moe.aux_loss_coef * balance + moe.z_loss_coef * z, metrics


# config.diffusion.objective -> loss(lm, params, batch, rng, *, reduction, random_length_prob); the
# objective's traits are llada_jax.config.OBJECTIVES.
LOSSES = {"mdm": diffusion_bound, "arm": arm_objective, "block": diffusion_bound}
