"""Training that survives: non-finite steps, SIGTERM, Ctrl-C, kill -9, broken checkpoints, a
second trainer on the same workdir."""

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import cli_env, default_sigint, make_tiny_config
from llada_jax.data import pipeline
from llada_jax.errors import CheckpointError, ConfigError, TrainingDiverged
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding
from llada_jax import checkpoint
from llada_jax.training.loop import train
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.preemption import PreemptionWatcher
from llada_jax.training.state import state_shardings
from llada_jax.training.step import make_train_step
from llada_jax.training.workdir_lock import LOCK_NAME, WorkdirLock

ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "configs" / "micro.py")


def _config(**train):
  config = make_tiny_config()
  config.optimizer.decay_fraction = 0.0  # runs of different lengths share one schedule
  config.train.update(dict(num_steps=6, eval_every=6, **train))
  return config


def _params(state):
  return jax.device_get(state.params)


def _finite(tree):
  return all(np.isfinite(x).all() for x in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def rolled_back(tmp_path_factory):
  """(workdir, final state) of a 6-step run whose step 3 is non-finite with nonfinite=rollback: the
  step is skipped, checkpoint 4 saved, and the flag (read one step late) rolls back to it."""
  workdir = tmp_path_factory.mktemp("rollback")
  return workdir, train(_config(nonfinite="rollback", inject_nan_at_step=3), workdir)


def test_nan_with_rollback_restores_the_last_checkpoint_and_cuts_the_learning_rate(rolled_back):
  workdir, state = rolled_back
  assert int(state.step) == 6 and int(state.rollbacks) == 1
  assert float(state.lr_scale) == pytest.approx(0.25) and _finite(_params(state))
  events = list((workdir / "tensorboard").glob("events.*"))
  assert events and b"events/lr_scale" in b"".join(p.read_bytes() for p in events)


@pytest.fixture(scope="module")
def by_hand(rolled_back):
  """Steps 4 to 7 run by hand (make_train_step, the loop's data stream) from checkpoint 4 of the
  rollback run, with the peak learning rate itself x 0.25 and lr_scale left at 1, step 6 made
  non-finite: after each step, (host copies of params and opt_state, nonfinite, step, skipped)."""
  config = _config(nonfinite="skip", inject_nan_at_step=6)
  config.optimizer.update(
      peak_lr=0.25 * config.optimizer.peak_lr, final_lr=0.25 * config.optimizer.final_lr
  )
  mesh = make_mesh(config)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  abstract, shardings = state_shardings(config, model, tx, mesh)
  state = checkpoint.load_state(rolled_back[0], 4, abstract)
  assert int(state.step) == 4 and float(state.lr_scale) == 1.0
  step = make_train_step(config, model, tx, mesh, shardings)
  batches = pipeline.train_batches(config, batch_sharding(mesh, axis_rules(config)), start_step=4)
  after = {}
  for number in range(4, 8):
    state, metrics = step(state, next(batches))  # donates the state: keep host copies
    after[number] = (
        jax.device_get((state.params, state.opt_state)),
        bool(metrics["nonfinite"]),
        int(state.step),
        int(state.skipped),
    )
  batches.close()
  return after


def test_rollback_continues_as_a_run_from_the_checkpoint_at_a_quarter_of_the_rate(
    rolled_back, by_hand
):
  """The rolled-back run's final parameters equal those of steps 4 and 5 run by hand from
  checkpoint 4 at a quarter of the peak rate: restoring nothing, an older checkpoint, another
  data position or a step that ignores lr_scale all fail here."""
  (params, _), nonfinite, step, _ = by_hand[5]
  assert not nonfinite and step == 6
  jax.tree.map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      _params(rolled_back[1]),
      params,
  )


def test_nan_with_skip_skips_exactly_that_update(tmp_path):
  state = train(_config(nonfinite="skip", inject_nan_at_step=3), tmp_path)
  assert int(state.step) == 6 and int(state.skipped) == 1 and int(state.rollbacks) == 0
  assert float(state.lr_scale) == 1.0 and _finite(_params(state))


