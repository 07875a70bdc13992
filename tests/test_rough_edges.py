"""Rough edges a new user met (issue 30, item 12): no Orbax warning on an intended read, the paper
configs' attention kernel, llada-compile's own defaults, errors that name a default as a default,
and the block size of a run in its log and metrics."""

import json
import logging
import pathlib
import subprocess
import sys

import pytest

from conftest import cli_env, make_tiny_config, write_workdir
from llada_jax.training.flops import forward_flops_per_token

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_reading_a_checkpoint_logs_no_orbax_metadata_warning(tmp_path, caplog):
  """Every read checks the stored tree first; it read the step metadata where Orbax's manager
  does not write it (under state/), and Orbax warned "Metadata file does not exist" each time."""
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  write_workdir(tmp_path, config)
  with caplog.at_level(logging.INFO):
    _, params = load_model(str(tmp_path))  # parameters only
  assert params
  noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert not noise, noise


def test_block_size_switches_and_changes_on_resume_are_logged_and_in_the_metrics(tmp_path, caplog):
  """Each switch of diffusion.block_size_schedule, and a resume whose block size differs from the
  one the checkpoint's run trained with, is one INFO line; every logged step's metrics hold the
  block size its update trained with."""
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.diffusion.update(objective="block", block_size=4, block_size_schedule="0:2,2:4")
  config.train.update(num_steps=4, log_every=1, eval_every=4)
  config.checkpoint.update(save_every=4, keep=1)
  with caplog.at_level(logging.INFO, logger="absl"):
    train(config, tmp_path)
  assert "diffusion.block_size_schedule: block size 2 -> 4 at step 2" in caplog.text
  assert "block size" not in caplog.text.replace("block size 2 -> 4 at step 2", "")
  sizes = {
      record["step"]: record["block_size"]
      for record in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
      if "block_size" in record
  }
  assert sizes == {1: 2, 2: 2, 3: 4, 4: 4}  # step N's line: the update from step N - 1
  caplog.clear()
  config.diffusion.update(block_size=8, block_size_schedule="")  # resumes with nothing to do
  with caplog.at_level(logging.INFO, logger="absl"):
    train(config, tmp_path)
  assert (
      "block size changes on resume: the checkpoint at step 4 was trained with block size 4 (its "
      "config), this run trains with block size 8" in caplog.text
  )


def test_llada_compile_defaults_score_on_a_multi_device_mesh():
  """--what=score with no --num_items: enough pairs for a forward pass of data.batch_size rows
  (16 // mc_batch_size 16 = 1 pair on configs/tiny.py), rounded up to what the 8 data-parallel
  devices split; it asked for 1 pair and refused it."""
  import jax  # pylint: disable=g-import-not-at-top

  from configs import tiny  # pylint: disable=g-import-not-at-top
  from llada_jax.aot import compile_program  # pylint: disable=g-import-not-at-top

  config = tiny.get_config()
  config.model.n_layers = 1  # compiles faster; the shapes that failed are kept
  report = compile_program(config, jax.devices()[:8], "score")
  assert (report.program, report.devices, report.mesh["data"]) == ("score", 8, 8)
  # 8 pairs of mc_num samples of data.sequence_length tokens (one forward pass per sample).
  assert report.model_flops == pytest.approx(
      8 * config.evaluation.mc_num * 128 * forward_flops_per_token(config, 128)
  )


def test_llada_compile_defaults_sample_configs_tiny(tmp_path):
  """`llada-compile --config=configs/tiny.py --what=sample` with the default prompt length: 64
  prompt tokens + sampling.gen_length 112 exceeded model.max_sequence_length 128; the default
  prompt is now what the model's length leaves (16 tokens)."""
  del tmp_path
  result = subprocess.run(
      [sys.executable, "-m", "llada_jax.compile", "--config=configs/tiny.py", "--what=sample"]
      + ["--num_devices=2", "--config.model.n_layers=1"],
      cwd=ROOT,
      env=cli_env(),
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert result.returncode == 0, result.stderr[-2000:]
  assert "compiled the sample program for 2 cpu devices" in result.stdout


@pytest.mark.parametrize("name", ["llada_8b", "llada_1b"])
def test_paper_configs_take_splash_attention_on_tpu(name):
  """docs/scaling.md's TPU rows for these configs use splash attention: their model.attention is
  `auto`, which takes splash on a TPU at their lengths (multiples of 128) and xla elsewhere."""
  import importlib  # pylint: disable=g-import-not-at-top

  from llada_jax.model.attention import resolve  # pylint: disable=g-import-not-at-top

  model = importlib.import_module(f"configs.{name}").get_config().model
  assert model.attention == "auto"
  lengths = (model.max_sequence_length,) * 2
  assert resolve(model.attention, model.dtype, "tpu", lengths) == "splash"
  assert resolve(model.attention, model.dtype, "cpu", lengths) == "xla"
