"""Recipe stage 4: ELBO-DPO (VRPO) from the SFT model on reversal preference pairs (chosen: the
reversed word; rejected: a near miss, its first two letters swapped), ROOT/data/preferences*.jsonl
(launch/recipe.py writes them). β 0.5 and a small learning rate keep the policy near its
reference: at β 0.1 and 2e-4 the held-out margin grew while the answers' likelihood fell.

  python -m llada_jax.train --config=configs/recipes/dpo.py:runs/recipe --workdir=runs/recipe/dpo
"""

import ml_collections

from configs.recipes import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  stage = common.parse(arg, "dpo")
  c = common.base(stage)
  c.data.update(dict(sequence_length=16, batch_size=8))
  c.diffusion.update(dict(objective="block", block_size=common.BLOCK_SIZE))
  c.posttrain.update(
      dict(
          method="dpo",
          reference=stage.workdir("sft"),
          preferences=stage.workdir("data/preferences.jsonl"),
          preferences_eval=stage.workdir("data/preferences_eval.jsonl"),
          beta=0.5,
          mc_num=4,
      )
  )
  c.optimizer.update(dict(peak_lr=5e-5, final_lr=5e-6, weight_decay=0.0))
  common.answer_sampling(c)
  return c
