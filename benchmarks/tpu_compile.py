"""What the real TPU compiler says of LLaDA 1B and 8B, and of LLaDA 2.x mini and flash (MoE,
expert parallelism), on the slices users pick (docs/scaling.md).

  python benchmarks/tpu_compile.py --rows=slices --json=tpu_slices.json    # the docs table
  python benchmarks/tpu_compile.py --rows=moe                              # llada2 mini, flash
  python benchmarks/tpu_compile.py --rows=attention                        # xla vs splash, S=4096
  python benchmarks/tpu_compile.py --small                                 # the tiny model, v5e:2x2

Needs libtpu (pip install 'llada_jax[tpu-aot]'); runs on any host, allocates nothing. Each row is
one `llada_jax.aot.compile_program` call; the table gives the per-chip peak against the chip's HBM,
the bytes the chip sends and receives in collectives per step, and the compile time on this host.
"""

from __future__ import annotations

import json
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  pylint: disable=wrong-import-position
from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

from configs import (  # noqa: E402  pylint: disable=wrong-import-position
    llada2_flash,
    llada2_mini,
    llada_1b,
    llada_8b,
    tiny,
)
from llada_jax.aot import compile_program  # noqa: E402
from llada_jax.errors import ConfigError, DoesNotFit  # noqa: E402
from llada_jax.parallel.topology import tpu_devices  # noqa: E402
from llada_jax.training.flops import forward_flops_per_token  # noqa: E402

_ROWS = flags.DEFINE_enum("rows", "slices", ["slices", "moe", "attention"], "Which table.")
_SMALL = flags.DEFINE_bool("small", False, "One tiny row on v5e:2x2 (seconds; for tests).")
_ONLY = flags.DEFINE_string("only", "", "Run the rows whose name contains this text.")
_JSON = flags.DEFINE_string("json", "", "Also write the rows here.")

GIB = 1 << 30
CONFIGS = {
    "tiny": tiny,
    "llada_1b": llada_1b,
    "llada_8b": llada_8b,
    "llada2_mini": llada2_mini,
    "llada2_flash": llada2_flash,
}

# name, config, topology, overrides. Batch 1280 x 4096 (the paper's) through gradient accumulation.
SLICES = [
    ("8b v5p-64", "llada_8b", "v5p:4x4x4", dict(grad_accum_steps=5)),
    ("8b v5p-64 accum 2", "llada_8b", "v5p:4x4x4", dict(grad_accum_steps=2)),
    ("8b v5p-128", "llada_8b", "v5p:4x4x8", dict(grad_accum_steps=2)),
    ("8b v6e-64", "llada_8b", "v6e:8x8", dict(grad_accum_steps=10)),
    ("8b v6e-64 accum 5", "llada_8b", "v6e:8x8", dict(grad_accum_steps=5)),
    ("8b v5e-256", "llada_8b", "v5e:16x16", dict(grad_accum_steps=5)),
    ("8b v5e-256 loss_chunk", "llada_8b", "v5e:16x16", dict(grad_accum_steps=5, loss_chunk=512)),
    ("1b v5p-64", "llada_1b", "v5p:4x4x4", dict(grad_accum_steps=2)),
    ("1b v6e-64", "llada_1b", "v6e:8x8", dict(grad_accum_steps=4)),
    ("1b v5e-256", "llada_1b", "v5e:16x16", dict(grad_accum_steps=1)),
    ("1b v5e-256 accum 5", "llada_1b", "v5e:16x16", dict(grad_accum_steps=5)),
]
# LLaDA 2.x (block diffusion, MoE): 2 sequences of 4096 per chip, the experts split over `expert`
# chips and the rest over fsdp. Topologies count chips (v5p:2x2x2 is 8 chips, sold as v5p-16).
MOE = [
    ("mini v5p 8 chips ep8", "llada2_mini", "v5p:2x2x2", dict(batch_size=16, expert=8)),
    ("mini v6e 16 chips ep16", "llada2_mini", "v6e:4x4", dict(batch_size=32, expert=16)),
    ("mini v6e 16 chips ep8 fsdp2", "llada2_mini", "v6e:4x4", dict(batch_size=32, expert=8)),
    ("mini v6e 16 chips ep16 batch 16", "llada2_mini", "v6e:4x4", dict(batch_size=16, expert=16)),
    ("flash v5p 64 chips ep16", "llada2_flash", "v5p:4x4x4", dict(batch_size=128, expert=16)),
    ("flash v5p 64 chips ep64", "llada2_flash", "v5p:4x4x4", dict(batch_size=128, expert=64)),
    ("flash v5p 128 chips ep32", "llada2_flash", "v5p:4x4x8", dict(batch_size=256, expert=32)),
]
# Sequence 4096, 2 sequences per chip, remat full: what each attention implementation costs. The
# layers are unrolled so that the compiler's FLOPs and bytes cover all of them (a scanned loop's
# body is counted once).
ATTENTION = [
    (
        f"1b {topology} {attention}",
        "llada_1b",
        topology,
        dict(batch_size=32, attention=attention, grad_accum_steps=1, scan_layers=False),
    )
    for topology in ("v5e:4x4", "v6e:4x4")
    for attention in ("xla", "splash")
]
SMALL = [
    (
        "tiny v5e-4 splash",
        "tiny",
        "v5e:2x2",
        dict(batch_size=16, sequence_length=512, attention="splash", grad_accum_steps=1),
    )
]


