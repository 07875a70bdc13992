"""Recipe stage 3: SFT with LLaDA 2.0's post-training options, on the reversal task ("abf>" ->
"fba", registered as reverse_sft; 40 words held out).

  python -m llada_jax.train --config=configs/recipes/sft.py:runs/recipe --workdir=runs/recipe/sft

Starts from ROOT/block; complementary masking (each example scored with its mask and the
complement) and CAP (cap_weight: the entropy of correct predictions, for more tokens per step
under threshold decoding). "ROOT,SCALE,nocap" is the same stage without CAP (the control that
docs/recipe.md compares tokens per step against).
"""

import ml_collections

from configs.recipes import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or ""
  nocap = arg.endswith(",nocap")
  stage = common.parse(arg.removesuffix(",nocap"), "sft")
  c = common.base(stage)
  c.train.init_from = stage.workdir("block")
  c.data.update(dict(task="reverse_sft", sequence_length=16))
  c.diffusion.update(
      dict(
          objective="block",
          block_size=common.BLOCK_SIZE,
          complementary_masking=True,
          cap_weight=0.0 if nocap else 0.5,
      )
  )
  c.optimizer.update(dict(peak_lr=1e-3, final_lr=1e-4))
  common.answer_sampling(c)
  return c
