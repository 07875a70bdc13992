"""Recipe stage 2: block diffusion from the AR model (LLaDA 2.0's continued pre-training).

  python -m llada_jax.train --config=configs/recipes/block.py:runs/recipe --workdir=runs/recipe/block

Starts from ROOT/arm's parameters (train.init_from; each token then read from its predecessor's
logits, the AR model's alignment), the mask token's embedding row perturbed by noise (the AR model
never saw the token), and trains with the block-size schedule warm-up 1 -> 4 -> 16, a
whole-sequence (MDM) phase at L = 64 and the decay to the final 4; t from the clipped schedule
U(0.2, 0.8); documents packed with document-level attention (each starts on a block boundary).
"""

import ml_collections

from configs.recipes import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  stage = common.parse(arg, "block")
  c = common.base(stage)
  c.train.update(dict(init_from=stage.workdir("arm"), mask_embedding_noise=1.0))
  c.data.packing = "pack"
  n = stage.steps
  if stage.scale == "toy":  # a step of each phase: warm-up, MDM phase, decay
    sizes, starts = (1, "L", common.BLOCK_SIZE), (0, 1, 2)
  else:  # warm-up, MDM phase from 30% to 70% of the steps, decay
    sizes = (1, 4, 16, "L", common.BLOCK_SIZE)
    starts = [0] + [round(n * f) for f in (0.1, 0.2, 0.3, 0.7)]
  c.diffusion.update(
      dict(
          objective="block",
          block_size=common.BLOCK_SIZE,
          block_size_schedule=",".join(f"{a}:{b}" for a, b in zip(starts, sizes)),
          t_min=0.2,
          t_max=0.8,
      )
  )
  common.answer_sampling(c)
  return c
