"""Joining a multi-process JAX job: explicit coordinator flags/env, or the cluster's own detection.

Flags win over the environment variables JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and
JAX_PROCESS_ID (what launch/local.sh and launch/slurm.sbatch set). Without either, TPU pod slices,
SLURM jobs with several tasks and GKE JobSets (or LLADA_AUTO_DISTRIBUTED=1) are detected and
`jax.distributed.initialize()` finds its peers itself; a plain single machine stays one process.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from llada_jax.errors import ConfigError


def _cluster_detected() -> bool:
  if os.environ.get("LLADA_AUTO_DISTRIBUTED") == "1":  # set by launch/tpu_vm.sh and gke.sh
    return True
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if "," in hosts:
    return True
  if int(os.environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
    return True
  return bool(os.environ.get("JOBSET_NAME"))


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1) -> None:
  """Joins the job described by the arguments (or env, or the cluster); no-op for one process."""
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num_processes = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  if process_id < 0:
    process_id = int(os.environ.get("JAX_PROCESS_ID", "-1"))
  # CPU hosts talk through gloo; the setting is ignored by TPU and GPU backends.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ConfigError(
          f"--process_id={process_id} with --num_processes={num_processes} is not "
          "allowed: expected 0 <= process_id < num_processes >= 1"
      )
    jax.distributed.initialize(coordinator_address, num_processes, process_id)
  elif num_processes > 1:
    raise ConfigError(
        f"--num_processes={num_processes} needs --coordinator_address (host:port " "of process 0)"
    )
  elif _cluster_detected():
    jax.distributed.initialize()
  else:
    return
  logging.info(
      "process %d of %d; %d local and %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )
