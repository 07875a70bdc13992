"""The train loop: build everything from the config, resume if a checkpoint exists, train, save."""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import tempfile
import time
from typing import Any, Callable, Sequence

import jax
import ml_collections
import numpy as np
from absl import logging

from llada_jax import storage
from llada_jax.checkpoint import Checkpointer, checkpoint_dir, load_config, newest_stored_config
from llada_jax.config import (
    TOKENIZER_VOCABULARIES,
    block_size_at,
    objective_of,
    profile_range,
    validate,
)
from llada_jax.data.corpora import CORPUS_FILES, unigram_entropy_bits
from llada_jax.diffusion import alignment
from llada_jax.errors import ConfigError, TrainingDiverged
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import axis_rules, batch_sharding, warn_replicated
from llada_jax.posttrain.reference import config_with_reference
from llada_jax.training.preemption import PreemptionWatcher
from llada_jax.training.flops import model_flops_per_step, peak_flops
from llada_jax.training.metrics import Accounting, MetricWriter, write_run_description
from llada_jax.training.optimizer import make_optimizer
from llada_jax.training.state import (
    VOCABULARY_KEYS,
    TrainState,
    config_with_init_from,
    create_train_state,
    init_from_workdir,
    state_shardings,
)
from llada_jax.training.sources import make_source
from llada_jax.training.step import make_train_step
from llada_jax.training.workdir_lock import lock_for_job


def train(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    eval_hooks: Sequence[Callable[[int, Any, storage.PathLike], dict[str, float]]] = (),
) -> TrainState:
  """Trains until config.train.num_steps, resuming from the newest restorable checkpoint in
  `workdir`, which this run locks (`<workdir>/train.lock`) until it returns or raises. A workdir
  without checkpoints starts from random parameters or those of train.init_from (an AR HF folder:
  `state.imported_params`), whose vocabulary, tokenizer and token ids the run takes; a resumed
  run ignores train.init_from and keeps its checkpoint's vocabulary (`_config_of_run`).

  eval_hooks: called at every evaluation step as hook(step, params, workdir); the scalars they
  return are written under "eval/" (`llada_jax.evaluation.hooks.from_config(config)` runs
  config.evaluation.tasks; `llada-train` passes it).

  Raises ConfigError for a bad config value or an unusable workdir (one another trainer holds
  included), CheckpointError when the workdir holds checkpoints of another model or none that
  restores, ConfigError or CheckpointError for a train.init_from folder that holds another model
  or cannot be imported, and TrainingDiverged; all of them before anything is compiled, except
  the last.
  """
  validate(config)  # as given, before anything of the run fills it in
  config = validate(_config_of_run(config, workdir))
  if config.evaluation.tasks and not eval_hooks:
    raise ConfigError(
        f"evaluation.tasks={config.evaluation.tasks!r} is not allowed without its "
        "hook: pass eval_hooks=llada_jax.evaluation.hooks.from_config(config) "
        "(llada-train does)"
    )
  if config.evaluation.tasks and jax.process_count() > 1:
    raise ConfigError(
        f"evaluation.tasks={config.evaluation.tasks!r} is not allowed in a "
        f"{jax.process_count()}-process job: run llada-evaluate on its checkpoints"
    )
  _check_workdir(workdir)
  with contextlib.ExitStack() as cleanup:
    cleanup.callback(lock_for_job(workdir).release)
    return _train(config, workdir, cleanup, eval_hooks)


