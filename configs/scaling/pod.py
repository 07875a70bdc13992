"""The pod scaling ladder: 150M-2B non-embedding params x MDM/ARM/block, 1e19-1e21 FLOPs (6 N D).

  python launch/sweep.py --ladder=configs/scaling/pod.py --out=gs://bucket/scaling --mode=print \
      --launcher=tpu_vm --launcher_args="my-tpu us-central2-b" \
      -- --config.data.task_module=my_tasks --config.data.task=my_corpus

Every size runs at every budget (isoFLOP profiles, Chinchilla's approach 2). Sizes are named by
non-embedding parameters, as LLaDA names its 1B (0.97B; 1.49B with the 126k-token embedding and
head); `1b` is exactly configs/llada_1b.py's shape. Tokenizer, dtypes, remat and the fsdp mesh come
from configs/llada_1b.py, whose data task is a placeholder: name the corpus after `--` as above.
Batch 512 x 4096 (2.1M tokens per step) at every size; budgets in the 6 N D convention of LLaDA
and SMDM. At 1e21 the compute-optimal size (~3B by Chinchilla) lies above the ladder, and `150m`
runs 540k steps: select runs with --only. 6 N D does not see block diffusion's two-stream pass:
the block twins train as many steps as the MDM and ARM twins and spend about twice their FLOPs.
"""

from __future__ import annotations

import ml_collections

from configs import llada_1b
from configs.scaling.ladder import Ladder, Size, run_config

SIZES = (
    Size(
        "150m",
        d_model=1024,
        n_layers=13,
        n_heads=16,
        n_kv_heads=4,
        mlp_hidden_size=2816,
        peak_lr=8e-4,
    ),
    Size(
        "400m",
        d_model=1536,
        n_layers=16,
        n_heads=24,
        n_kv_heads=4,
        mlp_hidden_size=4096,
        peak_lr=6e-4,
    ),
    Size(
        "1b",
        d_model=2048,
        n_layers=22,
        n_heads=32,
        n_kv_heads=4,
        mlp_hidden_size=5634,
        peak_lr=4e-4,
    ),
    Size(
        "2b",
        d_model=2560,
        n_layers=28,
        n_heads=32,
        n_kv_heads=8,
        mlp_hidden_size=6912,
        peak_lr=3e-4,
    ),
)

BUDGETS = (1e19, 1e20, 1e21)

LADDER = Ladder(
    "pod",
    llada_1b.get_config,
    SIZES,
    budgets={s.name: BUDGETS for s in SIZES},
    convention="6nd",
    sequence_length=4096,
    batch_size=512,
    eval_points=10,
    eval_batches=8,
    checkpoints=20,
    max_save_every=1000,
    warmup_fraction=0.02,
)


def get_config(run: str = "") -> ml_collections.ConfigDict:
  """The config of one run, e.g. "1b-mdm-1e20"; without one, an error listing the runs."""
  return run_config(LADDER, run)
