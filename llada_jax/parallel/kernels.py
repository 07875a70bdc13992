"""Kernels without a partitioning rule, run on each device's shard of the mesh being traced.

XLA cannot split a custom call such as a Pallas kernel: an operand sharded over the mesh is
gathered whole onto every chip before the call, and every chip then computes the whole batch (seen
on the TPU compiler as all-gathers, or all-reduces of zero-padded buffers, of `[global batch, ...]`
activations). `shard_map_logical` runs such a kernel inside `jax.shard_map` instead, each operand
split as the logical axis rules in force say (MaxText wraps splash attention the same way), so no
activation crosses chips.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.sharding import AbstractMesh, PartitionSpec

# Logical names of one array's dimensions (None: not split).
Names = tuple[str | None, ...]


def trace_mesh() -> AbstractMesh | None:
  """The mesh set by `jax.set_mesh` around the current trace, or None outside one."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def target_platform() -> str:
  """The platform the current trace compiles for: that of the devices of `trace_mesh()` (so an
  ahead-of-time compile for TPU devices on a CPU host says "tpu"), else JAX's default backend."""
  mesh = trace_mesh()
  device = None if mesh is None else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def logical_spec(shape: Sequence[int], names: Names, mesh: AbstractMesh) -> PartitionSpec:
  """The PartitionSpec the logical axis rules in force give `names`, keeping for each dimension
  only a split that divides it evenly (otherwise that dimension stays whole on every device)."""
  spec = nn.logical_to_mesh_axes(names)
  out = []
  for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or size % math.prod(mesh.shape[a] for a in axes):
      out.append(None)
    else:
      out.append(axes[0] if len(axes) == 1 else axes)
  return PartitionSpec(*out)


def shard_map_logical(
    fn: Callable[..., jax.Array],
    args: Sequence[jax.Array | None],
    arg_names: Sequence[Names],
    out_names: Names,
    out_shape: Sequence[int],
) -> jax.Array:
  """fn(*args) computed shard by shard over the trace's mesh.

  Args:
    fn: a per-shard computation; it sees each argument's local block and returns the local block
      of an output of global shape `out_shape`. None arguments are passed through as None.
    args: the operands; arg_names[i] gives the logical names of args[i]'s dimensions.
    out_names: logical names of the output's dimensions.
    out_shape: the output's global shape.

  Outside a mesh, or on a one-device mesh, this is fn(*args).
  """
  mesh = trace_mesh()
  if mesh is None or mesh.size == 1:
    return fn(*args)
  present = [i for i, a in enumerate(args) if a is not None]
  in_specs = tuple(logical_spec(args[i].shape, arg_names[i], mesh) for i in present)

  def local(*arrays: jax.Array) -> Any:
    full: list[jax.Array | None] = [None] * len(args)
    for i, a in zip(present, arrays):
      full[i] = a
    return fn(*full)

  return jax.shard_map(
      local,
      mesh=mesh,
      in_specs=in_specs,
      out_specs=logical_spec(out_shape, out_names, mesh),
      check_vma=False,
  )(*(args[i] for i in present))