def _train(
    config: ml_collections.ConfigDict,
    workdir: storage.PathLike,
    cleanup: contextlib.ExitStack,
    eval_hooks: Sequence[Any],
) -> TrainState:
  """train() in a locked workdir; `cleanup` undoes what it sets up on any way out."""
  mesh = make_mesh(config)
  model = MaskedDiffusionLM(config)
  tx = make_optimizer(config)
  # Data first: a bad task, vocabulary or preference file fails here, before parameters are
  # allocated and before anything is written in the workdir.
  data_sharding = batch_sharding(mesh, axis_rules(config))
  source = make_source(config, model, mesh, data_sharding, workdir)
  abstract, shardings = state_shardings(config, model, tx, mesh)
  _check_free_space(workdir, abstract)
  _warn_schedule(config)
  # Without a checkpoint folder there is nothing to restore, and the state is built before one is
  # made: a refused train.init_from leaves no empty checkpoints/ behind.
  restorable = checkpoint_dir(workdir).exists()
  checkpointer = Checkpointer(workdir, config) if restorable else None
  state = _restore(workdir, checkpointer, abstract) if restorable else None
  source.place(shardings.params)
  if (
      state is None and source.frozen is not None
  ):  # post-training: the policy starts as the reference
    state = jax.jit(lambda p: TrainState.fresh(p, tx.init(p)), out_shardings=shardings)(
        source.frozen
    )
  elif state is None:
    state, shardings = create_train_state(config, model, tx, mesh)
  elif config.train.init_from:
    logging.info(
        "train.init_from=%s ignored: the run resumes from its checkpoint", config.train.init_from
    )
  checkpointer = checkpointer or Checkpointer(workdir, config)
  start = int(state.step)
  block_size = _block_size_from(config, workdir, start, checkpointer.latest_step() is not None)
  warn_replicated(state.params, shardings.params)
  num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state.params))
  logging.info(
      "model: %s parameters; mesh %s over %d devices",
      f"{num_params:,}",
      dict(mesh.shape),
      mesh.size,
  )

  writer = MetricWriter(workdir, Accounting.from_config(config))
  write_run_description(workdir, config, num_params)
  _keep_tokenizer(config, workdir)
  if config.data.vocabulary == "byte" and config.data.task in CORPUS_FILES:
    logging.info(
        "unigram entropy of the training bytes: %.3f bits/byte (a context-free model's floor)",
        unigram_entropy_bits(config.data.task),
    )
  train_step = make_train_step(
      config,
      model,
      tx,
      mesh,
      shardings,
      source.loss,
      None if source.frozen is None else shardings.params,
  )
  tokens_per_step = config.data.batch_size * config.data.sequence_length
  width = source.width if config.posttrain.method == "grpo" else 0  # the rollouts' prompts
  flops_per_step, peak = model_flops_per_step(config, width), peak_flops(mesh.devices.flat[0])
  logging.info(
      "model FLOPs per step %.3e (6 N_matmul + attention per token); peak per device: %s",
      flops_per_step,
      "unknown (no MFU)" if peak is None else f"{peak:.3e}",
  )
  watcher = cleanup.enter_context(PreemptionWatcher(checkpointer))

  batches = source.train_batches(start)
  last_time, last_step, last_skipped = time.time(), start, int(state.skipped)
  # The last step and its nonfinite flag, read one step late: no stall.
  previous_step, previous_nonfinite = None, None
  profiler = _Profiler(config, workdir)
  step = start
  while step < config.train.num_steps:
    if _block_size(config, step) != block_size:
      logging.info(
          "diffusion.block_size_schedule: block size %d -> %d at step %d",
          block_size,
          _block_size(config, step),
          step,
      )
      block_size = _block_size(config, step)
    profiler.before(step)
    batch = source.prepare(next(batches), state.params)
    state, metrics = train_step(state, batch, step, source.frozen)
    step += 1
    profiler.after(step, metrics)
    if (
        previous_step is not None
        and config.train.nonfinite == "rollback"
        and bool(previous_nonfinite)
    ):
      batches.close()
      state = _rollback(config, checkpointer, abstract, previous_step, writer, state)
      step = int(state.step)
      batches = source.train_batches(step)
      previous_step = None
      continue
    previous_step, previous_nonfinite = step, metrics["nonfinite"]
    if step % config.train.log_every == 0 or step == config.train.num_steps or step == start + 1:
      scalars = {
          k: float(v) if np.ndim(v) == 0 else np.asarray(v)
          for k, v in jax.device_get(metrics).items()
      }
      scalars["skipped"] = float(state.skipped)
      if block_size is not None:
        scalars["block_size"] = float(block_size)  # the last update's
      now = time.time()
      if step != start + 1:  # the first step's time is mostly compilation
        step_seconds = (now - last_time) / (step - last_step)
        scalars["tokens_per_s"] = tokens_per_step / step_seconds
        scalars["tflops_per_device"] = flops_per_step / step_seconds / mesh.size / 1e12
        if peak is not None:
          scalars["mfu"] = flops_per_step / step_seconds / (mesh.size * peak)
      if scalars["skipped"] > last_skipped:
        logging.warning(
            "%d updates skipped so far for a non-finite loss or gradient", scalars["skipped"]
        )
      last_time, last_step, last_skipped = now, step, scalars["skipped"]
      writer.write(step, scalars)
    if step % config.train.eval_every == 0 or step == config.train.num_steps:
      writer.write(step, source.evaluate(state.params), prefix="eval/")
      for hook in eval_hooks:
        writer.write(step, hook(step, state.params, workdir), prefix="eval/")
    if watcher.reached(step):
      checkpointer.save(step, state, force=True)
      checkpointer.wait()
      logging.warning(
          "preempted: saved step %d in %s; rerun the same command to resume", step, workdir
      )
      break
    checkpointer.save(step, state, force=step == config.train.num_steps)
  watcher.close()
  profiler.close()
  batches.close()
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if start >= config.train.num_steps:
    logging.info("nothing to do: the checkpoint in %s is already at step %d", workdir, start)
  return state


