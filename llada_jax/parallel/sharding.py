"""Logical axis names -> NamedShardings, through the rules in config.mesh.axis_rules."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import ml_collections
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = tuple[tuple[str, Any], ...]


def axis_rules(config: ml_collections.ConfigDict) -> Rules:
  """The logical axis rules as tuples (configs loaded from JSON hold lists)."""
  return tuple((name, tuple(axes) if isinstance(axes, list) else axes)
               for name, axes in config.mesh.axis_rules)


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves carry logical names (nn.LogicallyPartitioned)."""
  return nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_tree), mesh, rules)


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of every input feature ([batch] or [batch, length]): batch over the data-parallel
  axes, the other dimensions replicated."""
  return NamedSharding(mesh, nn.logical_to_mesh_axes(("batch",), rules))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())
