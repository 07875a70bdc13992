"""Device mesh from the config's `mesh` section: axes data, fsdp, expert, tensor (one may be -1)."""

from __future__ import annotations

import math
from typing import Sequence

import jax
import ml_collections
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh

from llada_jax.config import BATCH_AXES, MESH_AXES
from llada_jax.errors import ConfigError

AXES = MESH_AXES


def mesh_shape(
    config: ml_collections.ConfigDict, num_devices: int, check_batch: bool = True
) -> tuple[int, ...]:
  """Resolves the -1 axis and checks that the axes multiply to the device count (and, with
  check_batch, that data.batch_size splits over the data-parallel axes: training)."""
  sizes = [config.mesh[a] for a in AXES]
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(
          f"mesh={dict(zip(AXES, sizes))} is not allowed: the fixed axes ({known}) "
          f"must divide the {num_devices} devices"
      )
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ConfigError(
        f"mesh={dict(zip(AXES, sizes))} is not allowed: the axes must multiply to "
        f"the {num_devices} devices"
    )
  data_parallel = math.prod(s for a, s in zip(AXES, sizes) if a in BATCH_AXES)
  accum = config.train.grad_accum_steps
  if check_batch and config.data.batch_size % (data_parallel * accum):
    raise ConfigError(
        f"data.batch_size={config.data.batch_size} is not allowed: expected a "
        f"multiple of {' x '.join(f'mesh.{a}' for a in BATCH_AXES)} = {data_parallel}"
        + (f" times train.grad_accum_steps={accum}" if accum > 1 else "")
        + " (every micro-batch splits evenly over the data-parallel devices)"
    )
  return tuple(sizes)


def check_divisibility(config: ml_collections.ConfigDict, shape: tuple[int, ...]) -> None:
  """Every model dimension must split evenly over the mesh axes its logical name maps to."""
  m = config.model
  dims = {
      "heads": ("model.n_heads", m.n_heads),
      "kv_heads": ("model.n_kv_heads", m.n_kv_heads),
      "mlp": ("model.mlp_hidden_size", m.mlp_hidden_size),
      "vocab": ("model.vocab_size", m.vocab_size),
      "embed": ("model.d_model", m.d_model),
      "layers": ("model.n_layers", m.n_layers),
      "exp": ("model.moe.num_experts", m.moe.num_experts),
  }
  sizes = dict(zip(AXES, shape))
  for name, axes in config.mesh.axis_rules:
    if name not in dims or axes is None:
      continue
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else (axes,)
    split = math.prod(sizes[a] for a in axes)
    field, value = dims[name]
    if value % split:
      raise ConfigError(
          f"{field}={value} is not allowed: logical axis {name!r} is sharded over "
          f"mesh axes {axes} of size {split}, which must divide it"
      )


def make_mesh(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    check_batch: bool = True,
) -> Mesh:
  """A Mesh over `devices` (default: all devices of all processes). check_batch=False for
  inference, whose batches are not config.data.batch_size.

  With mesh.dcn_* > 1 (several TPU slices) the slices are laid out along those axes by
  `create_hybrid_device_mesh`, so only the dcn_* axes cross the data-centre network.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(config, len(devices), check_batch)
  check_divisibility(config, shape)
  dcn = tuple(config.mesh[f"dcn_{a}"] for a in AXES)
  if math.prod(dcn) > 1:
    ici = tuple(s // d for s, d in zip(shape, dcn))
    if any(s % d for s, d in zip(shape, dcn)):
      raise ConfigError(f"mesh.dcn_*={dcn} is not allowed: each must divide its axis size {shape}")
    return Mesh(
        mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True),
        AXES,
    )
  if devices[0].platform == "cpu":
    return Mesh(np.asarray(devices).reshape(shape), AXES)
  # A mesh axis may span part of a physical one (fsdp 2 x expert 8 on a 4x4 torus); JAX splits
  # physical axes only where no whole ones fit.
  return Mesh(mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True), AXES)
