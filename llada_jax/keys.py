"""Random keys of items and samples: every random draw is a function of (seed, item index, sample
index), never of how items are batched, padded or spread over devices and hosts.

`jax.random.split(rng, n)[i]` changes with n, so it is not used to give items their keys;
`fold_in(rng, i)` depends on i alone.

`Stream` names the independent random streams folded into the config seed: parameters are
initialised from fold_in(seed, INIT), training steps draw from fold_in(fold_in(seed, TRAIN), step)
and evaluation batches from fold_in(fold_in(seed, EVAL), index); the data pipeline's stateless
masking keys are seeded by the same TRAIN and EVAL numbers. The values are part of every run's
results: never renumber them.
"""

from __future__ import annotations

import enum
from typing import Sequence

import jax
import numpy as np


class Stream(enum.IntEnum):
  """The random streams of a run, each folded into the config seed (values are fixed forever)."""

  INIT = 0  # parameter initialisation (llada_jax/training/state.py)
  TRAIN = 1  # train steps: forward process, random-length cut (training/step.py, data/features.py)
  EVAL = 2  # held-out loss batches (training/step.py, data/features.py)
  PREFERENCE = 3  # the bounds' timesteps and masks of preference pairs (posttrain/dpo.py)
  ROLLOUT = 4  # RL rollouts and their prompt masks (posttrain/source.py RolloutSource)
  MASK_NOISE = 5  # the noise on an AR model's mask embedding (training/state.py)


def item_keys(rng: jax.Array, indices: Sequence[int] | np.ndarray | int) -> jax.Array:
  """Keys [len(indices)] (or [indices] for an int count, items 0..count-1): fold_in(rng, index)."""
  if isinstance(indices, (int, np.integer)):
    indices = np.arange(indices)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(np.asarray(indices, np.uint32))
