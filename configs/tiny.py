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
  # A model this small samples best by plain ancestral sampling (random order, temperature 1);
  # greedy low-confidence decoding collapses into repeated frequent words.
  c.sampling.update(dict(remasking="random", temperature=1.0, block_length=112))
  return c
