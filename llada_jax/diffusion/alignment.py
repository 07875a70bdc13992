"""Logit alignment of a diffusion model: which position's logits predict token i.

"same" (LLaDA): token i is read from the logits at position i. "shifted" (Dream, Fast-dLLM v2,
MaxText's `shifted` alignment): from the logits at position i - 1, as an autoregressive model
reads its next token, so a mask predictor initialised from an AR model starts from what that model
predicts. A position without a predecessor in its sequence (its first token: position id 0, after
left padding or at a packed document's start) keeps its own logits, as Dream's sampler does; the
bound stays a bound (that token is then predicted from the masked sequence alone).

Block diffusion with "shifted": a token inside a block is read from the noisy block's position
i - 1; the first token of a block from the clean copy of the previous block's last token (the
two-stream pass; when sampling, the logits of that committed position, computed under the
block-causal pattern that keeps it from seeing the current block).

`resolve` is the one reader of config.diffusion.logit_alignment ("auto" becomes a concrete
alignment); `shift` is the one gather every consumer (loss, scorer, sampler) goes through.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from llada_jax.config import objective_of

ALIGNMENTS = ("same", "shifted")


def resolve(
    config: ml_collections.ConfigDict, resumed: ml_collections.ConfigDict | None = None
) -> str:
  """The concrete alignment of config: "same" or "shifted".

  config.diffusion.logit_alignment "auto" is "shifted" for a diffusion model started from an AR
  model and "same" otherwise: from an AR checkpoint (train.init_from), or resuming (`resumed`,
  the stored config of the checkpoint a run resumes from, or of the train.init_from workdir it
  starts from) a causal checkpoint as a diffusion model (README's route from an imported Llama);
  any other resumed run keeps its checkpoint's alignment. An ARM is always "same" (its logits at
  i already predict token i + 1: the causal objective shifts the targets itself).
  tests/test_alignment.py measures why shifted is the AR start's default (benchmarks/ar_init.py).
  """
  value = config.diffusion.logit_alignment
  if objective_of(config).causal:
    return "same"
  if value != "auto":
    return value
  if resumed is not None:
    return "shifted" if objective_of(resumed).causal else resolve(resumed)
  return "shifted" if config.train.init_from else "same"


def has_predecessor(positions: jax.Array) -> jax.Array:
  """bool [..., L]: positions whose sequence holds a token before them (position id > 0)."""
  return positions > 0


def shift(values: jax.Array, positions: jax.Array, first: jax.Array | None = None) -> jax.Array:
  """values [B, L, ...] read one position to the left where the position has a predecessor.

  out[:, i] = values[:, i - 1] if positions[:, i] > 0 else values[:, i]; out[:, 0] (which has no
  left neighbour in the window) takes `first` [B, ...] when given and positions[:, 0] > 0 (the
  logits of the position just before a window), else values[:, 0].
  """
  previous = jnp.concatenate(
      [values[:, :1] if first is None else first[:, None].astype(values.dtype), values[:, :-1]], 1
  )
  keep = has_predecessor(positions)
  keep = keep.reshape(keep.shape + (1,) * (values.ndim - keep.ndim))
  return jnp.where(keep, previous, values)


def excluded_mask_id(config: ml_collections.ConfigDict) -> int | None:
  """The id an autoregressive model never predicts: tokens.mask_id when it is a row of its own
  (the shipped vocabularies' mask, an imported Llama's appended row), None when it is one of the
  vocabulary's real tokens (`llada-convert from-hf --mask_id`), which text may hold."""
  from llada_jax.data.vocab import mask_is_a_token  # pylint: disable=g-import-not-at-top

  return None if mask_is_a_token(config) else config.tokens.mask_id


def next_token_logits(logits: jax.Array, excluded: int | None) -> jax.Array:
  """An autoregressive model's logits [..., V] with the column of `excluded_mask_id` at -inf.

  A causal model never predicts the mask token (the diffusion models' input symbol), so its
  column is left out of the softmax's normaliser in the loss, every scorer and the sampler
  alike."""
  return logits if excluded is None else logits.at[..., excluded].set(-jnp.inf)
