"""Scale-out: the same steps on several meshes, two processes, restore onto another mesh."""

import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import make_tiny_config
from llada_jax.diffusion.objectives import unpacked_batch
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding
from llada_jax import checkpoint
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.state import create_train_state, state_shardings
from llada_jax.training.step import make_train_step

ROOT = pathlib.Path(__file__).parent.parent
MESHES = {"one_device": None, "data8": (8, 1, 1), "fsdp8": (1, 8, 1), "2x2x2": (2, 2, 2)}


def _config(mesh):
  config = make_tiny_config()
  if mesh is not None:
    config.mesh.update(dict(zip(("data", "fsdp", "tensor"), mesh)))
  return config


def _steps(config, devices, batches, state=None):
  mesh = make_mesh(config, devices)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  if state is None:
    state, shardings = create_train_state(config, model, tx, mesh)
  else:
    _, shardings = state_shardings(config, model, tx, mesh)
    state = jax.device_put(state, shardings)
  step = make_train_step(config, model, tx, mesh, shardings)
  sharding = batch_sharding(mesh, axis_rules(config))
  losses = []
  for tokens in batches:
    state, metrics = step(state, jax.device_put(unpacked_batch(tokens), sharding))
    losses.append(float(metrics["loss"]))
  return state, losses


def _batches(config, n, seed=0):
  shape = (config.data.batch_size, config.data.sequence_length)
  return [jax.random.randint(jax.random.PRNGKey(seed + i), shape, 3, 200) for i in range(n)]


@pytest.fixture(scope="module")
def reference():
  config = _config(None)
  return _steps(config, jax.devices()[:1], _batches(config, 3))


@pytest.mark.parametrize("name", ["data8", "fsdp8", "2x2x2"])
def test_three_steps_agree_on_every_mesh(reference, name):
  config = _config(MESHES[name])
  state, losses = _steps(config, jax.devices(), _batches(config, 3))
  np.testing.assert_allclose(losses, reference[1], rtol=2e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      jax.device_get(state.params),
      jax.device_get(reference[0].params),
  )


class _SliceDevice:
  """A fake CPU device that says which TPU slice it is on (CPU devices have no slice_index)."""

  def __init__(self, device, slice_index):
    self.device, self.slice_index = device, slice_index

  def __getattr__(self, name):
    return getattr(self.device, name)


def test_a_two_slice_mesh_crosses_slices_only_on_its_dcn_axis_and_trains_as_one_device(
    reference, monkeypatch
):
  """mesh.dcn_* lays two slices (here: the even and the odd CPU devices, as jax's own
  create_hybrid_device_mesh groups devices by slice_index) along the dcn axis only: with
  dcn_data=2 each data row is one slice, with dcn_fsdp=2 each half of the fsdp axis; three
  steps on the data 2 x fsdp 4 two-slice mesh equal the single-device steps."""
  from jax.experimental import mesh_utils  # pylint: disable=g-import-not-at-top

  hybrid = mesh_utils.create_hybrid_device_mesh

  def with_slices(ici, dcn, devices, **kwargs):
    grid = hybrid(ici, dcn, [_SliceDevice(d, d.id % 2) for d in devices], **kwargs)
    return np.vectorize(lambda d: d.device, otypes=[object])(grid)

  monkeypatch.setattr(mesh_utils, "create_hybrid_device_mesh", with_slices)
  ids = lambda mesh: np.vectorize(lambda d: d.id)(mesh.devices)
  config = _config((1, 8, 1))
  config.mesh.dcn_fsdp = 2
  np.testing.assert_array_equal(
      ids(make_mesh(config, jax.devices())),
      [[[[0]], [[2]], [[4]], [[6]], [[1]], [[3]], [[5]], [[7]]]],
  )
  config = _config((2, 4, 1))
  config.mesh.dcn_data = 2
  mesh = make_mesh(config, jax.devices())
  np.testing.assert_array_equal(
      ids(mesh), [[[[0]], [[2]], [[4]], [[6]]], [[[1]], [[3]], [[5]], [[7]]]]
  )
  state, losses = _steps(config, jax.devices(), _batches(config, 3))
  assert state.params["wte"]["embedding"].sharding.mesh.devices.tolist() == mesh.devices.tolist()
  np.testing.assert_allclose(losses, reference[1], rtol=2e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      jax.device_get(state.params),
      jax.device_get(reference[0].params),
  )


