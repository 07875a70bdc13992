"""Orbax checkpoints in `<workdir>/checkpoints`: the train state plus the config that made it.

Saves are asynchronous (training continues while the previous state is written); keeping the config
in every checkpoint makes a workdir self-describing, so `sample` needs nothing but its path.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from llada_jax import config as config_lib
from llada_jax.errors import CheckpointError


# Model fields that change the parameter tree; the others (dtype, remat, ...) may change on resume.
PARAMETER_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size",
                    "scan_layers")


def checkpoint_dir(workdir: str | pathlib.Path) -> pathlib.Path:
  return pathlib.Path(workdir).absolute() / "checkpoints"


class Checkpointer:
  """Saves every config.checkpoint.save_every steps; keeps the last config.checkpoint.keep and
  those at multiples of keep_every. Orbax writes to a temporary folder and renames it when the save
  is complete, so a crash mid-save leaves the previous checkpoints as they were."""

  def __init__(self, workdir: str | pathlib.Path, config: ml_collections.ConfigDict):
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=config.checkpoint.save_every, max_to_keep=config.checkpoint.keep,
        keep_period=config.checkpoint.keep_every or None,
        enable_async_checkpointing=config.checkpoint.async_save, create=True)
    self._config = config
    self._manager = ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                                          item_names=("state", "config"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state: Any, force: bool = False) -> bool:
    """Starts saving `state` at `step` if the interval says so (or force); returns whether it did."""
    return self._manager.save(step, force=force, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        config=ocp.args.JsonSave(json.loads(config_lib.to_json(self._config)))))

  def reached_preemption(self, step: int) -> bool:
    """True on every process once the cluster announced a preemption (multi-process jobs)."""
    return self._manager.reached_preemption(step)

  def restore_latest_valid(self, workdir: str | pathlib.Path,
                           abstract_state: Any) -> tuple[int, Any] | None:
    """(step, state) of the newest checkpoint that restores. Broken newer ones (a damaged or
    deleted file) are reported and moved aside to `<step>.broken`, never deleted, so that new saves
    of their steps can happen. None if no checkpoint restores."""
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        load_config(workdir, step)
        return step, self.restore(step, abstract_state)
      except Exception as e:  # pylint: disable=broad-exception-caught
        broken = checkpoint_dir(workdir) / f"{step}.broken"
        logging.warning("checkpoint %d in %s cannot be restored (%s); moved to %s, trying the "
                        "one before", step, workdir, str(e).splitlines()[0][:200], broken)
        if jax.process_index() == 0:
          (checkpoint_dir(workdir) / str(step)).rename(broken)
        self._manager.reload()
    return None

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores the state at `step` into the shardings carried by `abstract_state`."""
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def latest_step(workdir: str | pathlib.Path) -> int:
  """The newest complete checkpoint step of a workdir; CheckpointError if there is none."""
  path = checkpoint_dir(workdir)
  steps = ocp.utils.checkpoint_steps(path) if path.is_dir() else []
  if not steps:
    raise CheckpointError(f"--workdir={workdir} holds no checkpoint (looked in {path}); train "
                          "first with `python -m llada_jax.train --workdir=...`")
  return max(steps)


def load_config(workdir: str | pathlib.Path, step: int | None = None) -> ml_collections.ConfigDict:
  """The config stored with a checkpoint (the latest if step is None)."""
  step = latest_step(workdir) if step is None else step
  path = checkpoint_dir(workdir) / str(step) / "config" / "metadata"
  try:
    text = path.read_text()
  except OSError as e:
    raise CheckpointError(f"checkpoint {step} in {workdir} has no readable config: {e}") from None
  return config_lib.from_json(text)


def load_state(workdir: str | pathlib.Path, step: int, abstract_state: Any) -> Any:
  """Restores one checkpoint's train state without a manager (read-only use)."""
  path = checkpoint_dir(workdir) / str(step) / "state"
  with ocp.StandardCheckpointer() as checkpointer:
    try:
      return checkpointer.restore(path, abstract_state)
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore {path}: {e}") from None


def load_params(workdir: str | pathlib.Path, step: int, abstract_params: Any) -> Any:
  """Restores only the parameters of a checkpoint (the optimizer state is never read), into the
  shardings carried by `abstract_params`: what sampling and export need, at a third of the memory."""
  path = checkpoint_dir(workdir) / str(step) / "state"
  item = {"params": abstract_params}
  args = ocp.args.PyTreeRestore(item=item, partial_restore=True,
                                restore_args=ocp.checkpoint_utils.construct_restore_args(item))
  with ocp.PyTreeCheckpointer() as checkpointer:
    try:
      params = checkpointer.restore(path, args=args)["params"]
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"cannot restore the parameters in {path}: {e}") from None
  # A partial restore hands back the abstract leaf for a name the checkpoint does not hold.
  missing = [jax.tree_util.keystr(key) for key, leaf in jax.tree_util.tree_leaves_with_path(params)
             if isinstance(leaf, jax.ShapeDtypeStruct)]
  if missing:
    raise CheckpointError(f"cannot restore the parameters in {path}: it holds no {missing[0]}")
  return params


def architecture_mismatch(saved: ml_collections.ConfigDict,
                          wanted: ml_collections.ConfigDict) -> list[str]:
  """The parameter-shaping model fields in which a stored config differs from the wanted one."""
  return [f"model.{k}={wanted.model[k]!r} but the checkpoint has {saved.model[k]!r}"
          for k in PARAMETER_FIELDS if saved.model[k] != wanted.model[k]]
