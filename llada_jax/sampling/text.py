"""Text in, text out: tokenize prompts, generate, cut and decode answers."""

from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from llada_jax.data.codec import text_codec
from llada_jax.errors import ConfigError
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.sampling.ending import end_answer
from llada_jax.sampling.options import SamplerOptions


def left_pad(
    prompts: Sequence[Sequence[int]], pad_id: int, width: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(int32 tokens [N, width], bool mask [N, width]): each prompt right-aligned after pad_id
  padding, the sampler's layout; width defaults to the longest prompt."""
  width = max(len(p) for p in prompts) if width is None else width
  tokens = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros((len(prompts), width), bool)
  for row, ids in enumerate(prompts):
    tokens[row, width - len(ids) :] = ids
    mask[row, width - len(ids) :] = True
  return tokens, mask


def sample(
    config: ml_collections.ConfigDict,
    params: Any,
    *,
    texts: Sequence[str] | None = None,
    ids: Sequence[Sequence[int]] | None = None,
    seed: int = 0,
    stops: Sequence[str] = (),
    options: SamplerOptions | None = None,
    **overrides: Any,
) -> dict[str, list]:
  """Generates one answer per prompt (text or ids; left-padded to a common length).

  Returns {"prompt": prompts as text, "tokens": answer ids cut at the first end token, "text":
  their text cut at the first of `stops`} (`llada_jax.sampling.ending`). options and overrides
  (steps=, gen_length=, temperature=, ...) go to `MaskedDiffusionLM.generate`: default
  config.sampling.
  """
  try:
    vocab = text_codec(config)
  except ConfigError:
    if texts is not None:
      raise
    vocab = None  # token ids in and out: an HF model whose tokenizer.json is not at hand
  encoded = [list(vocab.encode(t)) for t in texts] if texts is not None else [list(i) for i in ids]
  tokens, mask = left_pad(encoded, config.tokens.pad_id)
  width = tokens.shape[1]
  out = MaskedDiffusionLM(config).generate(
      params, tokens, mask, options, rng=jax.random.PRNGKey(seed), **overrides
  )
  decode = vocab.decode if vocab is not None else lambda ids: ""
  ended = [
      end_answer(row, config.tokens, decode, stops) for row in np.asarray(out)[:, width:].tolist()
  ]
  prompts = list(texts) if texts is not None else [decode(e) for e in encoded]
  return {"prompt": prompts, "tokens": [i for i, _ in ended], "text": [t for _, t in ended]}
