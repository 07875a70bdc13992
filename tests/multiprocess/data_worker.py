"""One process of a 2-process CPU job (gloo): writes its rows of the first train batches.

Usage: data_worker.py PROCESS_ID PORT OUT_DIR LAYOUT, LAYOUT "data" (mesh data=8, each process
holds 4 rows) or "tensor" (mesh data=4 x tensor=2 with every tensor pair across the two processes,
so both hold every row).
"""

import importlib.util
import os
import sys

# The suite's XLA_FLAGS (compilation settings) kept; XLA takes the last of a repeated flag.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402  pylint: disable=wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=wrong-import-position
from jax.sharding import Mesh  # noqa: E402  pylint: disable=wrong-import-position

from llada_jax.data import pipeline  # noqa: E402  pylint: disable=wrong-import-position
from llada_jax.parallel.sharding import axis_rules, batch_sharding  # noqa: E402

MICRO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "micro.py")

STEPS = 3


def micro_config():
  """tests/configs/micro.py (the same config the single-process reference uses)."""
  spec = importlib.util.spec_from_file_location("micro", MICRO_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def main(process_id: int, port: int, out_dir: str, layout: str) -> None:
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
  devices = np.array(jax.devices())  # process 0's four devices first
  if layout == "data":
    mesh = Mesh(devices.reshape(8, 1, 1), ("data", "fsdp", "tensor"))
  else:
    mesh = Mesh(devices.reshape(2, 4).T.reshape(4, 1, 2), ("data", "fsdp", "tensor"))
  config = micro_config()
  sharding = batch_sharding(mesh, axis_rules(config))
  batches = pipeline.train_batches(config, sharding)
  out = {}
  for step in range(STEPS):
    for name, array in next(batches).items():
      for shard in array.addressable_shards:
        out[f"{step}/{name}/{shard.index[0].start or 0}"] = np.asarray(shard.data)
  batches.close()
  np.savez(os.path.join(out_dir, f"process_{process_id}.npz"), **out)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
