"""Orbax checkpoints in `<workdir>/checkpoints`: the train state plus the config that made it.

Saves are asynchronous (training continues while the previous state is written); keeping the config
in every checkpoint makes a workdir self-describing, so `sample` needs nothing but its path.

Every command restores through `restore_newest`: the newest step that can be read, after warning
about each newer one that cannot (a deleted or truncated file), and a one-line CheckpointError when
the workdir holds a different model or no step in it can be read.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Callable, Iterator

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from llada_jax import config as config_lib
from llada_jax import storage
from llada_jax.errors import CheckpointError, ConfigError, SaveFailed

# Model fields that change the parameter tree; the others (dtype, remat, ...) may change on resume.
PARAMETER_FIELDS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "mlp_hidden_size",
    "scan_layers",
    "qk_norm",
    "tie_embeddings",
    "moe.num_experts",
)
# ... and those that change it only when the model has experts (moe.num_experts > 0).
EXPERT_PARAMETER_FIELDS = (
    "moe.expert_hidden_size",
    "moe.num_shared_experts",
    "moe.first_k_dense_replace",
)


def checkpoint_dir(workdir: storage.PathLike) -> storage.Path:
  """`<workdir>/checkpoints` (a URL stays one: gs://bucket/run/checkpoints)."""
  return storage.path(workdir) / "checkpoints"


class Checkpointer:
  """Saves every config.checkpoint.save_every steps; keeps the last config.checkpoint.keep and
  those at multiples of keep_every. Orbax writes to a temporary folder and renames it when the save
  is complete, so a crash mid-save leaves the previous checkpoints as they were."""

  def __init__(self, workdir: storage.PathLike, config: ml_collections.ConfigDict):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint.save_every,
        max_to_keep=config.checkpoint.keep,
        keep_period=config.checkpoint.keep_every or None,
        enable_async_checkpointing=config.checkpoint.async_save,
        create=True,
    )
    self._workdir = workdir
    self._config = config
    self._pending: int | None = None  # the step of an asynchronous save not known to be written
    self._manager = ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("state", "config")
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Starts saving `state` at `step` if the interval says so (or force); returns whether it did.

    Raises SaveFailed if this save, or the asynchronous one before it, could not be written
    (Orbax reports a background failure at the next save or wait)."""
    with self._reporting_failures(step):
      started = self._manager.save(
          step,
          force=force,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              config=ocp.args.JsonSave(json.loads(config_lib.to_json(self._config))),
          ),
      )
    if started:
      self._pending = step
    return started

  @contextlib.contextmanager
  def _reporting_failures(self, step: int | None) -> Iterator[None]:
    """Turns a failed write (storage down, disk full) into one SaveFailed line that names the
    step and the newest complete checkpoint to resume from."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-exception-caught  (TensorStore, gcsfs, OS)
      failed = self._pending if self._pending is not None else step
      try:
        newest = max(_complete_steps(self._workdir), default=None)
      except Exception:  # pylint: disable=broad-exception-caught  (storage still unreachable)
        newest = "unknown (storage unreachable)"
      raise SaveFailed(
          f"saving checkpoint {failed} to {checkpoint_dir(self._workdir)} failed: "
          f"{_first_line(e)}; the newest complete checkpoint is {newest}: rerun the "
          "same command to resume from it"
      ) from e

  def reached_preemption(self, step: int) -> bool:
    """True on every process once the cluster announced a preemption (multi-process jobs)."""
    return self._manager.reached_preemption(step)

  def restore_newest(self, abstract_state: Any) -> tuple[int, Any]:
    """(step, state) of the newest checkpoint that restores into `abstract_state`'s shardings.

    Damaged newer steps are moved aside to `<step>.broken` (never deleted), so that this run can
    save those steps again. Raises CheckpointError if the workdir holds no checkpoint, holds
    another model than this Checkpointer's config, or holds none that can be restored.
    """
    try:
      step, _, state = restore_newest(
          self._workdir,
          lambda _: abstract_state,
          params_only=False,
          read_only=False,
          wanted=self._config,
      )
    finally:
      self._manager.reload()
    return step, state

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are written; SaveFailed if one could not be."""
    with self._reporting_failures(None):
      self._manager.wait_until_finished()
    self._pending = None

  def close(self) -> None:
    self._manager.close()


class _Damaged(Exception):
  """A step whose files cannot be read (deleted, truncated): skipped for an older one, unlike a
  step that reads fine but holds another model."""


def _first_line(error: BaseException) -> str:
  """The first line of the error's root cause (TensorStore's, under Orbax's wrapper)."""
  while error.__cause__ is not None:
    error = error.__cause__
  lines = str(error).strip().splitlines()
  return lines[0][:200] if lines else type(error).__name__


def _complete_steps(workdir: storage.PathLike) -> list[int]:
  """The steps Orbax finished writing (committed) in a workdir, in no particular order."""
  path = checkpoint_dir(workdir)
  return ocp.utils.checkpoint_steps(path) if path.is_dir() else []


