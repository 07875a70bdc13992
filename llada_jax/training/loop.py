"""The train loop: build everything from the config, resume if a checkpoint exists, train, save."""

from __future__ import annotations

import os
import pathlib
import time

import jax
import ml_collections
import numpy as np
from absl import logging

from llada_jax.config import validate
from llada_jax.data.corpora import CORPUS_FILES, bits_per_byte, unigram_entropy_bits
from llada_jax.errors import CheckpointError, ConfigError
from llada_jax.model import ModelConfig, Transformer
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding, warn_replicated
from llada_jax.training.checkpoint import Checkpointer, architecture_mismatch, load_config
from llada_jax.training.metrics import MetricWriter
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.state import TrainState, create_train_state, state_shardings
from llada_jax.training.step import make_eval_step, make_train_step


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path) -> TrainState:
  """Trains until config.train.num_steps, resuming from the latest checkpoint in `workdir`."""
  from llada_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  validate(config)
  _check_workdir(workdir)
  mesh = make_mesh(config)
  data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
  if config.data.batch_size % data_parallel:
    raise ConfigError(f"data.batch_size={config.data.batch_size} is not allowed: expected a "
                      f"multiple of mesh.data x mesh.fsdp = {data_parallel}")
  model = Transformer(ModelConfig.from_config(config))
  tx = make_optimizer(config)
  checkpointer = Checkpointer(workdir, config)
  start = checkpointer.latest_step()
  # Data first: a bad task or vocabulary fails here, before parameters are allocated.
  data_sharding = batch_sharding(mesh, axis_rules(config))
  validation = pipeline.eval_batches(config, data_sharding, config.train.eval_batches)
  batches = pipeline.train_batches(config, data_sharding, start_step=start or 0)
  if start is None:
    state, shardings = create_train_state(config, model, tx, mesh)
  else:
    mismatch = architecture_mismatch(load_config(workdir, start), config)
    if mismatch:
      raise CheckpointError(f"--workdir={workdir} holds a different model: {mismatch[0]}; use a "
                            "new workdir or the stored model settings")
    abstract, shardings = state_shardings(config, model, tx, mesh)
    state = checkpointer.restore(start, abstract)
    logging.info("resumed from the checkpoint at step %d in %s", start, workdir)
  start = int(state.step)
  warn_replicated(state.params, shardings.params)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  logging.info("model: %s parameters; mesh %s over %d devices", f"{num_params:,}",
               dict(mesh.shape), mesh.size)

  writer = MetricWriter(workdir)
  if config.data.vocabulary == "byte" and config.data.task in CORPUS_FILES:
    logging.info("unigram entropy of the training bytes: %.3f bits/byte (a context-free model's "
                 "floor)", unigram_entropy_bits(config.data.task))
  train_step = make_train_step(config, model, tx, mesh, shardings)
  eval_step = make_eval_step(config, model, mesh, shardings.params)
  tokens_per_step = config.data.batch_size * config.data.sequence_length

  last_time, last_step = time.time(), start
  for step in range(start, config.train.num_steps):
    state, metrics = train_step(state, next(batches))
    done = step + 1
    if done % config.train.log_every == 0 or done == config.train.num_steps or step == start:
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      now = time.time()
      if step != start:  # the first step's time is mostly compilation
        metrics["tokens_per_s"] = tokens_per_step * (done - last_step) / (now - last_time)
      last_time, last_step = now, done
      writer.write(done, metrics)
    if done % config.train.eval_every == 0 or done == config.train.num_steps:
      loss = float(np.mean([eval_step(state.params, b, i) for i, b in enumerate(validation)]))
      scalars = {"loss_bound": loss}
      if config.data.vocabulary == "byte":
        scalars["bits_per_byte"] = bits_per_byte(loss)
      writer.write(done, scalars, prefix="eval/")
    checkpointer.save(done, state, force=done == config.train.num_steps)
  batches.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if start >= config.train.num_steps:
    logging.info("nothing to do: the checkpoint in %s is already at step %d", workdir, start)
  return state


def _check_workdir(workdir: str | pathlib.Path) -> None:
  """Fails before any compile if the workdir cannot be created or written."""
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} cannot be created: {e.strerror}") from None
  if not os.access(path, os.W_OK):
    raise ConfigError(f"--workdir={workdir} is not writable")