def _config(name: str, overrides: dict):
  c = CONFIGS[name].get_config()
  c.model.update(
      dict(
          attention=overrides.get("attention", "splash"),
          remat="full",
          dtype="bfloat16",
          scan_layers=overrides.get("scan_layers", True),
      )
  )
  if name == "tiny":
    c.model.max_sequence_length = overrides["sequence_length"]
  c.data.update(
      dict(
          batch_size=overrides.get("batch_size", 1280),
          sequence_length=overrides.get("sequence_length", c.data.sequence_length),
      )
  )
  c.train.update(
      dict(
          grad_accum_steps=overrides.get("grad_accum_steps", 1),
          loss_chunk=overrides.get("loss_chunk", 0),
      )
  )
  c.mesh.update(dict(data=1, fsdp=-1, tensor=1, expert=overrides.get("expert", 1)))
  return c


def run_row(name: str, config_name: str, topology: str, overrides: dict) -> dict:
  """Compiles one row's train step and returns its numbers."""
  config = _config(config_name, overrides)
  devices = tpu_devices(topology)
  start = time.perf_counter()
  report = compile_program(config, devices, "train")
  kinds = report.collectives.by_kind()
  attention_flops = 0.0
  if config.model.attention == "splash":  # the kernel's FLOPs, which the compiler does not count
    m, s = config.model, config.data.sequence_length
    attention_flops = 3 * 4 * m.n_layers * s * m.d_model * s * config.data.batch_size
    attention_flops /= len(devices)
  return dict(
      name=name,
      topology=topology,
      chips=len(devices),
      device_kind=report.device_kind,
      mesh=report.mesh,
      batch=config.data.batch_size,
      micro_batch=config.data.batch_size // config.train.grad_accum_steps,
      grad_accum_steps=config.train.grad_accum_steps,
      remat=config.model.remat,
      attention=config.model.attention,
      loss_chunk=config.train.loss_chunk,
      peak_gib=report.peak_bytes / GIB,
      temp_gib=report.temp_bytes / GIB,
      hbm_gib=(report.hbm_bytes or 0) / GIB,
      fits=report.hbm_bytes is not None and report.peak_bytes <= report.hbm_bytes,
      collective_gib=sum(size for _, _, size in kinds.values()) / GIB,
      all_to_all_gib=kinds.get("all-to-all", (0, 0, 0))[2] / GIB,
      collectives={k: v[:2] for k, v in kinds.items() if v[0]},
      compiled_flops=report.flops_per_device,
      kernel_flops=attention_flops,
      bytes_accessed_gib=report.bytes_accessed / GIB,
      model_flops_per_chip=report.model_flops / len(devices),
      forward_flops_per_token=forward_flops_per_token(config, config.data.sequence_length),
      compile_seconds=time.perf_counter() - start,
  )


def main(argv: list[str]) -> None:
  del argv
  rows = (
      SMALL if _SMALL.value else {"slices": SLICES, "moe": MOE, "attention": ATTENTION}[_ROWS.value]
  )
  results = []
  print(
      "| row | mesh | batch (micro x accum) | peak / HBM per chip | collectives per step "
      "| compile |",
      flush=True,
  )
  print("|---|---|---|---|---|---|", flush=True)
  for name, config_name, topology, overrides in rows:
    if _ONLY.value and _ONLY.value not in name:
      continue
    try:
      row = run_row(name, config_name, topology, overrides)
    except (ConfigError, DoesNotFit) as e:
      print(f"| {name} | {e} |", flush=True)
      results.append(dict(name=name, topology=topology, error=str(e)))
      continue
    results.append(row)
    verdict = "fits" if row["fits"] else "DOES NOT FIT"
    mesh = "x".join(f"{k} {v}" for k, v in row["mesh"].items() if v > 1)
    print(
        f"| {name} ({row['attention']}) | {mesh} | {row['batch']} ({row['micro_batch']} x "
        f"{row['grad_accum_steps']}) | {row['peak_gib']:.1f} / {row['hbm_gib']:.0f} GiB "
        f"{verdict} | {row['collective_gib']:.1f} GiB | {row['compile_seconds']:.0f} s |",
        flush=True,
    )
    if _ROWS.value == "moe":
      print(
          f"|   | all-to-all {row['all_to_all_gib']:.1f} GiB per step per chip; model FLOPs per "
          f"chip {row['model_flops_per_chip']:.3e} (active parameters) |||||",
          flush=True,
      )
    if _ROWS.value == "attention" or _SMALL.value:
      print(
          f"|   | FLOPs per chip: compiled {row['compiled_flops']:.3e} + kernel "
          f"{row['kernel_flops']:.3e}; bytes accessed {row['bytes_accessed_gib']:.1f} GiB; "
          f"temporaries {row['temp_gib']:.1f} GiB |||||",
          flush=True,
      )
  print(f"host: {os.cpu_count()} CPUs; jax {jax.__version__}", flush=True)
  if _JSON.value:
    with open(_JSON.value, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  app.run(main)
