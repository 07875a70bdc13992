"""Ahead-of-time compilation of the train step, the sampler and the likelihood scorer for a mesh.

Lowers a program from abstract arguments (nothing is allocated), compiles it for the target
devices (TPU topology devices from `llada_jax.parallel.topology`, fake CPU devices, or the
machine's own) and reads what the compiled program needs: per-device bytes from its memory
analysis, FLOPs from its cost analysis, and every cross-chip collective from its optimized HLO.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections

from llada_jax.config import BATCH_AXES, objective_of, pipeline_masks, validate
from llada_jax.errors import ConfigError, DoesNotFit
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.collectives import CollectiveSummary, summarize
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding, mesh_context
from llada_jax.parallel.topology import chip, hbm_per_device
from llada_jax.training.flops import forward_flops_per_token, model_flops_per_step
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.state import state_shardings

PROGRAMS = ("train", "sample", "score")
DEFAULT_PROMPT_LENGTH = 64  # prompt tokens per row unless given (fewer where the model is shorter)
# Custom calls whose FLOPs the compiler's cost analysis does not see (Pallas/Mosaic, cuDNN).
_OPAQUE_KERNELS = ('custom_call_target="tpu_custom_call"', 'custom_call_target="__cudnn')


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What one device needs to run one call of a compiled program.

  Bytes are per device. flops_per_device and bytes_accessed (memory traffic) are the compiler's
  counts, which count a loop body once (scanned layers: one layer) and leave out the work of
  `opaque_kernels` custom calls (Pallas splash attention, cuDNN); `loops` is the number of loops in
  the program (scanned layers, accumulation, sampling steps); model_flops is the analytic count
  of the whole call over all devices (llada_jax.training.flops), None where the number of forward
  passes is not fixed (threshold decoding). hbm_bytes is the memory of one device of that kind
  (None for CPUs and unknown chips).
  """

  program: str
  devices: int
  platform: str
  device_kind: str
  mesh: dict[str, int]
  parameters: int
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int
  code_bytes: int
  flops_per_device: float
  bytes_accessed: float
  model_flops: float | None
  compile_seconds: float
  collectives: CollectiveSummary
  opaque_kernels: int
  loops: int
  hbm_bytes: int | None

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries, less the outputs written into donated arguments."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes

  @property
  def model_flops_per_step(self) -> float | None:  # the name earlier versions reported
    return self.model_flops