class _Profiler:
  """A jax.profiler trace of the steps in train.profile_steps, for TensorBoard's profile tab."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: storage.PathLike):
    self._range = profile_range(config.train.profile_steps) if config.train.profile_steps else None
    self._dir = storage.path(workdir) / "profile"
    self._active = False
    self._trace_dir = ""

  def before(self, step: int) -> None:
    if self._range is not None and step == self._range[0] and not self._active:
      # The profiler writes local files; a trace for object storage is copied there at the end.
      remote = storage.is_remote(self._dir)
      self._trace_dir = tempfile.mkdtemp(prefix="llada_profile_") if remote else str(self._dir)
      jax.profiler.start_trace(self._trace_dir)
      self._active = True

  def after(self, step: int, metrics: Any) -> None:
    if self._active and step >= self._range[1]:
      jax.block_until_ready(metrics)
      self._stop()
      logging.info("profile of steps %d..%d written to %s", self._range[0] + 1, step, self._dir)

  def close(self) -> None:
    """Ends a trace the run stopped inside of (preemption, last step before b)."""
    if self._active:
      self._stop()

  def _stop(self) -> None:
    jax.profiler.stop_trace()
    self._active = False
    if storage.is_remote(self._dir):
      for local in pathlib.Path(self._trace_dir).rglob("*"):
        if local.is_file():
          target = self._dir / str(local.relative_to(self._trace_dir))
          target.parent.mkdir(parents=True, exist_ok=True)
          storage.copy_file(local, target)
      shutil.rmtree(self._trace_dir, ignore_errors=True)


def _config_of_run(
    config: ml_collections.ConfigDict, workdir: storage.PathLike
) -> ml_collections.ConfigDict:
  """The config a run trains with: `config` with the vocabulary the parameters were trained on
  (VOCABULARY_KEYS), read before anything is built. A workdir with checkpoints resumes with the
  newest one's (`_resumed_vocabulary`; train.init_from is then ignored); a new run with
  train.init_from takes the folder's (`config_with_init_from`, which refuses another model).

  The logit alignment "auto" becomes the concrete one the run trains with (`alignment.resolve`,
  given the checkpoint it resumes), so that stored configs always name it.

  Raises:
    ConfigError, CheckpointError: a train.init_from folder that is missing, holds another model
      or cannot be read; a stored config this version cannot use.
  """
  if config.posttrain.method:  # the policy is the reference's network, resumed or not
    config = config_with_reference(config)
  stored = origin = newest_stored_config(workdir)
  if stored is not None:
    config = _resumed_vocabulary(config, stored, workdir)
  elif config.train.init_from:
    config = config_with_init_from(config)
    origin = init_from_workdir(config)  # a workdir's model keeps its alignment (or shifts an ARM)
  config = ml_collections.ConfigDict(config.to_dict())
  config.diffusion.logit_alignment = alignment.resolve(config, origin)
  if (
      stored is not None
      and not objective_of(stored).causal  # an AR checkpoint's start is resolve's to choose
      and alignment.resolve(stored) != config.diffusion.logit_alignment
  ):
    logging.warning(
        "diffusion.logit_alignment=%s is not the checkpoint's %s: --workdir=%s resumes reading "
        "each token from other logits than it was trained with",
        config.diffusion.logit_alignment,
        alignment.resolve(stored),
        workdir,
    )
  return config


def _resumed_vocabulary(
    config: ml_collections.ConfigDict,
    stored: ml_collections.ConfigDict,
    workdir: storage.PathLike,
) -> ml_collections.ConfigDict:
  """A copy of `config` with the vocabulary of the checkpoint it resumes (`stored`): its
  vocabulary, token ids and vocab_size, and for a tokenizer vocabulary the tokenizer.json kept in
  the workdir (else the stored path, if that file exists); what differs from `config` is named in
  one warning. A stored tokenizer vocabulary whose file is nowhere (a folder imported without one)
  keeps the config's vocabulary and tokenizer."""
  from llada_jax.loading import TOKENIZER_FILE  # pylint: disable=g-import-not-at-top

  keys = list(VOCABULARY_KEYS)
  stored = ml_collections.ConfigDict(stored.to_dict())
  if stored.data.vocabulary in TOKENIZER_VOCABULARIES:
    candidates = [storage.path(workdir) / TOKENIZER_FILE]
    if storage.is_remote(stored.data.tokenizer) or os.path.isabs(stored.data.tokenizer):
      candidates.append(storage.path(stored.data.tokenizer))
    found = [c for c in candidates if c.is_file()]
    if found:
      stored.data.tokenizer = storage.cached_local_copy(found[0])
    else:
      keys = [k for k in keys if not k.startswith("data.")]
  out = ml_collections.ConfigDict(config.to_dict())
  changed = []
  for key in keys:
    section, field = key.split(".")
    mine, theirs = out[section][field], stored[section][field]
    same_file = (
        key == "data.tokenizer"
        and all(t and storage.path(t).is_file() for t in (mine, theirs))
        and storage.path(mine).read_bytes() == storage.path(theirs).read_bytes()
    )
    if mine != theirs and not same_file:
      changed.append(f"{key}={theirs!r} (the config has {mine!r})")
    out[section][field] = theirs
  if changed:
    logging.warning(
        "--workdir=%s resumes with the vocabulary of its checkpoint: %s",
        workdir,
        ", ".join(changed),
    )
  return out