def test_train_state_is_split_as_the_logical_axis_rules_say():
  """On a data 2 x fsdp 2 x tensor 2 mesh every parameter and both Adam moments carry the
  PartitionSpec the default axis rules give their logical names (embed -> fsdp; vocab, heads,
  kv_heads, mlp -> tensor; layers, kv, norm unsplit), and each device holds a shard of the shape
  written out here by hand; the shards tile the array, each block held by the same number of
  devices. The batch is split over data x fsdp."""
  config = _config((2, 2, 2))
  mesh = make_mesh(config, jax.devices())
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, _ = create_train_state(config, model, tx, mesh)
  fsdp_tensor = (P(None, "fsdp", "tensor", None), (2, 32, 2, 16))  # layers, embed, heads, kv
  kv_proj = (P(None, "fsdp", "tensor", None), (2, 32, 1, 16))  # layers, embed, kv_heads, kv
  mlp_in, norm = (P(None, "fsdp", "tensor"), (2, 32, 64)), (P(None, None), (2, 64))
  expected = {
      "['blocks']['q_proj']['kernel']": fsdp_tensor,
      "['blocks']['k_proj']['kernel']": kv_proj,
      "['blocks']['v_proj']['kernel']": kv_proj,
      "['blocks']['attn_out']['kernel']": (P(None, "tensor", None, "fsdp"), (2, 2, 16, 32)),
      "['blocks']['ff_proj']['kernel']": mlp_in,
      "['blocks']['up_proj']['kernel']": mlp_in,
      "['blocks']['ff_out']['kernel']": (P(None, "tensor", "fsdp"), (2, 64, 32)),
      "['blocks']['attn_norm']['weight']": norm,
      "['blocks']['ff_norm']['weight']": norm,
      "['ln_f']['weight']": (P(None), (64,)),
      "['wte']['embedding']": (P("tensor", "fsdp"), (130, 32)),
      "['ff_out']['kernel']": (P("fsdp", "tensor"), (32, 130)),
  }
  adam = state.opt_state[1][0]  # clip, then AdamW's (ScaleByAdamState, mask, schedule)
  for tree in (state.params, adam.mu, adam.nu):
    got = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
      shards = leaf.addressable_shards
      blocks = [tuple((i.start, i.stop) for i in shard.index) for shard in shards]
      shape = {shard.data.shape for shard in shards}
      assert len(shards) == 8 and len(shape) == 1
      assert len(set(blocks)) * np.prod(next(iter(shape))) == leaf.size
      assert all(blocks.count(b) == 8 // len(set(blocks)) for b in blocks)
      got[jax.tree_util.keystr(path)] = (leaf.sharding.spec, next(iter(shape)))
    assert got == expected
  batch = jax.device_put(np.zeros((8, 32), np.int32), batch_sharding(mesh, axis_rules(config)))
  assert batch.sharding.spec == P(("data", "fsdp", "expert"))
  assert {shard.data.shape for shard in batch.addressable_shards} == {(2, 32)}


def test_save_on_one_mesh_restore_on_another_and_continue_identically(tmp_path, reference):
  source = _config((8, 1, 1))
  batches = _batches(source, 3)
  state, _ = _steps(source, jax.devices(), batches[:2])
  saver = checkpoint.Checkpointer(tmp_path, source)
  saver.save(2, state, force=True)
  saver.wait()
  saver.close()
  target = _config((1, 4, 2))
  model, tx = MaskedDiffusionLM(target), make_optimizer(target)
  abstract, _ = state_shardings(target, model, tx, make_mesh(target, jax.devices()))
  restored = checkpoint.load_state(tmp_path, 2, abstract)
  assert (
      restored.params["wte"]["embedding"].sharding.spec
      == abstract.params["wte"]["embedding"].sharding.spec
  )
  continued, losses = _steps(target, jax.devices(), batches[2:], state=restored)
  straight, straight_losses = _steps(source, jax.devices(), batches[2:], state=state)
  np.testing.assert_allclose(losses, straight_losses, rtol=2e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      jax.device_get(continued.params),
      jax.device_get(straight.params),
  )


def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
  """launch/local.sh runs `llada-train` as 2 processes x 4 CPU devices (gloo); the checkpoint
  equals the one a single process with 8 devices writes for the same config."""
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  micro = ROOT / "tests" / "configs" / "micro.py"
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  result = subprocess.run(
      [
          str(ROOT / "launch" / "local.sh"),
          "2",
          "4",
          "--",
          sys.executable,
          "-m",
          "llada_jax.train",
          f"--config={micro}",
          "--config.data.num_shards=2",
          f"--workdir={tmp_path / 'multi'}",
      ],
      capture_output=True,
      text=True,
      timeout=600,
      env=env,
      cwd=ROOT,
      check=False,
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  assert "[0] " in result.stdout and "[1] " in result.stdout

  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("micro", micro)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.num_shards = 2  # the data the two processes read: S fixed, any process count
  train(config, tmp_path / "single")
  step = config.train.num_steps
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  abstract, _ = state_shardings(config, model, tx, make_mesh(config, jax.devices()[:1]))
  multi = checkpoint.load_params(tmp_path / "multi", step, abstract.params)
  single = checkpoint.load_params(tmp_path / "single", step, abstract.params)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
      jax.device_get(multi),
      jax.device_get(single),
  )


def test_aot_compile_reports_per_device_state_bytes(monkeypatch):
  """The report's bytes are the compiled program's own memory analysis, and its arguments are
  the per-device state counted here by hand: float32 parameters, Adam's mu and nu, each split 8
  ways over fsdp along the embedding axis except the RMSNorm weights (replicated), plus the
  device's share of the batch."""
  from llada_jax import aot  # pylint: disable=g-import-not-at-top

  compiled = []

  def keep(lowered):
    out = real_compile(lowered)
    compiled.append(out[0])
    return out

  real_compile = aot._compile_with_hlo  # pylint: disable=protected-access
  monkeypatch.setattr(aot, "_compile_with_hlo", keep)
  config = _config((1, 8, 1))
  report = aot.compile_train_step(config, jax.devices())
  m = config.model
  d, h, k, f, v, layers = (
      m.d_model,
      m.n_heads,
      m.n_kv_heads,
      m.mlp_hidden_size,
      m.vocab_size,
      m.n_layers,
  )
  hd = d // h
  split = 2 * v * d + layers * (2 * d * h * hd + 2 * d * k * hd + 3 * d * f)  # embed over fsdp
  replicated = d + 2 * layers * d  # ln_f, attn_norm, ff_norm
  assert report.parameters == split + replicated
  state_bytes = 3 * 4 * (split // 8 + replicated)  # per device: params, mu, nu
  b, length = config.data.batch_size // 8, config.data.sequence_length
  # targets, segment_ids, positions, inputs (int32), valid, masked (bool); p_mask per row
  batch_bytes = 18 * b * length + 4 * b
  assert report.mesh == {"data": 1, "fsdp": 8, "expert": 1, "tensor": 1}
  assert 0 <= report.argument_bytes - state_bytes - batch_bytes < 256  # + a few scalars
  assert report.alias_bytes >= state_bytes  # the donated state is updated in place
  memory = compiled[-1].memory_analysis()
  assert (
      report.argument_bytes,
      report.output_bytes,
      report.temp_bytes,
      report.alias_bytes,
      report.code_bytes,
  ) == (
      memory.argument_size_in_bytes,
      memory.output_size_in_bytes,
      memory.temp_size_in_bytes,
      memory.alias_size_in_bytes,
      memory.generated_code_size_in_bytes,
  )
  assert report.peak_bytes == (
      memory.argument_size_in_bytes
      + memory.output_size_in_bytes
      + memory.temp_size_in_bytes
      - memory.alias_size_in_bytes
  )
  assert report.temp_bytes > 0 and report.output_bytes >= state_bytes
  cost = compiled[-1].cost_analysis()
  assert report.flops_per_device == (cost[0] if isinstance(cost, list) else cost)["flops"] > 0
  # Model FLOPs by hand (docs/llada.md): 6 N_matmul + 12 n_layers S d per token, N_matmul every
  # weight but the embedding lookup, over the global batch's tokens.
  tokens = config.data.batch_size * length
  per_token = 6 * (split - v * d) + 12 * layers * length * d
  assert report.model_flops_per_step == per_token * tokens


def test_compile_command_line_on_fake_devices():
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.compile",
          f"--config={ROOT / 'tests/configs/micro.py'}",
          "--num_devices=4",
          "--config.mesh.fsdp=4",
          "--config.mesh.data=1",
          "--hbm_gib=1",
      ],
      capture_output=True,
      text=True,
      timeout=300,
      cwd=ROOT,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "compiled the train program for 4 cpu devices" in result.stdout
  assert "fits in 1 GiB per device" in result.stdout


@pytest.mark.parametrize(
    "overrides, needle",
    [
        ({"mesh.data": 3}, "the axes must multiply to the 8 devices"),
        ({"mesh.data": 8, "data.batch_size": 12}, "data.batch_size=12 is not allowed"),
        ({"mesh.data": 2, "mesh.tensor": 4}, "model.n_kv_heads=2 is not allowed"),
        ({"mesh.data": 1, "mesh.tensor": 8}, "model.vocab_size=260 is not allowed"),
        ({"mesh.dcn_data": 3}, "mesh.dcn_"),
    ],
)
def test_bad_meshes_fail_before_compiling(overrides, needle):
  config = make_tiny_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  with pytest.raises(ValueError, match=needle):
    make_mesh(config, jax.devices())


def test_unknown_logical_axis_name_is_named():
  from llada_jax.config import validate  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.mesh.axis_rules = tuple(config.mesh.axis_rules) + (("head", "tensor"),)
  with pytest.raises(ValueError, match="mesh.axis_rules='head' is not allowed"):
    validate(config)
  config.mesh.axis_rules = (("heads", "model"),)
  with pytest.raises(ValueError, match="'model' is not allowed"):
    validate(config)


def test_large_replicated_parameters_are_reported():
  from llada_jax.parallel.sharding import warn_replicated  # pylint: disable=g-import-not-at-top

  config = _config((8, 1, 1))  # pure data parallelism: every parameter is replicated
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  abstract, shardings = state_shardings(config, model, tx, make_mesh(config, jax.devices()))
  names = warn_replicated(abstract.params, shardings.params, min_elements=8_000)
  assert any("wte" in n for n in names)
  config = _config((1, 8, 1))
  abstract, shardings = state_shardings(config, model, tx, make_mesh(config, jax.devices()))
  assert not warn_replicated(abstract.params, shardings.params, min_elements=8_000)


def test_a_run_trained_on_any_mesh_is_served_replicated_on_the_devices_at_hand():
  """Sampling, merging and init_from read a checkpoint of a pod mesh (expert parallelism, two
  slices) on whatever devices this host has: every mesh axis but data is reset to 1."""
  from llada_jax.loading import serving_abstract_params  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.mesh.update(dict(expert=8, dcn_data=2, tensor=2))  # 32 devices: more than this host's
  abstract = serving_abstract_params(config)
  for leaf in jax.tree.leaves(abstract):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
