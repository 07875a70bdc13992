"""Compile the train step for a target mesh ahead of time and print what one device needs.

  python -m llada_jax.compile --config=configs/llada_8b.py --config.mesh.fsdp=64 --num_devices=64

On a machine without the target hardware it compiles for `--num_devices` fake CPU devices: the
sharding, argument and output bytes are the target's, temporaries and FLOPs are the CPU compiler's
(see docs/scaling.md for how far they stand from TPU and GPU numbers). Nothing is allocated.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path of a config file (configs/*.py).",
                                          lock_config=True)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Fake CPU devices to compile for (0: the "
                                    "machine's own devices).")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Memory of one target device in GiB, to check the "
                              "step fits (e.g. 95 for TPU v5p, 80 for H100).")

GIB = 1 << 30


def _compile(argv: list[str]) -> None:
  del argv
  if _CONFIG.value is None:
    raise ConfigError("--config is required, e.g. --config=configs/llada_8b.py")
  if _NUM_DEVICES.value < 0:
    raise ConfigError(f"--num_devices={_NUM_DEVICES.value} is not allowed: expected >= 0")
  if _NUM_DEVICES.value:
    # Must happen before JAX starts its CPU backend.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={_NUM_DEVICES.value}")
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top

  from llada_jax.training.aot import compile_train_step  # pylint: disable=g-import-not-at-top

  report = compile_train_step(_CONFIG.value, jax.devices())
  lines = [
      f"compiled the train step for {report.devices} {report.platform} devices, mesh "
      f"{report.mesh}, in {report.compile_seconds:.1f} s",
      f"parameters: {report.parameters:,}",
      "per device:",
      f"  arguments   {report.argument_bytes / GIB:9.3f} GiB  (parameters, optimizer state, batch)",
      f"  outputs     {report.output_bytes / GIB:9.3f} GiB  ({report.alias_bytes / GIB:.3f} GiB "
      "written into donated arguments)",
      f"  temporaries {report.temp_bytes / GIB:9.3f} GiB  (activations, gradients, workspace)",
      f"  code        {report.code_bytes / GIB:9.3f} GiB",
      f"  peak        {report.peak_bytes / GIB:9.3f} GiB",
      f"  FLOPs       {report.flops_per_device:.3e} per step (compiler's count)",
      f"model FLOPs per step (6 N D + attention): {report.model_flops_per_step:.3e} in all, "
      f"{report.model_flops_per_step / report.devices:.3e} per device",
  ]
  if _HBM_GIB.value:
    verdict = "fits" if report.peak_bytes <= _HBM_GIB.value * GIB else "DOES NOT FIT"
    lines.append(f"{verdict} in {_HBM_GIB.value:g} GiB per device")
  print("\n".join(lines), flush=True)


run = entry_point(_compile)  # console script `llada-compile`


if __name__ == "__main__":
  run()
