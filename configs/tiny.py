"""CPU default: a ~3M-parameter LLaDA mask predictor on Tiny Shakespeare bytes (minutes on 2 cores)."""

import ml_collections

from llada_jax.config import default_config


def get_config() -> ml_collections.ConfigDict:
  return default_config()
