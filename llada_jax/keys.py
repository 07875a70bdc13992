"""Random keys of items and samples: every random draw is a function of (seed, item index, sample
index), never of how items are batched, padded or spread over devices and hosts.

`jax.random.split(rng, n)[i]` changes with n, so it is not used to give items their keys;
`fold_in(rng, i)` depends on i alone.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np


def item_keys(rng: jax.Array, indices: Sequence[int] | np.ndarray | int) -> jax.Array:
  """Keys [len(indices)] (or [indices] for an int count, items 0..count-1): fold_in(rng, index)."""
  if isinstance(indices, (int, np.integer)):
    indices = np.arange(indices)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(np.asarray(indices, np.uint32))
