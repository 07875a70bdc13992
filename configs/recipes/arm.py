"""Recipe stage 1: the autoregressive model the diffusion model starts from (LLaDA 2.0 converts a
pre-trained AR model): objective arm, the causal network, on Tiny Shakespeare bytes.

  python -m llada_jax.train --config=configs/recipes/arm.py:runs/recipe --workdir=runs/recipe/arm
"""

import ml_collections

from configs.recipes import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = common.base(common.parse(arg, "arm"))
  c.model.causal = True
  c.diffusion.objective = "arm"
  return c
