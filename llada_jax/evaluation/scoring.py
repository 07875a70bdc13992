"""log p(answer | prompt) for many pairs at once, over every host and local device.

Pairs are sorted by length and cut into calls of a fixed number of pairs padded to a bucketed
width, so a whole benchmark compiles a handful of programs. The Monte-Carlo samples of pair i come
from fold_in(PRNGKey(seed), i): results depend on the seed only, not on batching or host count.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np

from llada_jax.diffusion.likelihood import Likelihood, check_pairs, mc_batch_size
from llada_jax.evaluation.distribute import bucket, pad_to_multiple, run_sharded
from llada_jax.evaluation.model import EvalModel
from llada_jax.keys import item_keys

# Tokens in one forward pass per device (pairs x batch_size x width); bounds activation memory.
TOKENS_PER_DEVICE = 1 << 15


def loglikelihoods(
    model: EvalModel,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
    item_ids: Sequence[int] | None = None,
) -> Likelihood:
  """Estimates (nats) and standard errors of log p(answers[i] | prompts[i]), every process.

  item_ids: the id of each pair that seeds its samples, fold_in(PRNGKey(seed), id) (default: its
  position in the lists); give ids that do not depend on which other pairs share the call (e.g.
  a pair's index in its whole task) and a pair's estimate depends on its id and tokens only.
  """
  prompts, answers = [list(p) for p in prompts], [list(a) for a in answers]
  check_pairs(model.config, prompts, answers, mc_num, batch_size, cfg_scale)
  lengths = [len(p) + len(a) for p, a in zip(prompts, answers)]
  devices = model.mesh.size

  def padded_width(items) -> int:
    return min(bucket(max(lengths[i] for i in items)), model.config.model.max_sequence_length)

  per_pass = mc_batch_size(mc_num, batch_size)
  per_call = max(1, TOKENS_PER_DEVICE // (per_pass * padded_width(range(len(lengths))))) * devices
  base = jax.random.PRNGKey(seed)
  ids = np.arange(len(lengths)) if item_ids is None else np.asarray(item_ids)

  def evaluate(indices: np.ndarray) -> np.ndarray:
    part = pad_to_multiple(list(indices), min(per_call, devices * -(-len(indices) // devices)))
    keys = item_keys(base, ids[part])
    result = model.lm.score(
        model.params,
        [prompts[i] for i in part],
        [answers[i] for i in part],
        keys,
        mc_num=mc_num,
        batch_size=batch_size,
        cfg_scale=cfg_scale,
        sharding=model.item_sharding,
        width=padded_width(part),
    )
    return np.stack([result.log_likelihood, result.stderr], -1)[: len(indices)]

  rows = run_sharded(lengths, per_call, evaluate, row_shape=(2,), progress=progress)
  return Likelihood(rows[:, 0], rows[:, 1])
