"""The real TPU compiler (libtpu) on this host: what crosses chips in the compiled programs.

Every program is compiled for a v5e:2x2 slice (4 chips, seconds to compile) on a data x fsdp mesh.
Parameters are expected to cross chips (FSDP gathers them, gradients are reduced); activations are
not: a collective whose result has a dimension of the global batch (or of the batch on one fsdp or
data group) or of the sequence length means a kernel gathered its operands (a Pallas call outside
shard_map does). The tiny model's parameter dimensions are 4, 32, 128, 260 and 384 (its MoE
form adds 8, 16 and 64), so none of those sizes (48, 24, and the sequence length 512, or 256 for
the MoE train step) can be a parameter's.
"""

import jax
import pytest

from configs import tiny
from conftest import tpu_compiler_flags
from llada_jax.aot import compile_program
from llada_jax.parallel.collectives import summarize, with_dimension

pytest.importorskip("libtpu", reason="the TPU compiler (pip install 'llada_jax[tpu-aot]')")

BATCH, LENGTH = 48, 512
ACTIVATION_SIZES = (BATCH, BATCH // 2, LENGTH)
# The MoE train step's sequence length: its compile time goes with it (35 s at 512, 19 s at 256
# on the 2-core host), and what it checks (all-to-alls, no gathered activation) does not.
MOE_LENGTH = 256


@pytest.fixture(scope="module")
def devices():
  from llada_jax.parallel.topology import tpu_devices  # pylint: disable=g-import-not-at-top

  with tpu_compiler_flags():
    yield tpu_devices("v5e:2x2")


def _config(attention: str):
  c = tiny.get_config()
  c.model.update(
      dict(attention=attention, dtype="bfloat16", max_sequence_length=LENGTH, n_layers=2)
  )
  c.data.update(dict(sequence_length=LENGTH, batch_size=BATCH))
  c.mesh.update(dict(data=2, fsdp=2, tensor=1))
  c.sampling.update(dict(gen_length=64, steps=8, block_length=32))  # 64 + 64 prompt = 128
  c.evaluation.update(dict(mc_num=4, mc_batch_size=2))
  return c


def _moe(config):
  """The tiny model as a MoE (a dense first layer, 8 experts in 4 groups, a shared expert,
  QK-norm, partial rotary) with its experts split over `expert`: fsdp 2 x expert 2."""
  config.model.update(dict(qk_norm=True, rotary_dim=16))
  config.model.moe.update(
      dict(
          num_experts=8,
          experts_per_token=2,
          expert_hidden_size=64,
          num_shared_experts=1,
          first_k_dense_replace=1,
          n_group=4,
          topk_group=2,
          bias_update_rate=1e-3,
      )
  )
  config.mesh.update(dict(data=1, fsdp=2, expert=2, tensor=1))
  return config


@pytest.mark.parametrize("program", ["train", "sample", "score"])
def test_splash_attention_gathers_no_activation(devices, program):
  """Splash attention per shard in every program; the train step is a MoE model's with expert
  parallelism (one compile for both claims): its tokens cross chips by all-to-all, its parameters
  by FSDP's collectives, and no activation is gathered (each chip sorts its own tokens)."""
  config = _config("splash")
  sizes = ACTIVATION_SIZES
  if program == "train":
    config = _moe(config)
    config.model.max_sequence_length = config.data.sequence_length = MOE_LENGTH
    sizes = (BATCH, BATCH // 2, MOE_LENGTH)
  report = compile_program(config, devices, program, num_items=BATCH, prompt_length=64)
  gathered = with_dimension(report.collectives.collectives, sizes)
  assert not gathered, [(c.kind, c.shapes, c.source) for c in gathered[:3]]
  assert report.opaque_kernels > 0  # the compiled Mosaic kernel, not the interpreted one
  if program == "train":  # the check sees collectives at all: FSDP's parameter traffic
    kinds = report.collectives.by_kind()
    assert kinds["all-gather"][0] + kinds["all-reduce"][0] + kinds["reduce-scatter"][0] > 2
    assert kinds["all-to-all"][0] >= 4, kinds  # there and back, forward and backward
  assert report.platform == "tpu" and report.hbm_bytes == 16 << 30


# Slow (50 s): test_block.py checks the two-stream block-causal pattern through splash against XLA
# (values and gradients), and the splash train compile above checks what crosses chips.
@pytest.mark.slow
def test_block_diffusion_training_runs_its_block_causal_mask_in_splash(devices):
  """The two-stream pass (2 x 512 positions) with the block-causal pattern as a splash mask the
  Mosaic kernel computes: compiled for TPU, no activation gathered."""
  config = _config("splash")
  config.diffusion.update(dict(objective="block", block_size=16))
  report = compile_program(config, devices, "train", num_items=BATCH)
  gathered = with_dimension(report.collectives.collectives, ACTIVATION_SIZES + (2 * LENGTH,))
  assert not gathered, [(c.kind, c.shapes, c.source) for c in gathered[:3]]
  assert report.opaque_kernels > 0


def test_collectives_are_counted_per_loop_trip():
  """A gather inside a 7-trip loop body runs 7 times; one outside runs once (HLO by hand)."""
  hlo = """HloModule m

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ag = f32[32]{0} all-gather(%x), channel_id=1, dimensions={0}, metadata={op_name="inner"}
  ROOT %t = (s32[], f32[8]) tuple(%i, %y)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]) parameter(0)
  %c = s32[] constant(7)
  %g = s32[] get-tuple-element(%p), index=0
  ROOT %lt = pred[] compare(%g, %c), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body
  %ar = (bf16[4,4]{1,0}, f32[2]{0}) all-reduce-start(%a, %b), to_apply=%add
  ROOT %rs = f32[2]{0} reduce-scatter(%z), dimensions={0}, metadata={op_name="outer"}
}
"""
  summary = summarize(hlo)
  assert summary.by_kind()["all-gather"] == (1, 7, 7 * 32 * 4)
  assert summary.by_kind()["all-reduce"] == (1, 1, 4 * 4 * 2 + 2 * 4)
  assert summary.by_kind()["reduce-scatter"] == (1, 1, 8)
  assert summary.unknown_trip_counts == 0
  assert [c.source for c in with_dimension(summary.collectives, [32])] == ["inner"]


def test_a_missing_topology_name_is_a_one_line_error():
  from llada_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.topology import tpu_devices  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match="--topology=v9z:1x1 is not allowed"):
    tpu_devices("v9z:1x1")


def test_auto_resolves_by_the_compile_target_not_the_host(devices):
  """On this CPU host `auto` must still pick splash when compiling for TPU devices."""
  from llada_jax.model.attention import resolve  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top

  assert jax.default_backend() == "cpu"
  with jax.set_mesh(make_mesh(_config("auto"), devices)):
    assert resolve("auto", "bfloat16", lengths=(512, 512)) == "splash"
  assert resolve("auto", "bfloat16", lengths=(512, 512)) == "xla"


def test_a_mesh_axis_may_span_part_of_a_physical_axis():
  """fsdp 2 x expert 8 on a v6e 4x4 torus: no mesh axis of 8 is a product of whole physical
  axes (4, 4), so the mesh splits one; every chip appears once."""
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.topology import tpu_devices  # pylint: disable=g-import-not-at-top

  config = _config("xla")
  config.data.batch_size = 16
  config.mesh.update(dict(data=1, fsdp=2, expert=8, tensor=1))
  with tpu_compiler_flags():
    chips = tpu_devices("v6e:4x4")
  mesh = make_mesh(config, chips)
  assert dict(mesh.shape) == dict(data=1, fsdp=2, expert=8, tensor=1)
  assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in chips)
