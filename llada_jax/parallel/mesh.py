"""Device mesh from the config's `mesh` section: axes (data, fsdp, tensor), one may be -1."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh

from llada_jax.errors import ConfigError

AXES = ("data", "fsdp", "tensor")


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
  """Resolves the -1 axis and checks that the axes multiply to the device count."""
  sizes = [config.mesh[a] for a in AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh={dict(zip(AXES, sizes))} is not allowed: the fixed axes ({known}) "
                        f"must divide the {num_devices} devices")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh={dict(zip(AXES, sizes))} is not allowed: the axes must multiply to "
                      f"the {num_devices} devices")
  data_parallel = sizes[0] * sizes[1]
  if config.data.batch_size % data_parallel:
    raise ConfigError(f"data.batch_size={config.data.batch_size} is not allowed: expected a "
                      f"multiple of mesh.data x mesh.fsdp = {data_parallel}")
  return tuple(sizes)


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A Mesh over `devices` (default: all devices of all processes)."""
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)
