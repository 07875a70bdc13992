"""Compile the train step, the sampler or the likelihood scorer for a target ahead of time, and say
what one chip needs.

  llada-compile --config=configs/llada_8b.py --topology=v5p:4x4x4 --config.data.batch_size=256
  llada-compile --config=configs/llada_1b.py --topology=v5e:4x4 --what=sample --num_items=16
  llada-compile --config=configs/tiny.py --num_devices=8           # fake CPU devices, no libtpu

With --topology (needs libtpu: pip install 'llada_jax[tpu-aot]') the real TPU compiler compiles for
that slice (or --num_slices slices over DCN) on any host: bytes, FLOPs and collectives are the
TPU's own. With --num_devices it compiles for fake CPU devices: shardings, argument and output
bytes are the target's, temporaries and FLOPs the CPU compiler's. Nothing is allocated.
"""

from __future__ import annotations

import os

from absl import flags
from ml_collections import config_flags

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path of a config file (configs/*.py).", lock_config=True
)
_TOPOLOGY = flags.DEFINE_string(
    "topology",
    "",
    "TPU topology to compile for with the real TPU "
    "compiler, e.g. v5p:4x4x4, v5e:16x16, v6e:8x8, v4:2x2x2.",
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN.")
_NUM_DEVICES = flags.DEFINE_integer(
    "num_devices", 0, "Fake CPU devices to compile for (0: the machine's own devices)."
)
_WHAT = flags.DEFINE_string("what", "train", "The program: train, sample or score.")
_NUM_ITEMS = flags.DEFINE_integer(
    "num_items",
    0,
    "Prompts (sample) or pairs (score); 0: data.batch_size prompts, or pairs for data.batch_size "
    "rows, rounded up to a multiple of the data-parallel devices.",
)
_PROMPT_LENGTH = flags.DEFINE_integer(
    "prompt_length",
    0,
    "Prompt tokens per row (sample; a GRPO update's rollouts); 0: 64, or what "
    "model.max_sequence_length leaves after sampling.gen_length when sampling.",
)
_HBM_GIB = flags.DEFINE_float(
    "hbm_gib",
    0.0,
    "Memory of one target device in GiB (default: the chip's own for TPUs and known GPUs).",
)

GIB = 1 << 30


def format_report(report) -> str:
  """The report as the lines llada-compile prints."""
  lines = [
      f"compiled the {report.program} program for {report.devices} {report.platform} devices "
      f"({report.device_kind}), mesh {report.mesh}, in {report.compile_seconds:.1f} s",
      f"parameters: {report.parameters:,}",
      "per device:",
      f"  arguments   {report.argument_bytes / GIB:9.3f} GiB  (parameters, optimizer state, "
      "inputs)",
      f"  outputs     {report.output_bytes / GIB:9.3f} GiB  ({report.alias_bytes / GIB:.3f} GiB "
      "written into donated arguments)",
      f"  temporaries {report.temp_bytes / GIB:9.3f} GiB  (activations, gradients, workspace)",
      f"  code        {report.code_bytes / GIB:9.3f} GiB",
      f"  peak        {report.peak_bytes / GIB:9.3f} GiB",
  ]
  if report.model_flops is None:
    lines.append(
        f"FLOPs per device: compiled {report.flops_per_device:.3e}; model: not fixed "
        "(threshold decoding runs as many passes as the text needs)"
    )
  else:
    per_device = report.model_flops / report.devices
    ratio = (
        ""
        if report.opaque_kernels or report.loops
        else f"  (compiled / model = {report.flops_per_device / per_device:.2f})"
    )
    lines.append(
        f"FLOPs per device: compiled {report.flops_per_device:.3e}, model "
        f"{per_device:.3e}{ratio}"
    )
  if report.opaque_kernels:
    lines.append(
        f"  the compiled count leaves out {report.opaque_kernels} kernel calls (Pallas "
        "splash attention or cuDNN): no ratio is shown"
    )
  if report.loops:
    lines.append(
        f"  the compiled count covers one trip of each of {report.loops} loops (scanned "
        "layers, accumulation, sampling steps): no ratio is shown"
    )
  lines.append("collectives       instructions  executions per call  MiB per call per device")
  for kind, (instructions, executions, size) in report.collectives.by_kind().items():
    lines.append(f"  {kind:18s} {instructions:9d} {executions:20d} {size / (1 << 20):24.1f}")
  if report.collectives.unknown_trip_counts:
    lines.append(
        f"  ({report.collectives.unknown_trip_counts} loops of unknown trip count " "counted once)"
    )
  hbm = _HBM_GIB.value * GIB if _HBM_GIB.value else report.hbm_bytes
  if hbm:
    verdict = "fits" if report.peak_bytes <= hbm else "DOES NOT FIT"
    lines.append(
        f"{verdict} in {hbm / GIB:g} GiB per device ({100 * report.peak_bytes / hbm:.0f}% used)"
    )
  return "\n".join(lines)


def _compile(argv: list[str]) -> None:
  """The `llada-compile` command: compiles a program for the target and prints its report."""
  del argv
  if _CONFIG.value is None:
    raise ConfigError("--config is required, e.g. --config=configs/llada_8b.py")
  if _NUM_DEVICES.value < 0:
    raise ConfigError(f"--num_devices={_NUM_DEVICES.value} is not allowed: expected >= 0")
  if _TOPOLOGY.value and _NUM_DEVICES.value:
    raise ConfigError("--topology and --num_devices are not allowed together: give one target")
  for flag in (_NUM_ITEMS, _PROMPT_LENGTH):
    if flag.value < 0:
      raise ConfigError(f"--{flag.name}={flag.value} is not allowed: expected >= 0 (0: default)")
  if _NUM_DEVICES.value:
    # Must happen before JAX starts its CPU backend.
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_force_host_platform_device_count={_NUM_DEVICES.value}"
    )
    os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=g-import-not-at-top

  if _TOPOLOGY.value and "JAX_PLATFORMS" not in os.environ:
    # The topology's devices come from libtpu's compiler alone; the host's backend stays the CPU
    # (no probing for TPU chips this host may not have).
    jax.config.update("jax_platforms", "cpu")

  from llada_jax.aot import PROGRAMS, compile_program  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.topology import tpu_devices  # pylint: disable=g-import-not-at-top

  if _WHAT.value not in PROGRAMS:
    raise ConfigError(f"--what={_WHAT.value} is not allowed: expected one of {', '.join(PROGRAMS)}")
  if _NUM_SLICES.value != 1 and not _TOPOLOGY.value:
    raise ConfigError(f"--num_slices={_NUM_SLICES.value} is not allowed without --topology")
  devices = tpu_devices(_TOPOLOGY.value, _NUM_SLICES.value) if _TOPOLOGY.value else jax.devices()
  report = compile_program(
      _CONFIG.value, devices, _WHAT.value, _NUM_ITEMS.value, _PROMPT_LENGTH.value
  )
  print(format_report(report), flush=True)


run = entry_point(_compile)  # console script `llada-compile`


if __name__ == "__main__":
  run()
