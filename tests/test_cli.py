"""The absl command lines: train, resume, sample, and one-line errors for bad input."""

import json
import pathlib
import signal
import subprocess
import sys
import time

import pytest

from conftest import cli_env, default_sigint, make_tiny_config, write_workdir
from llada_jax.loading import load_model
from llada_jax.sampling.text import sample

ROOT = pathlib.Path(__file__).resolve().parents[1]
MICRO = str(ROOT / "tests" / "configs" / "micro.py")


def _run(module: str, *args: str) -> subprocess.CompletedProcess:
  env = cli_env()
  return subprocess.run(
      [sys.executable, "-m", module, *args],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )


def _assert_one_line_error(result: subprocess.CompletedProcess, needle: str) -> None:
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  error_lines = [line for line in result.stderr.splitlines() if "rror" in line]
  assert any(needle in line for line in error_lines), result.stderr[-2000:]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory) -> pathlib.Path:
  workdir = tmp_path_factory.mktemp("run")
  result = _run(
      "llada_jax.train",
      f"--config={MICRO}",
      f"--workdir={workdir}",
      "--config.train.profile_steps=1:2",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "eval/step 3" in result.stderr and "bits_per_byte" in result.stderr
  assert "tflops_per_device" in result.stderr and "| mfu" not in result.stderr  # no CPU peak
  assert list((workdir / "profile").rglob("*.xplane.pb"))  # the trace of step 2
  return workdir


def test_train_writes_checkpoints_and_tensorboard(trained_workdir):
  steps = sorted(
      int(p.name) for p in (trained_workdir / "checkpoints").iterdir() if p.name.isdigit()
  )
  assert steps == [2, 3]
  assert list((trained_workdir / "tensorboard").glob("events.out.tfevents.*"))


@pytest.mark.slow  # test_survive.py's SIGTERM test reruns and resumes in make test
def test_rerun_resumes_from_latest_checkpoint(trained_workdir):
  result = _run(
      "llada_jax.train",
      f"--config={MICRO}",
      f"--workdir={trained_workdir}",
      "--config.train.num_steps=4",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "resumed from the checkpoint at step 3" in result.stderr
  assert "step 4 |" in result.stderr and "step 1 |" not in result.stderr


def test_sample_prints_a_completion(trained_workdir):
  result = _run(
      "llada_jax.sample",
      f"--workdir={trained_workdir}",
      "--prompt=ROMEO:",
      "--prompt=JULIET:",
      "--gen_length=8",
      "--steps=4",
      "--block_length=4",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "=== prompt: 'ROMEO:'" in result.stdout and "=== prompt: 'JULIET:'" in result.stdout


def test_sample_without_checkpoint_is_one_line_error(tmp_path):
  _assert_one_line_error(_run("llada_jax.sample", f"--workdir={tmp_path}"), "holds no checkpoint")


def test_unknown_config_key_is_one_line_error(tmp_path):
  result = _run(
      "llada_jax.train", f"--config={MICRO}", f"--workdir={tmp_path}", "--config.model.n_experts=4"
  )
  _assert_one_line_error(result, "n_experts")


def test_bad_value_is_one_line_error_before_compiling(tmp_path):
  result = _run(
      "llada_jax.train", f"--config={MICRO}", f"--workdir={tmp_path}", "--config.tokens.mask_id=42"
  )
  _assert_one_line_error(result, "tokens.mask_id=42")
  assert result.returncode == 2
  assert not (tmp_path / "checkpoints").exists()


def test_missing_config_file_is_one_line_error(tmp_path):
  result = _run("llada_jax.train", "--config=configs/nope.py", f"--workdir={tmp_path}")
  _assert_one_line_error(result, "names no file")


@pytest.fixture(scope="module")
def two_layer_workdir(tmp_path_factory) -> pathlib.Path:
  """A workdir holding step 0 of the tiny two-layer model (random weights): unlike the one-layer
  micro model, its answers change with the key/value cache (with one layer a stale cache of the
  tokens outside the window is exact)."""
  return write_workdir(tmp_path_factory.mktemp("two_layers"), make_tiny_config())


def test_sample_takes_token_ids_every_option_and_writes_json(two_layer_workdir, tmp_path):
  """Every option reaches the sampler: the written tokens equal llada_jax.sampling.text.sample
  called in this process with the same non-default options, each of which changes them (a dropped
  --cfg_scale, --remasking, --temperature, --seed, --cache or --cache_refresh fails here)."""
  out = tmp_path / "samples.json"
  result = _run(
      "llada_jax.sample",
      f"--workdir={two_layer_workdir}",
      "--prompt_ids=70,82,79",
      "--prompt_ids=74",
      "--gen_length=8",
      "--steps=8",
      "--block_length=8",
      "--remasking=margin",
      "--temperature=0.5",
      "--cfg_scale=1.0",
      "--logits_eos_inf",
      "--confidence_eos_eot_inf",
      "--cache=dual",
      "--cache_refresh=3",
      "--seed=5",
      f"--output_json={out}",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  written = json.loads(out.read_text())
  assert len(written["tokens"]) == 2 and len(written["text"]) == 2
  assert all(len(row) <= 8 for row in written["tokens"])
  expected = sample(
      *load_model(two_layer_workdir),
      ids=[[70, 82, 79], [74]],
      seed=5,
      gen_length=8,
      steps=8,
      block_length=8,
      remasking="margin",
      temperature=0.5,
      cfg_scale=1.0,
      logits_eos_inf=True,
      confidence_eos_eot_inf=True,
      cache="dual",
      cache_refresh=3,
  )
  assert written == {"tokens": expected["tokens"], "text": expected["text"]}


def test_sample_bad_option_is_one_line_error(trained_workdir):
  result = _run(
      "llada_jax.sample",
      f"--workdir={trained_workdir}",
      "--remasking=top_p",
      "--gen_length=8",
      "--steps=8",
      "--block_length=8",
  )
  _assert_one_line_error(result, "remasking='top_p'")


def test_sample_options_that_disagree_fail_before_the_model_loads(tmp_path):
  """Rules between options given together are checked before any checkpoint is read: the workdir
  does not even exist."""
  result = _run(
      "llada_jax.sample", f"--workdir={tmp_path / 'none'}", "--gen_length=16", "--block_length=3"
  )
  _assert_one_line_error(result, "--block_length=3 is not allowed: expected a divisor of")


def test_cache_ctrl_c_is_one_line_and_exit_130(tmp_path):
  """Ctrl-C while llada-cache's Beam pipeline runs (DirectRunner) ends it with one line naming the
  interruption, no traceback, and exit code 130; the interrupted task has no COMPLETED, so
  training cannot read it and the same command rewrites it."""
  pytest.importorskip("apache_beam")
  env = cli_env()
  proc = subprocess.Popen(
      [sys.executable, "-m", "llada_jax.cache", "--config=configs/tiny.py"]
      + [f"--output_cache_dir={tmp_path}"],
      cwd=ROOT,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      preexec_fn=default_sigint,
  )
  task = tmp_path / "tinyshakespeare.byte.chunk"
  try:
    deadline = time.monotonic() + 300
    # The pipeline runs once Beam has created its first temporary directory in the task's folder.
    while not list(task.glob("beam-temp-*")) and time.monotonic() < deadline:
      assert proc.poll() is None, "llada-cache ended before its pipeline ran"
      time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 130, stderr[-3000:]
  assert not (task / "COMPLETED").exists()
  assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
  lines = [line for line in stderr.splitlines() if "interrupt" in line.lower()]
  assert len(lines) == 1 and lines[0].startswith("interrupted"), stderr[-3000:]


def test_sample_error_names_a_default_as_the_checkpoints_default(two_layer_workdir):
  """An error about an option not given names config.sampling.<name> and says it is the
  checkpoint's default (the tiny config's steps=8 do not fit --gen_length=4); a given option is
  still named as typed."""
  result = _run(
      "llada_jax.sample", f"--workdir={two_layer_workdir}", "--gen_length=4", "--block_length=4"
  )
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert errors == [
      "error: config.sampling.steps=8 (the checkpoint's default; no --steps was given) is not "
      "allowed: expected at most gen_length=4 (one token per step at least)"
  ]
  result = _run("llada_jax.sample", f"--workdir={two_layer_workdir}", "--gen_length=4", "--steps=6")
  errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
  assert errors == [
      "error: --steps=6 is not allowed: expected at most gen_length=4 (one token "
      "per step at least)"
  ], result.stderr[-2000:]


def test_an_option_the_model_refuses_is_refused_before_its_parameters_load(tmp_path):
  """llada-sample checks the options against the checkpoint's stored config first: on an ARM
  whose parameters cannot be read, --cfg_scale is what the one line names (not the checkpoint);
  an ARM takes any gen_length (its steps and blocks play no part)."""
  import shutil  # pylint: disable=import-outside-toplevel

  from conftest import make_tiny_config, write_workdir  # pylint: disable=import-outside-toplevel

  workdir = write_workdir(tmp_path / "arm", make_tiny_config(causal=True))
  result = _run("llada_jax.sample", f"--workdir={workdir}", "--prompt_ids=5,6", "--gen_length=5")
  assert result.returncode == 0, result.stderr[-2000:]
  shutil.rmtree(tmp_path / "arm" / "checkpoints" / "0" / "state")
  _assert_one_line_error(
      _run("llada_jax.sample", f"--workdir={workdir}", "--prompt_ids=5,6", "--cfg_scale=1"),
      "--cfg_scale=1.0 is not allowed for an autoregressive model",
  )