def _steps(workdir: storage.PathLike) -> list[int]:
  """The complete checkpoint steps of a workdir, newest first; CheckpointError if there is none."""
  path = checkpoint_dir(workdir)
  steps = _complete_steps(workdir)
  if not steps:
    raise CheckpointError(
        f"--workdir={workdir} holds no checkpoint (looked in {path}); train "
        "first with `python -m llada_jax.train --workdir=...`"
    )
  return sorted(steps, reverse=True)


def latest_step(workdir: storage.PathLike) -> int:
  """The newest complete checkpoint step of a workdir; CheckpointError if there is none."""
  return _steps(workdir)[0]


def saved_steps(workdir: storage.PathLike) -> list[int]:
  """The complete checkpoint steps of a workdir, ascending; CheckpointError if it has none."""
  return sorted(_steps(workdir))


def _stored_config(workdir: storage.PathLike, step: int) -> ml_collections.ConfigDict:
  """The config saved with `step`: _Damaged if its file is missing or cut short, CheckpointError
  if it reads but this version of the code cannot use it (an unknown field, a bad value)."""
  path = checkpoint_dir(workdir) / str(step) / "config" / "metadata"
  try:
    text = path.read_text()
    json.loads(text)
  except (OSError, ValueError) as e:
    raise _Damaged(f"its config cannot be read: {_first_line(e)}") from None
  try:
    return config_lib.from_json(text)
  except ConfigError as e:
    raise CheckpointError(
        f"checkpoint {step} in {workdir} has a config this version cannot use: {e}"
    ) from None


def load_config(workdir: storage.PathLike, step: int | None = None) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint (the latest if step is None); CheckpointError if there
  is no checkpoint or its config cannot be read."""
  step = latest_step(workdir) if step is None else step
  try:
    return _stored_config(workdir, step)
  except _Damaged as e:
    raise CheckpointError(f"checkpoint {step} in {workdir} has no readable config: {e}") from None


def newest_stored_config(workdir: storage.PathLike) -> ml_collections.ConfigDict | None:
  """The config of the newest checkpoint whose config reads (a damaged newer one skipped), None
  for a workdir without checkpoints; CheckpointError if it reads but this version cannot use it."""
  for step in sorted(_complete_steps(workdir), reverse=True):
    try:
      return _stored_config(workdir, step)
    except _Damaged:
      continue
  return None


def _key_name(key: Any) -> str:
  for attribute in ("key", "idx", "name"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...] | None]:
  """Dotted leaf path -> shape; dataclass, named-tuple and dict nodes spell their keys alike."""
  shapes = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    shape = getattr(leaf, "shape", None)
    shapes[".".join(_key_name(k) for k in path)] = None if shape is None else tuple(shape)
  return shapes


def _check_stored_tree(workdir: storage.PathLike, step: int, target: Any) -> None:
  """Compares the leaves and shapes `step` stores (under the top-level names of `target`) with
  `target`: _Damaged if the checkpoint's tree cannot be read, CheckpointError if it differs."""
  path = checkpoint_dir(workdir) / str(step) / "state"
  # The item's tree metadata alone, from its handler: a Checkpointer's metadata() also reads step
  # metadata from `path`, where the manager does not write it (it is in the step's folder), and
  # Orbax warns "Metadata file does not exist" on every read.
  handler = ocp.StandardCheckpointHandler()
  try:
    stored_tree = handler.metadata(path)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _Damaged(f"its tree metadata cannot be read: {_first_line(e)}") from None
  finally:
    handler.close()
  if stored_tree is None:
    raise _Damaged(f"its tree metadata in {path} cannot be read")
  wanted = _leaf_shapes(target)
  tops = {name.split(".")[0] for name in wanted}
  stored = {k: v for k, v in _leaf_shapes(stored_tree).items() if k.split(".")[0] in tops}
  for name in sorted(set(stored) | set(wanted)):
    if name not in stored:
      problem = f"no {name}"
    elif name not in wanted:
      problem = f"{name}, which this config does not have"
    elif None not in (stored[name], wanted[name]) and stored[name] != wanted[name]:
      problem = f"{name} of shape {stored[name]} where this config needs {wanted[name]}"
    else:
      continue
    what = "optimizer state" if name.startswith("opt_state") else "model"
    raise CheckpointError(
        f"--workdir={workdir} holds a different {what}: checkpoint {step} has "
        f"{problem}; use a new workdir or the stored settings"
    )


def _restore_state(path: storage.Path, abstract_state: Any) -> Any:
  with ocp.StandardCheckpointer() as checkpointer:
    return checkpointer.restore(path, abstract_state)


def _restore_params(path: storage.Path, abstract_params: Any) -> Any:
  """The parameters alone of the train state stored at `path`, placed as `abstract_params` say."""
  item = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(
      item=item,
      partial_restore=True,
      restore_args=ocp.checkpoint_utils.construct_restore_args(item),
  )
  with ocp.PyTreeCheckpointer() as checkpointer:
    params = checkpointer.restore(path, args=args)["params"]
  # A partial restore hands back the abstract leaf for a name the checkpoint does not hold.
  missing = [
      jax.tree_util.keystr(key)
      for key, leaf in jax.tree_util.tree_leaves_with_path(params)
      if isinstance(leaf, jax.ShapeDtypeStruct)
  ]
  if missing:
    raise CheckpointError(f"it holds no {missing[0]}")
  return params


