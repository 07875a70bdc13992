"""The CPU scaling ladder: 5 sizes (0.08M-2.76M parameters) x MDM/ARM/block on Gutenberg bytes.

  python launch/sweep.py --ladder=configs/scaling/cpu.py --out=runs/scaling
  python -m llada_jax.train --config=configs/scaling/cpu.py:d64-mdm-1e12 --workdir=runs/d64

The first 8 runs take about 16 minutes on 2 idle CPU cores and about 23 when other jobs share
them (measured steps, idle / shared: d48 0.05 / 0.09 s, d64 0.09 s, d96 0.17-0.19 s, d128
0.29 / 0.51 s; plus 15-30 s per run of imports, compiles, evaluations and checkpoints); the d192
pair about 25 minutes more (0.65 s a step, shared). Compute grows 160x over a 48x range of
non-embedding parameters, tokens 4.9x (D ~ N^0.4): Chinchilla's D ~ N would leave d48 about 50
steps on this time budget. Learning rates scale ~1/sqrt(d_model)
from the 3e-3 of configs/tiny.py. Budgets count exact FLOPs (the head and attention are a large
share of them at this size). A block twin's token costs 2.2x (d192) to 2.4x (d48) an MDM token's
FLOPs (the two-stream pass), so it trains 42-46% of its MDM and ARM twins' steps; the five block
runs took 41 minutes in all (shared cores, d192 19 minutes).
"""

from __future__ import annotations

import ml_collections

from configs import tiny
from configs.scaling.ladder import Ladder, Size, run_config


def _base() -> ml_collections.ConfigDict:
  c = tiny.get_config()
  c.data.update(dict(task="gutenberg", vocabulary="byte"))
  return c


SIZES = (
    Size("d48", d_model=48, n_layers=2, n_heads=3, n_kv_heads=3, mlp_hidden_size=128, peak_lr=5e-3),
    Size("d64", d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, mlp_hidden_size=176, peak_lr=4e-3),
    Size(
        "d96", d_model=96, n_layers=4, n_heads=3, n_kv_heads=3, mlp_hidden_size=256, peak_lr=3.5e-3
    ),
    Size(
        "d128", d_model=128, n_layers=5, n_heads=4, n_kv_heads=4, mlp_hidden_size=352, peak_lr=3e-3
    ),
    Size(
        "d192",
        d_model=192,
        n_layers=6,
        n_heads=6,
        n_kv_heads=6,
        mlp_hidden_size=512,
        peak_lr=2.5e-3,
    ),
)

LADDER = Ladder(
    "cpu",
    _base,
    SIZES,
    budgets={"d48": (2.5e11,), "d64": (1e12,), "d96": (4e12,), "d128": (1.2e13,), "d192": (4e13,)},
    convention="exact",
    sequence_length=128,
    batch_size=16,
    eval_points=10,
    eval_batches=8,
    checkpoints=2,
)


def get_config(run: str = "") -> ml_collections.ConfigDict:
  """The config of one run, e.g. "d64-mdm-1e12"; without one, an error listing the runs."""
  return run_config(LADDER, run)