def abstract_batch(
    config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding, sft: bool = False
) -> dict[str, jax.ShapeDtypeStruct]:
  """The feature batch the input pipeline delivers, as ShapeDtypeStructs."""
  b, length = config.data.batch_size, config.data.sequence_length

  def spec(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

  batch = {
      "targets": spec((b, length), jnp.int32),
      "segment_ids": spec((b, length), jnp.int32),
      "positions": spec((b, length), jnp.int32),
      "valid": spec((b, length), jnp.bool_),
  }
  if pipeline_masks(config):
    batch.update(
        inputs=spec((b, length), jnp.int32),
        masked=spec((b, length), jnp.bool_),
        p_mask=spec((b,), jnp.float32),
    )
  if sft:
    batch["prompt_length"] = spec((b,), jnp.int32)
  return batch


def compile_program(
    config: ml_collections.ConfigDict,
    devices: Sequence[jax.Device] | None = None,
    program: str = "train",
    num_items: int = 0,
    prompt_length: int = 0,
) -> CompileReport:
  """Compiles one program of `config` for `devices` (default: all) and reports its needs.

  Args:
    config: a full config; its mesh section lays out the devices.
    devices: target devices, e.g. `llada_jax.parallel.topology.tpu_devices("v5p:4x4x4")`.
    program: "train" (one optimizer step on data.batch_size sequences; with posttrain.method
      "dpo", a DPO step on data.batch_size pairs of data.sequence_length-token rows with the
      reference beside the state; "grpo", its update on data.batch_size rollouts of
      prompt_length + sampling.gen_length tokens, whose sampling is the "sample" program),
      "sample" (the compiled
      reverse process with config.sampling on num_items prompts of prompt_length tokens) or
      "score" (the Monte-Carlo likelihood, evaluation.mc_num samples in forward passes of
      evaluation.mc_batch_size, for num_items pairs of data.sequence_length tokens).
    num_items: prompts or pairs; 0 takes data.batch_size prompts, or enough pairs for a forward
      pass of data.batch_size rows, rounded up to a multiple of the data-parallel devices.
    prompt_length: prompt tokens per row (sampling, a GRPO update); 0 takes
      DEFAULT_PROMPT_LENGTH, or fewer when sampling (what model.max_sequence_length leaves after
      sampling.gen_length).

  Raises:
    ConfigError for a bad program name, a mesh the devices cannot hold, or items that do not split
    evenly over the data-parallel axes. DoesNotFit when the compiler itself runs out of device
    memory (the TPU compiler refuses programs larger than HBM).
  """
  validate(config)
  if program not in PROGRAMS:
    raise ConfigError(f"--what={program} is not allowed: expected one of {', '.join(PROGRAMS)}")
  devices = list(jax.devices() if devices is None else devices)
  mesh = make_mesh(config, devices)
  rules = axis_rules(config)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  abstract, shardings = state_shardings(config, model, tx, mesh)
  items_sharding = batch_sharding(mesh, rules)
  data_parallel = math.prod(mesh.shape[a] for a in BATCH_AXES)
  if program == "train" and config.posttrain.method == "grpo":
    from llada_jax.posttrain import grpo  # pylint: disable=g-import-not-at-top
    from llada_jax.training.step import make_train_step  # pylint: disable=g-import-not-at-top

    # The update on data.batch_size rollouts of prompt_length + sampling.gen_length tokens, the
    # reference beside the state; the rollouts themselves compile as --what=sample.
    width = prompt_length or DEFAULT_PROMPT_LENGTH
    step = make_train_step(
        config, model, tx, mesh, shardings, grpo.grpo_objective(config, width), shardings.params
    )
    batch = grpo.abstract_rollouts(config, width, items_sharding)
    fn, args = step, (abstract, batch, abstract.params)
    model_flops = model_flops_per_step(config, width)
  elif program == "train" and config.posttrain.method == "dpo":
    from llada_jax.posttrain import dpo  # pylint: disable=g-import-not-at-top
    from llada_jax.training.step import make_train_step  # pylint: disable=g-import-not-at-top

    # The reference beside the state, placed as the policy; rows data.sequence_length wide.
    step = make_train_step(
        config, model, tx, mesh, shardings, dpo.dpo_objective(config), shardings.params
    )
    batch = dpo.abstract_preference_batch(config, items_sharding)
    fn, args = step, (abstract, batch, abstract.params)
    model_flops = model_flops_per_step(config)
  elif program == "train":
    from llada_jax.training.step import make_train_step  # pylint: disable=g-import-not-at-top

    step = make_train_step(config, model, tx, mesh, shardings)
    fn, args = step, (abstract, abstract_batch(config, items_sharding))
    model_flops = model_flops_per_step(config)
  else:
    ev = config.evaluation
    if not num_items:  # a default: every data-parallel device gets as many items
      wanted = (
          config.data.batch_size
          if program == "sample"
          else max(1, config.data.batch_size // ev.mc_batch_size)
      )
      num_items = -(-wanted // data_parallel) * data_parallel
    if not prompt_length:
      prompt_length = DEFAULT_PROMPT_LENGTH
      if program == "sample":
        room = config.model.max_sequence_length - config.sampling.gen_length
        prompt_length = max(1, min(prompt_length, room))  # room < 1: validate names gen_length
    if num_items % data_parallel:
      raise ConfigError(
          f"--num_items={num_items} is not allowed: expected a multiple of "
          f"{' x '.join(f'mesh.{a}' for a in BATCH_AXES)} = {data_parallel} (items are split "
          "over them)"
      )
    fn, args, model_flops = (_sampler if program == "sample" else _scorer)(
        config, num_items, prompt_length, items_sharding
    )
    args = (abstract.params, *args)
  with mesh_context(mesh, rules):
    lowered = fn.lower(*args)
  start = time.perf_counter()
  try:
    compiled, hlo = _compile_with_hlo(lowered)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    reason = next(
        (line for line in str(e).splitlines() if "memory" in line.lower()), str(e).splitlines()[0]
    )
    raise DoesNotFit(
        f"the {program} program of this config DOES NOT FIT on "
        f"{len(devices)} x {devices[0].device_kind}: the compiler says "
        f"{reason.strip()}"
    ) from None
  seconds = time.perf_counter() - start
  memory = compiled.memory_analysis()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return CompileReport(
      program=program,
      devices=len(devices),
      platform=devices[0].platform,
      device_kind=devices[0].device_kind,
      mesh=dict(mesh.shape),
      parameters=sum(math.prod(p.shape) for p in jax.tree.leaves(abstract.params)),
      argument_bytes=memory.argument_size_in_bytes,
      output_bytes=memory.output_size_in_bytes,
      temp_bytes=memory.temp_size_in_bytes,
      alias_bytes=memory.alias_size_in_bytes,
      code_bytes=memory.generated_code_size_in_bytes,
      flops_per_device=float((cost or {}).get("flops", 0.0)),
      bytes_accessed=float((cost or {}).get("bytes accessed", 0.0)),
      model_flops=model_flops,
      compile_seconds=seconds,
      collectives=summarize(hlo),
      opaque_kernels=sum(hlo.count(k) for k in _OPAQUE_KERNELS),
      loops=hlo.count(" while("),
      hbm_bytes=hbm_per_device(devices) if chip(devices[0]) else None,
  )


def compile_train_step(
    config: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None
) -> CompileReport:
  """compile_program(config, devices, "train")."""
  return compile_program(config, devices, "train")


def _sampler(
    config: ml_collections.ConfigDict,
    num_items: int,
    prompt_length: int,
    sharding: jax.sharding.Sharding,
) -> tuple[Any, tuple[Any, ...], float]:
  """The jitted reverse process of config.sampling, its abstract arguments after the parameters,
  and its model FLOPs (every step a full forward pass; None for threshold decoding)."""
  from llada_jax.sampling.generate import SamplerSpec, compiled_sampler, sampler_scalars  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.options import SamplerOptions  # pylint: disable=g-import-not-at-top

  s = SamplerOptions.from_config(config).validate(config, prefix="sampling.")
  total = prompt_length + s.gen_length
  if total > config.model.max_sequence_length:
    raise ConfigError(
        f"--prompt_length={prompt_length} + sampling.gen_length={s.gen_length} is "
        f"not allowed: expected at most model.max_sequence_length="
        f"{config.model.max_sequence_length}"
    )
  spec = SamplerSpec.of(config, s)
  args = (
      jax.ShapeDtypeStruct((num_items, prompt_length), jnp.int32, sharding=sharding),
      jax.ShapeDtypeStruct((num_items, prompt_length), jnp.bool_, sharding=sharding),
      jax.ShapeDtypeStruct((num_items, 2), jnp.uint32, sharding=sharding),
      jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), sampler_scalars(s)),
  )
  flops = s.steps * num_items * total * forward_flops_per_token(config, total)
  return compiled_sampler(spec), args, flops


def _scorer(
    config: ml_collections.ConfigDict,
    num_items: int,
    prompt_length: int,
    sharding: jax.sharding.Sharding,
) -> tuple[Any, tuple[Any, ...], float]:
  """The jitted Monte-Carlo likelihood for pairs of data.sequence_length tokens, its abstract
  arguments after the parameters, and its model FLOPs (mc_num forward passes per pair)."""
  from llada_jax.diffusion.likelihood import compiled_scorer  # pylint: disable=g-import-not-at-top

  del prompt_length  # rows hold prompt ++ answer from index 0: one program for any split
  ev, width = config.evaluation, config.data.sequence_length
  fn = compiled_scorer(config, ev.mc_num, ev.mc_batch_size, False)

  def rows(dtype: Any) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((num_items, width), dtype, sharding=sharding)

  args = (
      rows(jnp.int32),
      rows(jnp.bool_),
      rows(jnp.bool_),
      jax.ShapeDtypeStruct((num_items, 2), jnp.uint32, sharding=sharding),
      jax.ShapeDtypeStruct((), jnp.float32),
  )
  streams = objective_of(config).streams  # the two-stream pass
  flops = streams * ev.mc_num * num_items * width * forward_flops_per_token(config, width)
  return fn, args, flops


def _compile_with_hlo(lowered: jax.stages.Lowered) -> tuple[jax.stages.Compiled, str]:
  """Compiles and returns the optimized HLO text. The compiler writes it to a scratch folder
  (`compiled.as_text()` cannot read some TPU programs back: libtpu's asynchronous instructions)."""
  with tempfile.TemporaryDirectory(prefix="llada_aot_") as folder:
    compiled = lowered.compile(
        compiler_options={
            "xla_dump_to": folder,
            "xla_dump_hlo_as_text": True,
            "xla_dump_hlo_pass_re": "NO_PASS",
        }
    )
    files = sorted(glob.glob(os.path.join(folder, "*after_optimizations.txt")))
    if files:
      with open(files[0], encoding="utf-8") as f:
        return compiled, f.read()
  return compiled, compiled.as_text()