def test_a_skipped_step_leaves_parameters_and_optimizer_state_bitwise_as_they_were(by_hand):
  """Steps 4 and 5 are finite, step 6's loss is NaN: parameters and optimizer state after step 6
  are bitwise those after step 5 (only step and skipped count on; checkpoint 4 already counts the
  rollback run's skipped step 3); step 7 updates again."""
  assert [by_hand[n][1:] for n in range(4, 8)] == [
      (False, 5, 1),
      (False, 6, 1),
      (True, 7, 2),
      (False, 8, 2),
  ]
  jax.tree.map(np.testing.assert_array_equal, by_hand[6][0], by_hand[5][0])
  assert _finite(by_hand[7][0]) and not np.array_equal(
      by_hand[7][0][0]["ln_f"]["weight"], by_hand[6][0][0]["ln_f"]["weight"]
  )


def test_divergence_beyond_max_rollbacks_is_an_error(tmp_path):
  with pytest.raises(TrainingDiverged, match="after train.max_rollbacks=0 rollbacks"):
    train(_config(nonfinite="rollback", max_rollbacks=0, inject_nan_at_step=3), tmp_path)


def test_broken_latest_checkpoint_falls_back_to_the_previous_one(finished, tmp_path):
  straight = train(_config(), tmp_path / "straight")
  broken = _copy(finished, tmp_path)  # checkpoints 2 and 4 of the same run, 4 steps long
  state_dir = pathlib.Path(checkpoint.checkpoint_dir(broken)) / "4" / "state"
  victims = [p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0]
  for victim in victims:
    victim.write_bytes(victim.read_bytes()[:7])  # a crash while the file was written
  resumed = train(_config(), broken)
  jax.tree.map(np.testing.assert_array_equal, _params(straight), _params(resumed))
  assert (checkpoint.checkpoint_dir(broken) / "4.broken").is_dir()
  assert checkpoint.latest_step(broken) == 6


def _env():
  return cli_env()


def _train_command(workdir, *flags):
  return [
      sys.executable,
      "-m",
      "llada_jax.train",
      f"--config={MICRO}",
      f"--workdir={workdir}",
      "--config.optimizer.decay_fraction=0.0",
      *flags,
  ]


_STARTED: list[subprocess.Popen] = []  # trainers `_start` ran, killed after each test if alive


@pytest.fixture(autouse=True)
def _no_trainer_left_running():
  """A test that fails before it stops its trainer does not leave it running (a 100,000-step
  trainer held a core for the rest of a suite once)."""
  yield
  while _STARTED:
    proc = _STARTED.pop()
    if proc.poll() is None:
      proc.kill()
      proc.wait()


def _start(workdir, *flags):
  """A trainer in the background, SIGINT at its default (`conftest.default_sigint`)."""
  proc = subprocess.Popen(
      _train_command(workdir, *flags),
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
      preexec_fn=default_sigint,
  )
  _STARTED.append(proc)
  return proc


def _wait_for_line(proc, needle, timeout=300):
  """Reads the process's log until a line contains `needle`."""
  deadline = time.time() + timeout
  lines = []
  while time.time() < deadline:
    line = proc.stderr.readline()
    if not line:
      break
    lines.append(line)
    if needle in line:
      return lines
  raise AssertionError(f"{needle!r} never appeared:\n{''.join(lines[-30:])}")


