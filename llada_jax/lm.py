"""The language model as one object: parameters, loss, likelihood and generation of a config.

`MaskedDiffusionLM` owns what T5X's BaseModel owns (the network, the token ids, the objective) and
exposes the four duties every consumer needs: `init`, `loss` (the same function for the training
step, the validation bound and the per-sequence bound of `llada-evaluate`, as Levanter's one loss
with a `reduction`), `score` (the Monte-Carlo bound on log p(answer | prompt)) and `generate` (the
reverse process). The autoregressive baseline is the same object with `diffusion.objective=arm`.
The objectives' losses are the table `llada_jax.diffusion.objectives.LOSSES`.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from llada_jax.diffusion import alignment, likelihood
from llada_jax.diffusion.objectives import (
    LOSSES,
    REDUCTIONS,
    Metrics,
    TokenTerms,
    chunked_cross_entropy,
    token_terms,
)
from llada_jax.errors import ConfigError
from llada_jax.model import ModelConfig, apply_model, network
from llada_jax.model.transformer import RouterStats
from llada_jax.model.forward import head_kernel, head_logits, two_stream_hidden
from llada_jax.sampling.generate import generate

Batch = dict[str, jax.Array]  # model features, see llada_jax.data.features


class MaskedDiffusionLM:
  """The model of one config (config.model, config.tokens, config.diffusion, config.train).

  Attributes:
    config: the full ml_collections config it was built from.
    module: the Flax mask predictor (`llada_jax.model.Transformer`).
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.module = network(ModelConfig.from_config(config))

  @property
  def objective(self) -> str:
    """config.diffusion.objective: a key of LOSSES and of llada_jax.config.OBJECTIVES."""
    return self.config.diffusion.objective

  @property
  def shifted(self) -> bool:
    """Whether position i's token is read from the logits at i - 1 (`alignment.resolve`)."""
    return alignment.resolve(self.config) == "shifted"

  def init(self, rng: jax.Array) -> Any:
    """Fresh parameters, each still boxed with its logical axis names (nn.LogicallyPartitioned);
    `flax.linen.meta.unbox` gives plain arrays. Traceable (use under jit/eval_shape)."""
    tokens = jnp.zeros((1, self.config.data.sequence_length), jnp.int32)
    return self.module.init(rng, tokens)["params"]

  def apply(
      self,
      params: Any,
      tokens: jax.Array,
      attention_mask: jax.Array | None = None,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      **kwargs: Any,
  ) -> Any:
    """The network's logits [B, L, V] for tokens [B, L] (`Transformer.__call__`'s arguments and
    return values)."""
    return self.module.apply(
        {"params": params}, tokens, attention_mask, positions, segment_ids, **kwargs
    )

  def logits(
      self,
      params: Any,
      tokens: jax.Array,
      attention_mask: jax.Array,
      unconditional: jax.Array | None = None,
      cfg_scale: jax.Array | float = 0.0,
  ) -> jax.Array:
    """Logits with padding-aware positions, guided when `unconditional` is given
    (`llada_jax.model.apply_model`)."""
    return apply_model(self.module, params, tokens, attention_mask, unconditional, cfg_scale)

  def cross_entropy(
      self,
      params: Any,
      inputs: jax.Array,
      batch: Batch,
      block_size: int = 0,
      confidence: bool = False,
  ) -> tuple[TokenTerms, RouterStats]:
    """(TokenTerms [B, L]: float32 CE, with `confidence` also the entropy and correctness of each
    prediction; router statistics of the pass: `Transformer`'s return_aux, {} for a dense model)
    of batch["targets"] given `inputs` [B, L] (with the batch's valid, positions and
    segment_ids): through full logits, or `train.loss_chunk` positions at a time
    (`chunked_cross_entropy`) when that is set.

    block_size > 0: block diffusion's two-stream pass (BD3-LM): the network runs once on
    [inputs ; targets] (2L positions, the clean copy at the same positions) under the
    block-causal pattern of `llada_jax.model.masks.BlockCausal`, and the CE is read off the
    noisy half, the head applied to those L positions only.

    Each position's CE is that of the logits predicting it under the model's logit alignment
    (`llada_jax.diffusion.alignment`: its own, or with "shifted" its predecessor's).
    """
    features = (batch["valid"], batch["positions"], batch["segment_ids"])
    targets = batch["targets"]
    chunk = self.config.train.loss_chunk
    dtype = jnp.dtype(self.config.model.dtype)
    shifted = self.shifted
    if block_size:
      hidden, aux = two_stream_hidden(
          self.module.cfg,
          params,
          inputs,
          batch["targets"],
          *features,
          block_size=block_size,
          shifted=shifted,
          return_aux=True,
      )
      if chunk:
        head = head_kernel(params)
        return chunked_cross_entropy(hidden, head, targets, chunk, dtype, confidence), aux
      return token_terms(head_logits(params, hidden, dtype), targets, confidence), aux
    if chunk:
      hidden, aux = self.apply(params, inputs, *features, return_hidden=True, return_aux=True)
      if shifted:
        hidden = alignment.shift(hidden, batch["positions"])
      head = head_kernel(params)
      return chunked_cross_entropy(hidden, head, targets, chunk, dtype, confidence), aux
    logits, aux = self.apply(params, inputs, *features, return_aux=True)
    if shifted:
      logits = alignment.shift(logits, batch["positions"])
    return token_terms(logits, targets, confidence), aux

  def loss(
      self,
      params: Any,
      batch: Batch,
      rng: jax.Array,
      *,
      reduction: str = "mean",
      random_length_prob: float | None = None,
      block_size: int | None = None,
      exact: bool = False,
  ) -> tuple[jax.Array, Metrics]:
    """The configured objective on a feature batch (`llada_jax.data.features`).

    Args:
      params: network parameters.
      batch: targets [B, L], valid, positions, segment_ids (and prompt_length for SFT); a batch
        already noised in the input pipeline also carries inputs, masked and p_mask.
      rng: key of the forward process (unused when the batch is noised or the objective is arm).
      reduction: "mean": the training loss, a scalar (nats per token); "sequence": one bound per
        row [B] (nats per token of that row), what evaluation averages over sequences.
      random_length_prob: the probability of the random-length cut (default
        config.diffusion.random_length_prob; 0 for evaluation).
      block_size: objective "block" only: the block size of this step of a
        `diffusion.block_size_schedule` (default config.diffusion.block_size).
      exact: the bound itself, for evaluation: no clipped noise schedule (diffusion.t_min and
        t_max are a training-time variance reduction of objective "block"), no complementary
        masking or CAP (diffusion.complementary_masking, cap_weight).

    Returns:
      (loss, metrics); the loss is float32.

    Raises:
      ConfigError: an unknown reduction.
    """
    if reduction not in REDUCTIONS:
      raise ConfigError(
          f"reduction={reduction!r} is not allowed: expected one of {', '.join(REDUCTIONS)}"
      )
    if random_length_prob is None:
      random_length_prob = self.config.diffusion.random_length_prob
    options = {} if block_size is None else {"block_size": block_size}
    return LOSSES[self.objective](
        self,
        params,
        batch,
        rng,
        reduction=reduction,
        random_length_prob=random_length_prob,
        exact=exact,
        **options,
    )

  def score(
      self,
      params: Any,
      prompts: Sequence[Sequence[int]],
      answers: Sequence[Sequence[int]],
      keys: jax.Array,
      *,
      mc_num: int,
      batch_size: int,
      cfg_scale: float = 0.0,
      sharding: jax.sharding.Sharding | None = None,
      width: int | None = None,
  ) -> likelihood.Likelihood:
    """Monte-Carlo estimates of log p(answer | prompt) per pair, one key per pair
    (`llada_jax.diffusion.likelihood.score_pairs`, LLaDA's Eq. 6 estimator)."""
    return likelihood.score_pairs(
        self.config,
        params,
        prompts,
        answers,
        keys,
        mc_num=mc_num,
        batch_size=batch_size,
        cfg_scale=cfg_scale,
        sharding=sharding,
        width=width,
    )

  def generate(
      self, params: Any, prompt: Any, attention_mask: Any = None, options: Any = None, **kwargs: Any
  ) -> Any:
    """Answers for prompts [B, P] by the reverse process (`llada_jax.sampling.generate`):
    int32 [B, P + gen_length]."""
    if options is not None:
      kwargs["options"] = options
    return generate(self.config, params, prompt, attention_mask, **kwargs)
