"""A seconds-scale ladder for the sweep tests: 2 sizes x MDM/ARM, 4 steps each, Gutenberg bytes."""

from __future__ import annotations

import ml_collections

from configs.scaling.ladder import Ladder, Size, run_config
from llada_jax.config import default_config


def _base() -> ml_collections.ConfigDict:
  c = default_config()
  c.model.scan_layers = False
  c.data.update(dict(task="gutenberg", vocabulary="byte", shuffle_buffer=64))
  c.checkpoint.async_save = False
  c.sampling.update(dict(steps=4, gen_length=8, block_length=4))
  return c


LADDER = Ladder(
    "micro",
    _base,
    (
        Size(
            "d16", d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden_size=48, peak_lr=3e-3
        ),
        Size(
            "d32", d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden_size=64, peak_lr=3e-3
        ),
    ),
    budgets={"d16": (5e7,), "d32": (1.2e8,)},
    sequence_length=32,
    batch_size=8,
    eval_points=2,
    eval_batches=1,
    checkpoints=1,
)


def get_config(run: str = "") -> ml_collections.ConfigDict:
  return run_config(LADDER, run)
