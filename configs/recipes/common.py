"""What the stages of the LLaDA 2.0 recipe share (configs/recipes/, docs/recipe.md).

Each stage's config file takes "ROOT" or "ROOT,toy": the stages' workdirs are ROOT/<stage> (a stage
starts from the one before it through train.init_from), its data files ROOT/data; "toy" is the
seconds-scale size the test of the whole chain runs (tests/test_recipe.py), the default "cpu" the
size docs/recipe.md measures on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from configs import tiny
from llada_jax.errors import ConfigError

SCALES = ("cpu", "toy")
# The block size the recipe ends at (LLaDA 2.0: 32 at sequence 4096; here 4 at 64, and the
# answers of the SFT task fill one block): every stage from the block warm-up on is sampled and
# scored with it.
BLOCK_SIZE = 4


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage's place in the chain: ROOT, its scale and its number of training steps."""

  root: pathlib.Path
  scale: str
  steps: int

  def workdir(self, name: str) -> str:
    """ROOT/name: a stage's workdir (or data folder)."""
    return str(self.root / name)


STEPS = {
    "cpu": dict(arm=1200, block=1000, sft=120, dpo=60),
    "toy": dict(arm=2, block=3, sft=2, dpo=2),
}


def parse(arg: str | None, stage: str) -> Stage:
  """The Stage of a config argument "ROOT[,SCALE]" (default runs/recipe, cpu); ConfigError names a
  scale that is not one of SCALES."""
  root, _, scale = (arg or "runs/recipe").partition(",")
  scale = scale or "cpu"
  if scale not in SCALES:
    raise ConfigError(f"recipe scale {scale!r} is not allowed: expected one of {', '.join(SCALES)}")
  return Stage(pathlib.Path(root), scale, STEPS[scale][stage])


def base(stage: Stage) -> ml_collections.ConfigDict:
  """configs/tiny.py on Tiny Shakespeare bytes at sequence length 64 (toy: a one-layer d32
  model), trained for the stage's steps, evaluated and saved at its end and twice before (toy:
  saved every step, evaluated at the end)."""
  c = tiny.get_config()
  c.data.update(dict(task="tinyshakespeare", sequence_length=64, batch_size=16))
  c.model.max_sequence_length = 64
  if stage.scale == "toy":
    c.model.update(dict(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden_size=64))
    c.data.update(dict(batch_size=8, shuffle_buffer=64))
  every = max(stage.steps // 3, 1)  # toy: saved every step, evaluated at the end
  toy = stage.scale == "toy"
  c.train.update(
      dict(
          num_steps=stage.steps,
          eval_every=stage.steps if toy else every,
          log_every=every,
          eval_batches=1 if toy else 4,
      )
  )
  c.checkpoint.update(dict(save_every=every, keep=3, async_save=False))
  c.optimizer.warmup_steps = min(c.optimizer.warmup_steps, max(stage.steps // 10, 1))
  return c


def answer_sampling(c: ml_collections.ConfigDict) -> None:
  """The reversal answers' sampler: one block of BLOCK_SIZE tokens (three letters and EOS) after
  the four-byte prompt, greedy."""
  c.sampling.update(
      dict(gen_length=BLOCK_SIZE, steps=BLOCK_SIZE, block_length=BLOCK_SIZE, temperature=0.0)
  )