def _restore(
    workdir: storage.PathLike, checkpointer: Checkpointer, abstract: TrainState
) -> TrainState | None:
  """The newest restorable checkpoint's state, None for a workdir without checkpoints.

  Raises CheckpointError if the checkpoints hold another model or none of them restores: a run
  never starts over in a workdir that holds checkpoints.
  """
  if checkpointer.latest_step() is None:
    return None
  step, state = checkpointer.restore_newest(abstract)
  logging.info("resumed from the checkpoint at step %d in %s", step, workdir)
  return state


def _block_size(config: ml_collections.ConfigDict, step: int) -> int | None:
  """The block size update `step` (0-based) of a block objective trains with; None for others."""
  return block_size_at(config, step) if objective_of(config).blocks else None


def _block_size_from(
    config: ml_collections.ConfigDict, workdir: storage.PathLike, start: int, resumed: bool
) -> int | None:
  """The block size of update `start`; a resumed run whose checkpoint was trained with another one
  (the stored config's, at the last update it ran) says so in one INFO line."""

  def describe(size: int | None, config: ml_collections.ConfigDict) -> str:
    return f"block size {size}" if size is not None else f"objective {config.diffusion.objective}"

  size = _block_size(config, start)
  if resumed and start > 0:
    stored = load_config(workdir, start)
    before = _block_size(stored, start - 1)
    if before != size:
      logging.info(
          "block size changes on resume: the checkpoint at step %d was trained with %s (its "
          "config), this run trains with %s",
          start,
          describe(before, stored),
          describe(size, config),
      )
  return size


