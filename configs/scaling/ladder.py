"""Scaling ladders: model sizes x FLOPs budgets, each run as an MDM (LLaDA), an ARM and a block
diffusion (BD3-LM) twin.

A ladder names its runs `<size>-<objective>-<budget>` (e.g. `d64-mdm-3e13`). The twins of a run
share every setting but `model.causal` and `diffusion.objective` (same shape, data order and seed),
so their losses compare at equal compute. The number of steps follows from the budget: budget /
(FLOPs per token x tokens per step), FLOPs per token being the exact count of
llada_jax.training.flops ("exact") or 6 N with N the non-embedding parameters ("6nd"); the
schedule, evaluation and checkpoint intervals are then proportional to it. The exact count charges
block diffusion's two-stream pass (noisy and clean copies of the sequence: the blocks twice, the
attention four times, the head once) about twice per token, so the block twin trains about half
the steps of its MDM and ARM twins on the same budget; 6 N D does not count the second stream.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Callable, Mapping

import ml_collections

from llada_jax.config import OBJECTIVES, validate
from llada_jax.errors import ConfigError
from llada_jax.training.flops import model_flops_per_token, non_embedding_parameters

CONVENTIONS = ("exact", "6nd")


@dataclasses.dataclass(frozen=True)
class Size:
  """One model shape of a ladder and its peak learning rate."""

  name: str
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  mlp_hidden_size: int
  peak_lr: float


@dataclasses.dataclass(frozen=True)
class Ladder:
  """Sizes, the FLOPs budgets of each size, and what every run of the ladder shares.

  `base` returns the config the runs start from (data, vocabulary, mesh, dtypes); the ladder then
  sets the shape, objective, sequence length, batch, schedule and intervals.
  """

  name: str
  base: Callable[[], ml_collections.ConfigDict]
  sizes: tuple[Size, ...]
  budgets: Mapping[str, tuple[float, ...]]  # size name -> FLOPs budgets of its runs
  convention: str = "exact"
  sequence_length: int = 128
  batch_size: int = 16
  eval_points: int = 10  # evaluations per run (at least: the last step adds one)
  eval_batches: int = 8
  checkpoints: int = 2  # saves per run, the last at num_steps ...
  max_save_every: int = 0  # ... but at least every this many steps (0: no bound)
  warmup_fraction: float = 0.05  # of num_steps, linear 0 -> peak_lr
  decay_fraction: float = 0.2  # of num_steps, linear peak_lr -> final_lr at the end
  final_lr_fraction: float = 0.1  # final_lr = this x the size's peak_lr
  min_steps: int = 3
  seed: int = 0  # the same for every run: twins see the same data order

  def __post_init__(self):
    if self.convention not in CONVENTIONS:
      raise ConfigError(
          f"ladder {self.name!r}: convention={self.convention!r} is not allowed: "
          f"expected one of {', '.join(CONVENTIONS)}"
      )
    names = [s.name for s in self.sizes]
    for name in names:
      if not re.fullmatch(r"[a-z0-9.]+", name) or names.count(name) > 1:
        raise ConfigError(
            f"ladder {self.name!r}: size name {name!r} is not allowed: expected "
            "a unique name of lowercase letters, digits and dots"
        )
    if set(self.budgets) != set(names):
      raise ConfigError(
          f"ladder {self.name!r}: budgets are given for {sorted(self.budgets)}; "
          f"expected exactly the sizes {names}"
      )
    for size, budgets in self.budgets.items():
      for budget in budgets:
        if not budget > 0 or float(format_budget(budget)) != budget:
          raise ConfigError(
              f"ladder {self.name!r}: budget {budget!r} of size {size} is not "
              "allowed: expected a positive number with at most 3 significant "
              "digits (it names the run)"
          )

  def size(self, name: str) -> Size:
    return next(s for s in self.sizes if s.name == name)


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a ladder."""

  size: Size
  objective: str
  budget: float

  @property
  def name(self) -> str:
    return f"{self.size.name}-{self.objective}-{format_budget(self.budget)}"


