"""Train a LLaDA mask predictor.

  python -m llada_jax.train --config=configs/tiny.py --workdir=runs/demo \
      [--config.train.num_steps=100 ...]

Rerunning the same command resumes from the latest checkpoint in the workdir.
"""

from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (configs/*.py).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and TensorBoard logs.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address",
    "",
    "host:port of process 0 in a multi-process job (default: "
    "$JAX_COORDINATOR_ADDRESS, or the TPU/SLURM/GKE cluster's).",
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0, "Processes in the job (0: from env).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (-1: from env).")


def _train(argv: list[str]) -> None:
  """The `llada-train` command: evaluation hooks built (bad task names fail here), then training."""
  del argv
  from llada_jax.evaluation import hooks  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.distributed import initialize  # pylint: disable=g-import-not-at-top
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  if _CONFIG.value is None:
    raise ConfigError("--config is required, e.g. --config=configs/tiny.py")
  if not _WORKDIR.value:
    raise ConfigError("--workdir is required, e.g. --workdir=runs/demo")
  eval_hooks = hooks.from_config(_CONFIG.value)  # unknown tasks fail before anything starts
  initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  train(_CONFIG.value, _WORKDIR.value, eval_hooks)


run = entry_point(_train)  # console script `llada-train`


if __name__ == "__main__":
  run()
