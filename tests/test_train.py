"""Train step on one device and on an 8-device mesh, learning, and checkpoint round trips."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config, preempted_at
from llada_jax.diffusion.objectives import unpacked_batch
from llada_jax.errors import CheckpointError
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding
from llada_jax import checkpoint
from llada_jax.training.optimizer import learning_rate_schedule, make_optimizer
from llada_jax.training.state import create_train_state, state_shardings
from llada_jax.training.step import make_train_step


def _run(config, devices, tokens, steps):
  mesh = make_mesh(config, devices)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, shardings = create_train_state(config, model, tx, mesh)
  step = make_train_step(config, model, tx, mesh, shardings)
  batch = jax.device_put(unpacked_batch(tokens), batch_sharding(mesh, axis_rules(config)))
  losses = []
  for _ in range(steps):
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, shardings


def _tokens(config, seed=0):
  shape = (config.data.batch_size, config.data.sequence_length)
  return jax.random.randint(jax.random.PRNGKey(seed), shape, 3, 40)


@pytest.mark.slow  # test_scale.py's test_three_steps_agree_on_every_mesh covers it in make test
def test_one_device_and_eight_device_mesh_agree():
  config = make_tiny_config()
  tokens = _tokens(config)
  single, single_losses, _ = _run(config, jax.devices()[:1], tokens, steps=2)
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  sharded, sharded_losses, shardings = _run(config, jax.devices()[:8], tokens, steps=2)
  assert shardings.params["blocks"]["ff_proj"]["kernel"].spec == jax.sharding.PartitionSpec(
      None, "fsdp", "tensor"
  )
  assert len(sharded.params["blocks"]["ff_proj"]["kernel"].sharding.device_set) == 8
  np.testing.assert_allclose(single_losses, sharded_losses, rtol=1e-5)
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
      jax.device_get(single.params),
      jax.device_get(sharded.params),
  )


def test_loss_falls_when_fitting_one_batch():
  config = make_tiny_config(init_std=0.125)  # 1/sqrt(d_model)
  config.diffusion.random_length_prob = 0.0
  config.train.num_steps = 80
  rows, cols = np.indices((config.data.batch_size, config.data.sequence_length))
  periodic = jnp.asarray((rows + cols) % 11 + 3)  # every token is determined by its neighbours
  _, losses, _ = _run(config, jax.devices()[:1], periodic, steps=80)
  assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])


def test_warmup_stable_decay_schedule():
  config = make_tiny_config()
  config.train.num_steps = 100
  config.optimizer.update(
      dict(
          peak_lr=1.0,
          warmup_steps=10,
          decay_fraction=0.2,
          final_lr=0.1,
          lr_drop_step=50,
          lr_after_drop=0.5,
      )
  )
  lr = learning_rate_schedule(config)
  got = [float(lr(s)) for s in (0, 5, 10, 49, 50, 80, 90, 100)]
  np.testing.assert_allclose(got, [0.0, 0.5, 1.0, 1.0, 0.5, 0.5, 0.3, 0.1], rtol=1e-6)


@pytest.mark.slow  # test_scale.py's test_save_on_one_mesh_restore_on_another... covers it
def test_checkpoint_round_trip_onto_another_mesh(tmp_path):
  config = make_tiny_config()
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  state, _, _ = _run(config, jax.devices()[:8], _tokens(config), steps=1)
  saver = checkpoint.Checkpointer(tmp_path, config)
  saver.save(1, state, force=True)
  saver.wait()
  saver.close()
  assert checkpoint.latest_step(tmp_path) == 1
  assert checkpoint.load_config(tmp_path).to_dict() == config.to_dict()

  target = make_tiny_config()  # restore replicated on one device
  model, tx = MaskedDiffusionLM(target), make_optimizer(target)
  abstract, _ = state_shardings(target, model, tx, make_mesh(target, jax.devices()[:1]))
  restored = checkpoint.load_state(tmp_path, 1, abstract)
  assert int(restored.step) == 1
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(restored))


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    checkpoint.latest_step(tmp_path)


def test_architecture_mismatch_is_named():
  saved, wanted = make_tiny_config(), make_tiny_config(d_model=128)
  assert checkpoint.architecture_mismatch(saved, wanted) == [
      "model.d_model=128 but the checkpoint has 64"
  ]
  assert not checkpoint.architecture_mismatch(saved, make_tiny_config(remat="full"))


def test_arm_baseline_trains_from_the_same_code_with_a_config_switch():
  config = make_tiny_config(causal=True, init_std=0.125)
  assert config.diffusion.objective == "arm"
  config.train.num_steps = 40
  rows, cols = np.indices((config.data.batch_size, config.data.sequence_length))
  periodic = jnp.asarray((rows + cols) % 11 + 3)
  _, losses, _ = _run(config, jax.devices()[:1], periodic, steps=40)
  assert np.mean(losses[-5:]) < 0.2 * np.mean(losses[:5])


def test_params_only_restore_reads_no_optimizer_state(tmp_path):
  config = make_tiny_config()
  state, _, _ = _run(config, jax.devices()[:1], _tokens(config), steps=1)
  saver = checkpoint.Checkpointer(tmp_path, config)
  saver.save(1, state, force=True)
  saver.wait()
  saver.close()
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  abstract, _ = state_shardings(config, model, tx, make_mesh(config, jax.devices()[:1]))
  params = checkpoint.load_params(tmp_path, 1, abstract.params)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), jax.device_get(params))
  with pytest.raises(CheckpointError, match="cannot restore the parameters"):
    checkpoint.load_params(tmp_path, 1, {"wrong": abstract.params["ln_f"]})


def _params(state):
  return jax.device_get(state.params)


@pytest.mark.slow  # test_survive.py's kill -9 tests check bitwise resumes in make test
def test_resumed_training_is_bitwise_the_uninterrupted_run(tmp_path):
  """Preempted after 2 steps, rerun: same parameters as 4 steps in one go (data stream included)."""
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.train.num_steps = 4
  straight = train(config, tmp_path / "straight")
  with preempted_at(2):
    train(config, tmp_path / "resumed")
  resumed = train(config, tmp_path / "resumed")
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))


@pytest.mark.parametrize("masking", ["pipeline", "device"])
def test_sft_on_gsm8k_trains_with_either_masking(tmp_path, masking):
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(max_sequence_length=512)
  config.data.update(task="gsm8k_sft", sequence_length=512, batch_size=8, masking=masking)
  config.train.update(num_steps=2, eval_every=2)
  state = train(config, tmp_path)
  assert int(state.step) == 2 and checkpoint.latest_step(tmp_path) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(_params(state)))
  _check_accounting(config, tmp_path)


def _check_accounting(config, workdir):
  """run.json describes the run; metrics.jsonl puts tokens and both FLOPs counts on every record."""
  from llada_jax.training.flops import model_flops_per_token  # pylint: disable=g-import-not-at-top

  run = json.loads((workdir / "run.json").read_text())
  tokens_per_step = config.data.batch_size * config.data.sequence_length
  assert run["objective"] == "mdm" and run["tokens_per_step"] == tokens_per_step
  assert run["flops_6nd_per_token"] == 6 * run["non_embedding_parameters"]
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert {r["split"] for r in records} == {"train", "eval"}
  final = [r for r in records if r["split"] == "eval"][-1]
  assert final["step"] == 2 and final["tokens"] == 2 * tokens_per_step
  assert final["flops"] == pytest.approx(2 * tokens_per_step * model_flops_per_token(config))
  assert final["flops_6nd"] == 2 * tokens_per_step * run["flops_6nd_per_token"]
  assert np.isfinite(final["loss_bound"])


def test_gradient_accumulation_and_chunked_loss_equal_the_plain_step():
  """With the noise fixed in the batch (pipeline masking), the mean of two micro-batch gradients
  is the whole batch's gradient, and a loss over 8-position chunks of the output layer is the full
  one: same loss, gradient norm and update, on a 2-device data-parallel mesh."""
  from llada_jax.diffusion.masking import noise_batch  # pylint: disable=g-import-not-at-top

  results = []
  for train_overrides in ({}, {"grad_accum_steps": 2}, {"loss_chunk": 8}):
    config = make_tiny_config()
    config.train.update(train_overrides)
    mesh = make_mesh(config, jax.devices()[:2])
    model, tx = MaskedDiffusionLM(config), make_optimizer(config)
    state, shardings = create_train_state(config, model, tx, mesh)
    step = make_train_step(config, model, tx, mesh, shardings)
    batch = noise_batch(
        jax.random.PRNGKey(5),
        unpacked_batch(_tokens(config)),
        mask_id=config.tokens.mask_id,
        eps=1e-3,
        random_length_prob=0.0,
    )
    batch = jax.device_put(batch, batch_sharding(mesh, axis_rules(config)))
    state, metrics = step(state, batch)
    results.append(
        (jax.device_get(state.params), float(metrics["loss"]), float(metrics["grad_norm"]))
    )
  whole, loss, norm = results[0]
  for params, other_loss, other_norm in results[1:]:
    assert other_loss == pytest.approx(loss, rel=1e-5)
    assert other_norm == pytest.approx(norm, rel=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, whole)
