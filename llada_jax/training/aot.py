"""Ahead-of-time compilation of the train step for a target mesh, without running it.

Lowers the step from abstract arguments (no parameter is allocated) and reads the compiled
program's memory analysis and cost analysis: what one device must hold, and its FLOPs per step.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections

from llada_jax.config import validate
from llada_jax.model import ModelConfig, Transformer
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding
from llada_jax.training.flops import model_flops_per_step
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.state import state_shardings
from llada_jax.training.step import make_train_step


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """Per-device bytes and FLOPs of one compiled train step."""
  devices: int
  platform: str
  mesh: dict[str, int]
  parameters: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  flops_per_device: float
  model_flops_per_step: float
  compile_seconds: float

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries, less the outputs written into donated arguments."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def abstract_batch(config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding,
                   sft: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
  """The feature batch the input pipeline delivers, as ShapeDtypeStructs."""
  b, length = config.data.batch_size, config.data.sequence_length
  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
  batch = {"targets": spec((b, length), jnp.int32), "segment_ids": spec((b, length), jnp.int32),
           "positions": spec((b, length), jnp.int32), "valid": spec((b, length), jnp.bool_)}
  if config.data.masking == "pipeline" and config.diffusion.objective == "mdm":
    batch.update(inputs=spec((b, length), jnp.int32), masked=spec((b, length), jnp.bool_),
                 p_mask=spec((b,), jnp.float32))
  if sft:
    batch["prompt_length"] = spec((b,), jnp.int32)
  return batch


def compile_train_step(config: ml_collections.ConfigDict,
                       devices: Sequence[jax.Device] | None = None) -> CompileReport:
  """Compiles the train step of `config` for `devices` (default: all) and reports its needs."""
  validate(config)
  devices = list(jax.devices() if devices is None else devices)
  mesh = make_mesh(config, devices)
  model, tx = Transformer(ModelConfig.from_config(config)), make_optimizer(config)
  abstract, shardings = state_shardings(config, model, tx, mesh)
  step = make_train_step(config, model, tx, mesh, shardings)
  batch = abstract_batch(config, batch_sharding(mesh, axis_rules(config)))
  start = time.perf_counter()
  compiled = step.lower(abstract, batch).compile()
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  parameters = sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params))
  return CompileReport(
      devices=len(devices), platform=devices[0].platform, mesh=dict(mesh.shape),
      parameters=parameters, argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes, code_bytes=memory.generated_code_size_in_bytes,
      flops_per_device=float(cost.get("flops", 0.0)),
      model_flops_per_step=model_flops_per_step(config), compile_seconds=seconds)
