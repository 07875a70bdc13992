"""The LLaDA 2.0 recipe end to end at toy size (launch/recipe.py, configs/recipes/): every stage
trains from the one before, the merge and the measurements run, and a rerun trains nothing."""

import importlib.util
import json
import math
import pathlib

import pytest

from llada_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe():
  spec = importlib.util.spec_from_file_location("recipe", ROOT / "launch" / "recipe.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow  # each stage's options are tested on their own in make test
def test_the_whole_chain_runs_and_a_rerun_trains_nothing(recipe, tmp_path):
  numbers, seconds = recipe.run_recipe(tmp_path, "toy", tau=0.9, mc_num=2)
  assert set(seconds) == {name for name, _, _ in recipe.TRAINED}
  for name, module, suffix in recipe.TRAINED:
    config = recipe.stage_config(tmp_path, "toy", module, suffix)
    assert checkpoint.latest_step(tmp_path / name) == config.train.num_steps
  block = checkpoint.load_config(tmp_path / "block")
  assert block.diffusion.block_size_schedule == "0:1,1:L,2:4"
  assert (block.diffusion.logit_alignment, block.data.packing) == ("shifted", "pack")
  assert block.train.init_from == str(tmp_path / "arm")
  sft = checkpoint.load_config(tmp_path / "sft")
  assert (sft.diffusion.cap_weight, sft.diffusion.complementary_masking) == (0.5, True)
  assert checkpoint.load_config(tmp_path / "sft_nocap").diffusion.cap_weight == 0.0
  merged = json.loads((tmp_path / "merged" / "merge.json").read_text())
  assert [s["step"] for s in merged["sources"]] == [1, 2]
  for name in ("arm", "block"):
    assert math.isfinite(numbers[name]["bits_per_byte"])
  assert set(numbers["sft"]["by_step"]) == {1, 2}  # every saved step of the CAP run
  for name in recipe.MEASURED:
    assert 0.0 <= numbers[name]["accuracy"] <= 1.0
    assert 1.0 <= numbers[name]["tokens_per_step"] <= 4.0
    assert numbers[name]["answer_log_likelihood"] < 0.0
  trained = {n: (tmp_path / n / "metrics.jsonl").read_text() for n, _, _ in recipe.TRAINED}
  assert recipe.run_recipe(tmp_path, "toy", tau=0.9, mc_num=2) == (numbers, {})
  assert {n: (tmp_path / n / "metrics.jsonl").read_text() for n in trained} == trained


def test_a_stage_stopped_before_its_last_step_stops_the_chain(recipe, tmp_path, monkeypatch):
  """A trainer asked to stop (SIGTERM, Ctrl-C) saves and returns: the chain must not go on to
  the next stage from an unfinished one."""
  monkeypatch.setattr(recipe, "train", lambda config, workdir: None)
  with pytest.raises(recipe.StageStopped, match="stage arm stopped before its last step 2"):
    recipe.run_recipe(tmp_path, "toy", tau=0.9, mc_num=2)
  assert not (tmp_path / "block").exists()


def test_a_bad_scale_is_a_one_line_error():
  from configs.recipes import common  # pylint: disable=g-import-not-at-top
  from llada_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match="recipe scale 'big' is not allowed: expected one of cpu"):
    common.parse("runs/r,big", "arm")
