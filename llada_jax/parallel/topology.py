"""Accelerator chips (peak FLOP/s, memory) and TPU topologies to compile for without the hardware.

`tpu_devices("v5p:4x4x4")` returns the devices of a TPU slice (or of several slices over the
data-centre network) from libtpu's compiler alone: `jit(...).lower(...).compile()` on them runs the
real TPU compiler on any host, as MaxText's train_compile.py does. Nothing is allocated.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from typing import Sequence

import jax

from llada_jax.errors import ConfigError

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator kind: `jax.Device.device_kind` starts with `kind`. peak_flops: dense bf16
  FLOP/s of the chip; hbm_bytes: its memory (the vendor's figure)."""

  kind: str
  peak_flops: float
  hbm_bytes: int


# First match wins, so longer names come before their prefixes ("TPU v5 lite" before "TPU v5").
CHIPS = (
    Chip("NVIDIA H100", 989e12, 80 * GIB),  # SXM; the PCIe card is lower (756e12)
    Chip("NVIDIA H200", 989e12, 141 * 10**9),
    Chip("NVIDIA B200", 2250e12, 192 * 10**9),
    Chip("NVIDIA A100", 312e12, 80 * GIB),  # the 40 GB card exists too: check device_kind
    Chip("TPU v6 lite", 918e12, 32 * GIB),  # v6e (Trillium)
    Chip("TPU v5 lite", 197e12, 16 * GIB),  # v5e
    Chip("TPU v5", 459e12, 95 * GIB),  # v5p
    Chip("TPU v4", 275e12, 32 * GIB),
)


def chip(device: jax.Device) -> Chip | None:
  """The Chip of a device, or None for kinds not in CHIPS (e.g. CPUs)."""
  return next((c for c in CHIPS if device.device_kind.startswith(c.kind)), None)


def devices_per_chip(devices: Sequence[jax.Device]) -> int:
  """How many JAX devices share one chip (2 for a v4 chip compiled without megacore, else 1)."""
  if not devices or not hasattr(devices[0], "coords"):
    return 1
  chips = collections.Counter((getattr(d, "slice_index", 0), tuple(d.coords)) for d in devices)
  return max(chips.values())


def hbm_per_device(devices: Sequence[jax.Device]) -> int | None:
  """Memory one device may use: its chip's HBM over the devices that share the chip."""
  found = chip(devices[0]) if devices else None
  return None if found is None else found.hbm_bytes // devices_per_chip(devices)


def tpu_devices(topology: str, num_slices: int = 1) -> list[jax.Device]:
  """The devices of `num_slices` TPU slices of `topology` (e.g. "v5e:4x4", "v5p:4x4x4", "v6e:8x8",
  "v4:2x2x2"), for ahead-of-time compilation on a host without TPUs.

  Raises ConfigError when libtpu is missing or the name is not a topology libtpu knows.
  """
  if num_slices < 1:
    raise ConfigError(f"--num_slices={num_slices} is not allowed: expected a positive count")
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    raise ConfigError(
        f"--topology={topology} needs the TPU compiler (libtpu), which is not "
        "installed: pip install 'llada_jax[tpu-aot]' (or pip install libtpu)"
    ) from None
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no metadata server off Cloud TPU VMs
  # Compiling touches no chip: let several processes (parallel tests, two commands) load libtpu.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    description = topologies.get_topology_desc(
        topology_name=topology, platform="tpu", num_slices=num_slices
    )
  except Exception as e:  # pylint: disable=broad-except  (libtpu raises a bare RuntimeError)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(
        f"--topology={topology} is not allowed: libtpu says {first!r}; expected "
        "a name such as v4:2x2x2, v5e:4x4, v5p:4x4x4 or v6e:8x8"
    ) from None
  return list(description.devices)