def _rollback(
    config: ml_collections.ConfigDict,
    checkpointer: Checkpointer,
    abstract: TrainState,
    bad_step: int,
    writer: MetricWriter,
    current: TrainState,
) -> TrainState:
  """Restores the last checkpoint with the learning rate cut (LLaDA's recovery at 1.2T tokens).

  The count and the cut continue from `current`, the diverged state, not from the checkpoint: a
  divergence that comes back before the next save rolls back again at a lower rate, and
  train.max_rollbacks ends it (taken from the checkpoint, they would repeat forever)."""
  rollbacks = int(current.rollbacks) + 1
  lr_scale = float(current.lr_scale) * config.train.rollback_lr_factor
  checkpointer.wait()
  if checkpointer.latest_step() is None:
    raise TrainingDiverged(
        f"non-finite loss or gradient at step {bad_step} and no checkpoint to "
        "roll back to; lower optimizer.peak_lr or checkpoint.save_every"
    )
  if rollbacks > config.train.max_rollbacks:
    raise TrainingDiverged(
        f"non-finite loss or gradient at step {bad_step} after "
        f"train.max_rollbacks={config.train.max_rollbacks} rollbacks"
    )
  _, state = checkpointer.restore_newest(abstract)
  state = state.replace(
      lr_scale=jax.device_put(np.float32(lr_scale), state.lr_scale.sharding),
      rollbacks=jax.device_put(np.int32(rollbacks), state.rollbacks.sharding),
  )
  logging.warning(
      "non-finite loss or gradient at step %d: rolled back to step %d, learning rate "
      "x %g (rollback %d of %d)",
      bad_step,
      int(state.step),
      lr_scale,
      rollbacks,
      config.train.max_rollbacks,
  )
  writer.write(
      bad_step,
      {"rollback_to_step": float(state.step), "lr_scale": lr_scale, "rollbacks": float(rollbacks)},
      prefix="events/",
  )
  return state


def _check_free_space(workdir: storage.PathLike, abstract: TrainState) -> None:
  """Fails before training when the workdir's disk cannot hold one more checkpoint (local disks;
  a bucket's space is not checked)."""
  if storage.is_remote(workdir):
    return
  needed = sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(abstract))
  free = shutil.disk_usage(workdir).free
  if free < needed:
    raise ConfigError(
        f"--workdir={workdir} has {free / 1e9:.2f} GB free; one checkpoint of this "
        f"model needs {needed / 1e9:.2f} GB"
    )


def _warn_schedule(config: ml_collections.ConfigDict) -> None:
  """Warns about a learning-rate schedule that cannot run as configured."""
  o, steps = config.optimizer, config.train.num_steps
  if o.warmup_steps > steps:
    logging.warning(
        "train.num_steps=%d < optimizer.warmup_steps=%d: the learning rate never "
        "reaches optimizer.peak_lr=%g (it ends at %.3g)",
        steps,
        o.warmup_steps,
        o.peak_lr,
        o.peak_lr * steps / o.warmup_steps,
    )


def _keep_tokenizer(config: ml_collections.ConfigDict, workdir: storage.PathLike) -> None:
  """Copies a "llada_hf" or "hf" run's tokenizer.json into the workdir (process 0), so that its
  checkpoints decode on a machine without the original file (`load_model` looks there)."""
  from llada_jax.loading import TOKENIZER_FILE  # pylint: disable=g-import-not-at-top

  source = storage.path(config.data.tokenizer) if config.data.tokenizer else None
  target = storage.path(workdir) / TOKENIZER_FILE
  if (
      jax.process_index() == 0
      and config.data.vocabulary in TOKENIZER_VOCABULARIES
      and source is not None
      and source.is_file()
      and source != target
  ):
    storage.copy_file(source, target)


def _check_workdir(workdir: storage.PathLike) -> None:
  """Fails before any compile if the workdir cannot be created or written (for a bucket: if a
  probe object cannot be written, e.g. a missing bucket or missing credentials)."""
  path = storage.path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    if storage.is_remote(path):
      probe = path / f".write_probe_{jax.process_index()}"
      probe.write_text("")
      probe.unlink()
  except Exception as e:  # pylint: disable=broad-exception-caught  (OSError, gcsfs, auth errors)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ConfigError(f"--workdir={workdir} cannot be created or written: {first}") from None
  if not storage.is_remote(path) and not os.access(path, os.W_OK):
    raise ConfigError(f"--workdir={workdir} is not writable")
