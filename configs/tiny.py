"""CPU default: a ~1M-parameter LLaDA mask predictor on Tiny Shakespeare bytes (minutes on 2 cores).

Sized for the demo's budget: at d_model 128 and sequence length 128 a step takes ~0.3 s on two
cores, so 1,500 steps (~3M bytes, about three epochs) fit in under 10 minutes. Larger variants of the
same shape learn more per step but fewer steps fit; on this budget the smaller model ends lower.
"""

import ml_collections

from llada_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
  c = default_config()
  c.model.scan_layers = False  # unrolled layers run ~13% faster on CPU; scanning pays off at depth
  # The demo model's best text (benchmarks/demo_samples.py, docs/performance.md): low-confidence
  # remasking at temperature 0.8 in blocks of 8 bytes; 69% of its words are words of the corpus,
  # against 34% for random-order sampling at temperature 1. Greedy (T=0) collapses into one word.
  c.sampling.update(dict(remasking="low_confidence", temperature=0.8, block_length=8))
  return c
