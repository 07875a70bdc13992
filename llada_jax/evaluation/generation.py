"""Answers for many prompts with the compiled reverse process, over every host and local device.

Prompts are sorted by length and generated in batches of a fixed size, left-padded to a bucketed
width (few compilations). Prompt i draws its noise from fold_in(PRNGKey(seed), i), so an answer
depends on the seed, its index and its prompt only: not on the batch, padding or host count.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import numpy as np

from llada_jax.evaluation.distribute import bucket, pad_to_multiple, run_sharded
from llada_jax.evaluation.model import EvalModel
from llada_jax.keys import item_keys
from llada_jax.sampling.text import left_pad
from llada_jax.sampling.ending import cut_ids


def generate_answers(
    model: EvalModel,
    prompts: Sequence[Sequence[int]],
    *,
    seed: int = 0,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    item_ids: Sequence[int] | None = None,
    **sampler_kwargs: Any,
) -> list[list[int]]:
  """Answer ids for every prompt (cut at the first EOS or EoT), on every process.

  item_ids: the id of each prompt that seeds its noise, fold_in(PRNGKey(seed), id) (default: its
  position in `prompts`).

  sampler_kwargs go to `MaskedDiffusionLM.generate`: steps, gen_length, block_length,
  temperature, cfg_scale, remasking, logits_eos_inf, confidence_eos_eot_inf.
  """
  prompts = [list(p) for p in prompts]
  ids = np.arange(len(prompts)) if item_ids is None else np.asarray(item_ids)
  tokens = model.config.tokens
  gen_length = sampler_kwargs["gen_length"]
  devices = model.mesh.size
  per_call = -(-batch_size // devices) * devices
  limit = model.config.model.max_sequence_length - gen_length

  def evaluate(indices: np.ndarray) -> np.ndarray:
    part = pad_to_multiple(list(indices), min(per_call, -(-len(indices) // devices) * devices))
    width = max(len(prompts[i]) for i in part)
    width = max(width, min(bucket(width), limit))
    batch, mask = left_pad([prompts[i] for i in part], tokens.pad_id, width)
    batch, mask = jax.device_put((batch, mask), model.item_sharding)
    keys = jax.device_put(item_keys(jax.random.PRNGKey(seed), ids[part]), model.item_sharding)
    out = np.asarray(model.lm.generate(model.params, batch, mask, rng=keys, **sampler_kwargs))
    answers = np.full((len(indices), gen_length), -1, np.int32)
    for row in range(len(indices)):
      answer = cut_ids(out[row, width:].tolist(), tokens)
      answers[row, : len(answer)] = answer
    return answers

  rows = run_sharded(
      [len(p) for p in prompts],
      per_call,
      evaluate,
      row_shape=(gen_length,),
      dtype=np.int32,
      progress=progress,
  )
  return [[int(t) for t in row if t >= 0] for row in rows]