def format_budget(budget: float) -> str:
  """Compact e-notation of a FLOPs budget: 3e13, 1.5e19 (3 significant digits at most)."""
  mantissa, exponent = f"{budget:.2e}".split("e")
  return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def runs(ladder: Ladder, objectives: tuple[str, ...] = OBJECTIVES) -> list[Run]:
  """Every run of the ladder: by size, then budget, the objectives of a pair next to each other."""
  for objective in objectives:
    if objective not in OBJECTIVES:
      raise ConfigError(
          f"objective {objective!r} is not allowed: expected one of " f"{', '.join(OBJECTIVES)}"
      )
  return [
      Run(size, objective, budget)
      for size in ladder.sizes
      for budget in ladder.budgets[size.name]
      for objective in objectives
  ]


def parse_run(ladder: Ladder, name: str) -> Run:
  """The run named `<size>-<objective>-<budget>`; ConfigError listing the ladder's runs if none."""
  parts = name.split("-")
  if len(parts) == 3 and parts[1] in OBJECTIVES and parts[0] in ladder.budgets:
    try:
      budget = float(parts[2])
    except ValueError:
      budget = None
    for allowed in ladder.budgets[parts[0]]:
      if budget is not None and math.isclose(budget, allowed, rel_tol=1e-9):
        return Run(ladder.size(parts[0]), parts[1], allowed)
  names = ", ".join(r.name for r in runs(ladder))
  if not name:
    raise ConfigError(
        f"ladder {ladder.name!r} needs a run name (--config=FILE:RUN): one of " f"{names}"
    )
  raise ConfigError(
      f"run {name!r} is not in ladder {ladder.name!r}: expected "
      f"<size>-<objective>-<budget>, one of {names}"
  )


def parameters(config: ml_collections.ConfigDict) -> int:
  """All parameters: the non-embedding ones plus the embedding and the (untied) head."""
  return non_embedding_parameters(config) + 2 * config.model.vocab_size * config.model.d_model


def flops_per_token(config: ml_collections.ConfigDict, convention: str) -> float:
  """Training FLOPs per token under a budget convention ("exact" or "6nd")."""
  if convention == "6nd":
    return 6.0 * non_embedding_parameters(config)
  return model_flops_per_token(config)


def run_config(ladder: Ladder, run: Run | str) -> ml_collections.ConfigDict:
  """The validated config of one run (a Run or its name)."""
  if isinstance(run, str):
    run = parse_run(ladder, run)
  s = run.size
  c = ladder.base()
  c.seed = ladder.seed
  c.model.update(
      dict(
          d_model=s.d_model,
          n_layers=s.n_layers,
          n_heads=s.n_heads,
          n_kv_heads=s.n_kv_heads,
          mlp_hidden_size=s.mlp_hidden_size,
          max_sequence_length=ladder.sequence_length,
          init_std=round(s.d_model**-0.5, 4),
          causal=run.objective == "arm",
      )
  )
  c.diffusion.objective = run.objective
  if run.objective == "arm":
    c.train.loss_chunk = 0
  c.data.update(dict(sequence_length=ladder.sequence_length, batch_size=ladder.batch_size))

  tokens_per_step = ladder.batch_size * ladder.sequence_length
  num_steps = round(run.budget / (flops_per_token(c, ladder.convention) * tokens_per_step))
  if num_steps < ladder.min_steps:
    raise ConfigError(
        f"run {run.name} of ladder {ladder.name!r} has {num_steps} steps: its "
        f"budget allows fewer than the {ladder.min_steps} steps a run needs; raise "
        "the budget or shrink the batch"
    )
  c.optimizer.update(
      dict(
          peak_lr=s.peak_lr,
          final_lr=s.peak_lr * ladder.final_lr_fraction,
          lr_drop_step=0,
          lr_after_drop=0.0,
          warmup_steps=max(1, round(ladder.warmup_fraction * num_steps)),
          decay_fraction=ladder.decay_fraction,
      )
  )
  eval_every = math.ceil(num_steps / ladder.eval_points)
  c.train.update(
      dict(
          num_steps=num_steps,
          eval_every=eval_every,
          log_every=max(1, math.ceil(num_steps / 100)),
          eval_batches=ladder.eval_batches,
      )
  )
  save_every = math.ceil(num_steps / ladder.checkpoints)
  c.checkpoint.save_every = min(save_every, ladder.max_save_every or save_every)
  return validate(c)
