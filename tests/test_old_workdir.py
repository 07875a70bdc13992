"""A workdir written by an earlier version (tests/data/workdir_52ef57c: step 0 of a 1-layer model,
saved by commit 52ef57c, before the sampler options, data.use_cached and the move of the
checkpoint module) keeps loading, sampling and training with today's code."""

import logging
import pathlib
import shutil

import jax
import numpy as np

from conftest import make_tiny_config
from llada_jax import checkpoint
from llada_jax.loading import load_model_and_step
from llada_jax.sampling.generate import generate
from llada_jax.training.loop import train

OLD = pathlib.Path(__file__).parent / "data" / "workdir_52ef57c"


def test_an_old_workdir_loads_with_todays_defaults_and_samples():
  step, config, params = load_model_and_step(OLD)
  assert step == 0
  # Written by the old version at save time: the sum of its embedding table.
  np.testing.assert_allclose(
      np.asarray(params["wte"]["embedding"]).sum(), np.load(OLD / "wte_sum.npy"), rtol=1e-6
  )
  assert config.sampling.cache == "none" and config.sampling.parallel_threshold == 0.0
  assert config.data.use_cached is False
  out = generate(config, params, np.asarray([[5, 6]]), steps=4, gen_length=4, block_length=4)
  assert np.asarray(out).shape == (1, 6) and (np.asarray(out)[0, :2] == [5, 6]).all()


def test_training_resumes_from_an_old_workdir(tmp_path, caplog):
  workdir = shutil.copytree(OLD, tmp_path / "run")
  config = make_tiny_config(
      d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, mlp_hidden_size=64, max_sequence_length=32
  )
  config.data.update(sequence_length=32, batch_size=8)
  config.train.update(num_steps=2, eval_every=2, eval_batches=1)
  with caplog.at_level(logging.INFO, logger="absl"):  # whatever absl flags set before
    state = train(config, workdir)
  assert "resumed from the checkpoint at step 0" in caplog.text
  assert int(state.step) == 2 and checkpoint.latest_step(workdir) == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(jax.device_get(state.params)))