def test_sigterm_saves_at_the_next_step_and_the_rerun_resumes(tmp_path):
  proc = _start(tmp_path, "--config.train.num_steps=500", "--config.checkpoint.save_every=1000")
  _wait_for_line(proc, "step 5 |")
  proc.send_signal(signal.SIGTERM)
  out = proc.stderr.read()
  assert proc.wait(timeout=120) == 0, out[-3000:]
  saved = checkpoint.latest_step(tmp_path)
  assert 5 <= saved < 500 and f"preempted: saved step {saved}" in out
  rerun = subprocess.run(
      _train_command(
          tmp_path, f"--config.train.num_steps={saved + 2}", "--config.checkpoint.save_every=1000"
      ),
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"resumed from the checkpoint at step {saved}" in rerun.stderr
  assert checkpoint.latest_step(tmp_path) == saved + 2


def _checkpoint_tmp_dir(workdir):
  root = checkpoint.checkpoint_dir(workdir)
  return root.is_dir() and any("tmp" in p.name for p in root.iterdir())


KILL_FLAGS = (
    "--config.train.num_steps=12",
    "--config.checkpoint.save_every=3",
    "--config.checkpoint.async_save=True",
    "--config.checkpoint.keep=2",
)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("uninterrupted")
  result = subprocess.run(
      _train_command(workdir, *KILL_FLAGS),
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return _stored_params(workdir)


def _stored_params(workdir):
  config = checkpoint.load_config(workdir)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  abstract, _ = state_shardings(config, model, tx, make_mesh(config, jax.devices()[:1]))
  return jax.device_get(
      checkpoint.load_params(workdir, checkpoint.latest_step(workdir), abstract.params)
  )


@pytest.mark.parametrize(
    "moment",
    [
        # mid_async_save restarts from the save before the one it cut, as mid_step and
        # between_saves restart from theirs: the same rerun, plus a partial checkpoint to ignore.
        pytest.param("mid_step", marks=pytest.mark.slow),
        "mid_async_save",
        pytest.param("between_saves", marks=pytest.mark.slow),
    ],
)
def test_kill_9_at_any_moment_then_rerun_gives_bitwise_the_same_parameters(
    tmp_path, uninterrupted, moment
):
  proc = _start(tmp_path, *KILL_FLAGS)
  if moment == "mid_step":
    _wait_for_line(proc, "step 4 |")
  elif moment == "between_saves":
    _wait_for_line(proc, "step 7 |")  # checkpoints 3 and 6 are on disk, 9 not yet started
  else:
    deadline = time.time() + 300
    while not _checkpoint_tmp_dir(tmp_path) and time.time() < deadline:
      time.sleep(0.005)
    assert _checkpoint_tmp_dir(tmp_path), "no save was in flight"
  proc.kill()
  proc.wait(timeout=60)
  root = checkpoint.checkpoint_dir(tmp_path)
  saved = sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []
  assert not saved or saved[-1] < 12  # the run was cut short
  rerun = subprocess.run(
      _train_command(tmp_path, *KILL_FLAGS),
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert checkpoint.latest_step(tmp_path) == 12
  jax.tree.map(np.testing.assert_array_equal, _stored_params(tmp_path), uninterrupted)
  shutil.rmtree(tmp_path, ignore_errors=True)


def test_keeps_the_last_checkpoints_plus_every_kth(tmp_path):
  config = _config()
  config.train.update(num_steps=8, eval_every=8)
  config.checkpoint.update(save_every=2, keep=2, keep_every=4)
  train(config, tmp_path)
  root = checkpoint.checkpoint_dir(tmp_path)
  assert sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) == [4, 6, 8]


def test_full_disk_is_an_error_before_training(tmp_path, monkeypatch):
  from llada_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from llada_jax.training import loop  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(loop.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(1, 1, 1000))
  with pytest.raises(ConfigError, match="has 0.00 GB free; one checkpoint of this model needs"):
    train(_config(), tmp_path)
  assert not checkpoint.checkpoint_dir(tmp_path).exists() or not any(
      checkpoint.checkpoint_dir(tmp_path).iterdir()
  )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A workdir holding checkpoints 2 and 4 of a finished run."""
  workdir = tmp_path_factory.mktemp("finished")
  config = _config()
  config.train.num_steps = 4
  train(config, workdir)
  return workdir


def _copy(finished, tmp_path):
  return pathlib.Path(shutil.copytree(finished, tmp_path / "run"))


def _listing(workdir):
  return sorted((str(p.relative_to(workdir)), p.stat().st_size) for p in workdir.rglob("*"))


def _damage(workdir, step, how):
  """Truncates or deletes every tensor data file of a step (a crash or a lost file)."""
  data = list((checkpoint.checkpoint_dir(workdir) / str(step) / "state").glob("ocdbt.*/d/*"))
  assert data
  for path in data:
    if how == "truncate":
      path.write_bytes(path.read_bytes()[:7])
    else:
      path.unlink()


def _serving_params(config):
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  abstract, _ = state_shardings(config, model, tx, make_mesh(config, jax.devices()[:1]))
  return abstract.params


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_read_only_restore_skips_a_damaged_newest_step_and_moves_nothing(finished, tmp_path, how):
  workdir = _copy(finished, tmp_path)
  _damage(workdir, 4, how)
  before = _listing(workdir)
  step, config, params = checkpoint.restore_newest(
      workdir, _serving_params, params_only=True, read_only=True
  )
  assert step == 2 and config.model.d_model == 64
  jax.tree.map(
      np.testing.assert_array_equal,
      jax.device_get(params),
      jax.device_get(checkpoint.load_params(workdir, 2, _serving_params(config))),
  )
  assert _listing(workdir) == before


def test_no_restorable_step_is_a_one_line_error_that_moves_nothing(finished, tmp_path):
  workdir = _copy(finished, tmp_path)
  _damage(workdir, 4, "truncate")
  _damage(workdir, 2, "delete")
  before = _listing(workdir)
  with pytest.raises(
      CheckpointError,
      match=r"no checkpoint in it can be restored \(newest: " r"step 4: its tensors cannot be read",
  ) as error:
    checkpoint.restore_newest(workdir, _serving_params, params_only=True, read_only=True)
  assert "\n" not in str(error.value)
  with pytest.raises(CheckpointError, match="no checkpoint in it can be restored"):
    train(_config(), workdir)  # the trainer neither moves them aside nor starts over
  assert _listing(workdir) == before


@pytest.mark.parametrize(
    "field, value, message",
    [
        (
            "model.d_model",
            128,
            "holds a different model: model.d_model=128 but the checkpoint has 64",
        ),
        (
            "model.qk_norm",
            True,
            "holds a different model: model.qk_norm=True but the checkpoint has False",
        ),
        (
            "model.tie_embeddings",
            True,
            "holds a different model: model.tie_embeddings=True but the checkpoint has False",
        ),
        (
            "model.moe.num_experts",
            4,
            "holds a different model: model.moe.num_experts=4 but the checkpoint has 0",
        ),
        (
            "optimizer.grad_clip_norm",
            0.0,
            "holds a different optimizer state: checkpoint 4 has no " "opt_state.0.count;",
        ),
    ],
)
def test_resume_with_another_model_stops_and_leaves_the_checkpoints_alone(
    finished, tmp_path, field, value, message
):
  workdir = _copy(finished, tmp_path)
  before = _listing(workdir)
  config = _config()
  *sections, name = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[name] = value
  with pytest.raises(CheckpointError, match=f"^--workdir={re.escape(str(workdir))} {message}"):
    train(config, workdir)
  assert _listing(workdir) == before  # nothing renamed, no lock or log left behind


def test_expert_fields_of_a_dense_model_are_not_its_architecture(finished):
  """A dense checkpoint restores into a config whose MoE sizes differ (they shape nothing while
  model.moe.num_experts is 0); with experts on both sides they are compared
  (`checkpoint.EXPERT_PARAMETER_FIELDS`)."""
  wanted = _config()
  wanted.model.moe.update(
      dict(expert_hidden_size=96, num_shared_experts=1, first_k_dense_replace=1)
  )
  step, _, _ = checkpoint.restore_newest(
      finished, _serving_params, params_only=True, read_only=True, wanted=wanted
  )
  assert step == 4
  stored = checkpoint.load_config(finished, 4)
  stored.model.moe.num_experts = wanted.model.moe.num_experts = 4
  assert checkpoint.architecture_mismatch(stored, wanted) == [
      "model.moe.expert_hidden_size=96 but the checkpoint has 64",
      "model.moe.num_shared_experts=1 but the checkpoint has 0",
      "model.moe.first_k_dense_replace=1 but the checkpoint has 0",
  ]


def test_a_locked_workdir_stops_a_second_trainer_before_it_writes(tmp_path):
  holder = WorkdirLock(tmp_path)
  holder.acquire()  # this process: alive on this host
  with pytest.raises(ConfigError, match=f"in use by another trainer: pid {os.getpid()} on "):
    train(_config(), tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]
  holder.release()
  assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_lock_is_taken_over_and_another_hosts_lock_is_refused(tmp_path):
  dead = subprocess.Popen(["true"])
  dead.wait()
  lock = tmp_path / LOCK_NAME
  lock.write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
  taker = WorkdirLock(tmp_path)
  taker.acquire()
  assert f'"pid": {os.getpid()}' in lock.read_text()
  taker.release()
  lock.write_text('{"pid": 1, "host": "elsewhere.example", "started": "yesterday"}')
  with pytest.raises(
      ConfigError,
      match=r"locked by pid 1 on host elsewhere.example, started "
      "yesterday, which this host cannot check; if that run has ended, delete",
  ):
    WorkdirLock(tmp_path).acquire()


def test_first_ctrl_c_requests_a_save_and_the_second_aborts():
  before = signal.getsignal(signal.SIGINT)
  # Python's own Ctrl-C handler, as in a terminal (a shell script's `cmd &` starts the suite with
  # SIGINT ignored, which the watcher rightly leaves alone).
  signal.signal(signal.SIGINT, signal.default_int_handler)
  watcher = PreemptionWatcher()
  try:
    assert not watcher.reached(1)
    try:
      signal.raise_signal(signal.SIGINT)
    except KeyboardInterrupt:
      pytest.fail("the first Ctrl-C aborted instead of asking for a save")
    assert watcher.reached(1)
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    watcher.close()
    restored = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, before)
  assert restored is signal.default_int_handler


def test_ctrl_c_saves_at_the_next_step_and_a_second_trainer_is_refused_meanwhile(tmp_path):
  proc = _start(
      tmp_path, "--config.train.num_steps=100000", "--config.checkpoint.save_every=100000"
  )
  _wait_for_line(proc, "step 5 |")
  second = subprocess.run(
      _train_command(tmp_path, "--config.optimizer.peak_lr=1e-3"),
      cwd=ROOT,
      env=_env(),
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert second.returncode == 2, second.stderr[-3000:]
  error = [line for line in second.stderr.splitlines() if line.startswith("error: ")]
  assert len(error) == 1 and f"in use by another trainer: pid {proc.pid} on " in error[0]
  proc.send_signal(signal.SIGINT)
  out = proc.stderr.read()
  assert proc.wait(timeout=120) == 0, out[-3000:]
  saved = checkpoint.latest_step(tmp_path)
  assert 5 <= saved < 100000 and f"preempted: saved step {saved}" in out
  assert "Traceback" not in out and not (tmp_path / LOCK_NAME).exists()
  assert checkpoint.load_config(tmp_path).optimizer.peak_lr == 3e-3


def test_every_read_only_command_falls_back_past_a_damaged_step(finished, tmp_path):
  """sample, evaluate and to-hf load through the one restore path: the damaged newest step is
  skipped (once they died with a TensorStore traceback) and nothing is renamed."""
  from llada_jax.interop.hf_checkpoint import save_hf  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.model import load_eval_model  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model, load_model_and_step  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.text import sample  # pylint: disable=g-import-not-at-top

  workdir = _copy(finished, tmp_path)
  _damage(workdir, 4, "truncate")
  before = _listing(workdir)
  step, config, params = load_model_and_step(workdir)
  assert step == 2
  assert sample(config, params, texts=["ab"], steps=4, gen_length=4, block_length=4)["text"]
  assert load_eval_model(workdir).step == 2
  save_hf(*load_model(workdir), tmp_path / "hf", dtype="float32")  # what to-hf does
  assert (tmp_path / "hf" / "model.safetensors").is_file()
  assert _listing(workdir) == before
  env = cli_env()
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "llada_jax.sample",
          f"--workdir={workdir}",
          "--prompt=ab",
          "--gen_length=4",
          "--steps=4",
          "--block_length=4",
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "checkpoint 4 in" in result.stderr and "cannot be restored" in result.stderr
  assert _listing(workdir) == before


def test_a_divergence_that_comes_back_rolls_back_at_lower_rates_until_max_rollbacks(
    tmp_path, monkeypatch
):
  """A step that is non-finite at every learning rate: each rollback cuts the rate again and
  the third stops the run (once the count and cut came from the checkpoint, so they repeated
  1 and x0.25 forever)."""
  from llada_jax.training import loop  # pylint: disable=g-import-not-at-top

  make = loop.make_train_step
  rates = []

  def diverging_step(*args, **kwargs):
    step = make(*args, **kwargs)

    def run(state, batch, at=0, frozen=None):
      state, metrics = step(state, batch, at, frozen)
      rates.append(float(state.lr_scale))
      assert len(rates) < 60, "rollbacks never stop"
      return state, dict(metrics, nonfinite=metrics["nonfinite"] | (state.step == 5))

    return run

  monkeypatch.setattr(loop, "make_train_step", diverging_step)
  with pytest.raises(TrainingDiverged, match="after train.max_rollbacks=2 rollbacks"):
    train(_config(nonfinite="rollback", max_rollbacks=2), tmp_path)
  assert sorted(set(rates), reverse=True) == [1.0, 0.25, 0.0625]


def test_a_failed_save_stops_with_one_line_naming_the_checkpoint_to_resume_from(
    tmp_path, monkeypatch
):
  """A write that fails in the background (storage down) surfaces at the next save or wait as
  SaveFailed, not as a library traceback, and training does not go on as if it had saved."""
  from llada_jax.errors import SaveFailed  # pylint: disable=g-import-not-at-top

  config = _config()
  saver = checkpoint.Checkpointer(tmp_path, config)
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  from llada_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top

  state, _ = create_train_state(config, model, tx, make_mesh(config, jax.devices()[:1]))
  saver.save(2, state, force=True)
  saver.wait()

  def broken(*args, **kwargs):
    raise OSError("connection refused")

  monkeypatch.setattr(saver._manager, "wait_until_finished", broken)  # pylint: disable=protected-access
  with pytest.raises(
      SaveFailed,
      match=r"saving checkpoint 4 to .* failed: connection refused; the "
      r"newest complete checkpoint is 2: rerun the same command",
  ) as error:
    saver.save(4, state, force=True)
    saver.wait()
  assert "\n" not in str(error.value)


def test_a_lock_held_by_a_killed_unreaped_process_is_stale(tmp_path):
  """kill -9 of a trainer whose parent never reaps it (containers without an init) leaves a
  zombie: its pid answers signals but no run holds the workdir."""
  import json as json_lib  # pylint: disable=g-import-not-at-top

  child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  child.kill()
  deadline = time.time() + 10
  while (
      pathlib.Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
      and time.time() < deadline
  ):
    time.sleep(0.05)
  (tmp_path / LOCK_NAME).write_text(
      json_lib.dumps({"pid": child.pid, "host": socket.gethostname(), "started": "earlier"})
  )
  lock = WorkdirLock(tmp_path)
  lock.acquire()  # taken over, not refused
  lock.release()
  child.wait()