def restore_newest(
    workdir: storage.PathLike,
    abstract: Callable[[ml_collections.ConfigDict], Any],
    *,
    params_only: bool,
    read_only: bool,
    wanted: ml_collections.ConfigDict | None = None,
) -> tuple[int, ml_collections.ConfigDict, Any]:
  """(step, stored config, restored tree) of the newest checkpoint of `workdir` that restores.

  abstract(stored config) gives the tree to restore into, whose ShapeDtypeStructs carry the
  shardings: the whole train state, or with params_only the parameters alone (the optimizer state
  is then never read). Each step is checked before its tensors are read: its config must read,
  match `wanted` in the parameter-shaping model fields (when given) and store the leaves and shapes
  of the abstract tree. A step whose files cannot be read is damaged: a warning names it and the
  next older one is tried. Once a step restores, the damaged newer ones are moved aside to
  `<step>.broken` unless read_only (a trainer must save those steps again); nothing is moved when
  no step restores.

  Raises CheckpointError (one line) if the workdir holds no checkpoint, if a readable step holds a
  different model or a config this version cannot use, or if no step can be restored.
  """
  damaged = []
  for step in _steps(workdir):
    try:
      config, tree = _restore_step(workdir, step, abstract, params_only, wanted)
    except _Damaged as e:
      logging.warning(
          "checkpoint %d in %s cannot be restored (%s); trying the one before", step, workdir, e
      )
      damaged.append((step, str(e)))
      continue
    if not read_only and jax.process_index() == 0:
      for bad, _ in damaged:
        _move_aside(workdir, bad)
    return step, config, tree
  newest, reason = damaged[0]
  raise CheckpointError(
      f"--workdir={workdir}: no checkpoint in it can be restored (newest: step "
      f"{newest}: {reason})"
  )


def _restore_step(
    workdir: storage.PathLike,
    step: int,
    abstract: Callable[[ml_collections.ConfigDict], Any],
    params_only: bool,
    wanted: ml_collections.ConfigDict | None,
) -> tuple[ml_collections.ConfigDict, Any]:
  """restore_newest's work on one step: _Damaged if it cannot be read, CheckpointError if it reads
  but holds another model."""
  config = _stored_config(workdir, step)
  mismatch = [] if wanted is None else architecture_mismatch(config, wanted)
  if mismatch:
    raise CheckpointError(
        f"--workdir={workdir} holds a different model: {mismatch[0]}; use a new "
        "workdir or the stored model settings"
    )
  target = abstract(config)
  _check_stored_tree(workdir, step, {"params": target} if params_only else target)
  path = checkpoint_dir(workdir) / str(step) / "state"
  try:
    return config, _restore_params(path, target) if params_only else _restore_state(path, target)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise _Damaged(f"its tensors cannot be read: {_first_line(e)}") from None


def _move_aside(workdir: storage.PathLike, step: int) -> None:
  """Renames a damaged step to `<step>.broken` (`<step>.broken-2`, ... if that name is taken)."""
  root = checkpoint_dir(workdir)
  broken, n = root / f"{step}.broken", 1
  while broken.exists():
    n += 1
    broken = root / f"{step}.broken-{n}"
  (root / str(step)).rename(broken)
  logging.warning("moved the damaged checkpoint %d aside to %s", step, broken)


def load_state(workdir: storage.PathLike, step: int, abstract_state: Any) -> Any:
  """Restores one checkpoint's train state without a manager; CheckpointError if it cannot."""
  path = checkpoint_dir(workdir) / str(step) / "state"
  try:
    return _restore_state(path, abstract_state)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointError(f"cannot restore {path}: {_first_line(e)}") from None


def load_params(workdir: storage.PathLike, step: int, abstract_params: Any) -> Any:
  """Restores only the parameters of a checkpoint (the optimizer state is never read), into the
  shardings carried by `abstract_params`: what sampling and export need, at a third of the memory.
  Raises CheckpointError if they cannot be restored."""
  path = checkpoint_dir(workdir) / str(step) / "state"
  try:
    return _restore_params(path, abstract_params)
  except Exception as e:  # pylint: disable=broad-exception-caught
    raise CheckpointError(f"cannot restore the parameters in {path}: {_first_line(e)}") from None


def architecture_mismatch(
    saved: ml_collections.ConfigDict, wanted: ml_collections.ConfigDict
) -> list[str]:
  """The parameter-shaping model fields (PARAMETER_FIELDS; EXPERT_PARAMETER_FIELDS when both
  have experts) in which a stored config differs from the wanted one, as
  "model.<field>=<wanted> but the checkpoint has <stored>"."""
  experts = saved.model.moe.num_experts and wanted.model.moe.num_experts
  fields = PARAMETER_FIELDS + (EXPERT_PARAMETER_FIELDS if experts else ())
  return [
      f"model.{k}={wanted.model[k]!r} but the checkpoint has {saved.model[k]!r}"
      for k in fields
      if saved.model[k] != wanted.model[k]
  ]
