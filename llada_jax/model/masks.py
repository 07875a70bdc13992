"""Static attention patterns beyond causal and bidirectional: the block-causal masks of block
diffusion (BD3-LM, Arriola et al., ICLR 2025, arXiv 2503.09573, Sec. 3.2 and Fig. 2).

A sequence is cut into blocks of `size` tokens counted from index `start` (indices before it form
blocks counted backwards: a prompt of width `start` ends on a block boundary); block b of index i
is floor((i - start) / size).

Single stream (sampling, scoring a clean sequence): a query attends to the keys of its own block
and of every earlier block. size = 1 is causal attention; size >= length is bidirectional.

Two streams (training, the vectorised BD3-LM layout): the input is [x_t ; x_0] of length 2L, both
copies at positions 0..L-1. A noisy query attends to the noisy keys of its own block and the clean
keys of earlier blocks; a clean query attends to the clean keys of its own and earlier blocks;
nothing attends from the clean copy to the noisy one. One forward pass so computes every block's
denoising given the clean blocks before it.

The rule is written with array operators only, so the same function serves NumPy (dense masks,
splash's mask tables) and traced code (splash computes it inside the kernel).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

Rule = Callable[[Any, Any], Any]  # (query indices, key indices) -> bool, broadcasting


@dataclasses.dataclass(frozen=True)
class BlockCausal:
  """Block-causal attention of a block diffusion model (static: part of the compiled program).

  Attributes:
    size: tokens per block B (>= 1); block k is [k B, (k + 1) B), aligned at index 0 in training,
      sampling and scoring alike (each row starts at index 0 or at a multiple of B).
    two_stream: the [x_t ; x_0] training layout (queries and keys of length 2L).
  """

  size: int
  two_stream: bool = False

  def rule(self, q_len: int, kv_len: int) -> Rule:
    """The allowed(query index, key index) function for self-attention over q_len == kv_len
    positions (ValueError otherwise: a window against a cache has no static pattern)."""
    if q_len != kv_len:
      raise ValueError(
          f"a block-causal pattern needs self-attention, got {q_len} queries and {kv_len} keys"
      )
    if self.two_stream and q_len % 2:
      raise ValueError(f"a two-stream layout needs an even length, got {q_len}")
    half = q_len // 2 if self.two_stream else q_len
    size = self.size

    def allowed(q: Any, k: Any) -> Any:
      q_block = q % half // size
      k_block = k % half // size
      if not self.two_stream:
        return k_block <= q_block
      q_clean, k_clean = q >= half, k >= half
      return ((k_block < q_block) & k_clean) | ((k_block == q_block) & (q_clean == k_clean))

    return allowed

  def dense(self, q_len: int, kv_len: int) -> np.ndarray:
    """The pattern as a bool array [q_len, kv_len] (True: the query may attend to the key)."""
    rule = self.rule(q_len, kv_len)
    return np.asarray(rule(np.arange(q_len)[:, None], np.arange(kv_len)[None, :]), bool)
