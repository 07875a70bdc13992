"""Logical axis names -> NamedShardings, through the rules in config.mesh.axis_rules."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator

import flax.linen as nn
import jax
import ml_collections
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]


def axis_rules(config: ml_collections.ConfigDict) -> Rules:
  """The logical axis rules as tuples (configs loaded from JSON hold lists)."""
  return tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes)
      for name, axes in config.mesh.axis_rules
  )


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves carry logical names (nn.LogicallyPartitioned)."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, rules)


def abstract_on_mesh(boxed_abstract: Any, mesh: Mesh, rules: Rules) -> Any:
  """ShapeDtypeStructs carrying the NamedShardings that the logical names of `boxed_abstract` (an
  eval_shape result whose leaves are nn.LogicallyPartitioned) give on `mesh`."""
  shardings = logical_shardings(boxed_abstract, mesh, rules)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      nn.meta.unbox(boxed_abstract),
      shardings,
  )


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of every input feature ([batch] or [batch, length]): batch over the data-parallel
  axes the mesh has (a mesh built without some of them, such as one of the three axes before
  `expert`, splits over the others), the other dimensions replicated."""
  (axes,) = nn.logical_to_mesh_axes(("batch",), rules)
  axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
  present = tuple(a for a in axes if a in mesh.axis_names)
  return NamedSharding(mesh, PartitionSpec(present or None))


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Where a computation on `mesh` is traced and run: the mesh (`jax.set_mesh`, which kernels
  without a partitioning rule read to run per shard) and the logical axis rules."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def batch_rules(sharding: jax.sharding.Sharding | None, rules: Rules = ()) -> Rules:
  """`rules` for the mesh of `sharding`: "batch" and "activation_batch" mapped to the mesh axes
  that split its leading dimension (e.g. an evaluation mesh whose one axis splits the items), and
  every other name that maps to axes this mesh lacks left unsplit."""
  if not isinstance(sharding, NamedSharding) or not sharding.spec:
    return rules
  names = set(sharding.mesh.axis_names)

  def present(axes: Any) -> bool:
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return all(a in names for a in axes)

  batch = sharding.spec[0]
  return (("batch", batch), ("activation_batch", batch)) + tuple(
      (name, axes if present(axes) else None)
      for name, axes in rules
      if name not in ("batch", "activation_batch")
  )


def placement_context(
    sharding: jax.sharding.Sharding | None, rules: Rules = ()
) -> contextlib.AbstractContextManager[None]:
  """`mesh_context` for inputs placed with `sharding` (their leading axis is the batch, see
  `batch_rules`); no context for other placements (one device, or none given)."""
  if not isinstance(sharding, NamedSharding):
    return contextlib.nullcontext()
  return mesh_context(sharding.mesh, batch_rules(sharding, rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def warn_replicated(params: Any, shardings: Any, min_elements: int = 1 << 20) -> list[str]:
  """Logs (and returns) the parameters of at least `min_elements` that every device holds whole
  on a multi-device mesh: usually an axis rule that maps their logical names to nothing."""
  names = []
  for (path, leaf), sharding in zip(
      jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(shardings)
  ):
    if (
        math.prod(leaf.shape) >= min_elements
        and len(sharding.device_set) > 1
        and sharding.is_fully_replicated
    ):
      names.append(jax.tree_util.keystr(path))
  if names:
    logging.warning(
        "%d large parameters are replicated on every device (check mesh.axis_rules): %s",
        len(names),
        ", ".join(names[:8]),
    )
  return names
