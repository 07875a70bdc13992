"""Workdir <-> HuggingFace folder conversion (the functions behind `llada-convert`, free of flags).

from_hf writes a step-0 Orbax checkpoint (parameters plus a fresh optimizer state) that
`llada-sample` reads and `llada-train` fine-tunes from; to_hf writes config.json and safetensors
that the official PyTorch loader reads (an ARM: a Llama folder for transformers'
LlamaForCausalLM), recording what the format has no field for (objective, block size, logit
alignment, vocabulary) where from_hf reads it back.
"""

from __future__ import annotations

import pathlib
import tempfile

from llada_jax import storage
from llada_jax.errors import ConfigError


def from_hf(
    hf_dir: str, workdir: str, dtype: str, mask_id: int | None = None, eos_id: int | None = None
) -> int:
  """Imports an HF folder (LLaDA, or Llama/Mistral as the causal model: see hf_format) into a
  workdir; returns the number of parameters."""
  import jax  # pylint: disable=g-import-not-at-top

  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import TrainState, state_shardings  # pylint: disable=g-import-not-at-top

  from llada_jax.interop.formats import hf_format  # pylint: disable=g-import-not-at-top

  read_config, load = hf_format(hf_dir, mask_id, eos_id)
  config = read_config(hf_dir)
  config.model.param_dtype = dtype
  tx = make_optimizer(config)
  _, shardings = state_shardings(config, MaskedDiffusionLM(config), tx, make_mesh(config))
  config, params = load(hf_dir, dtype=dtype, base=config, shardings=shardings.params)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  state = TrainState.fresh(params, opt_state)
  if config.data.tokenizer:  # kept with the workdir, so that it decodes on any machine
    from llada_jax.loading import TOKENIZER_FILE  # pylint: disable=g-import-not-at-top

    storage.path(workdir).mkdir(parents=True, exist_ok=True)
    storage.copy_file(config.data.tokenizer, storage.path(workdir) / TOKENIZER_FILE)
    config.data.tokenizer = TOKENIZER_FILE
  checkpointer = Checkpointer(workdir, config)
  checkpointer.save(0, state, force=True)
  checkpointer.wait()
  checkpointer.close()
  return sum(x.size for x in jax.tree.leaves(params))


def to_hf(workdir: str, out: str, dtype: str, max_shard_size: str) -> list[str]:
  """Exports the newest restorable checkpoint of a workdir as an HF folder (`save_hf`: an ARM as
  a Llama folder, an MDM or block model as a LLaDA one; local or a URL: the files are then written
  locally and uploaded one by one, and the weight files of an earlier export there removed);
  returns the safetensors files.

  Raises:
    ConfigError: `out` is a training workdir (its config.json would hide the checkpoints from
      every command) or a folder holding other files than an earlier export
      (`check_export_folder`), before anything is read.
    CheckpointError: as load_model and save_hf.
  """
  from llada_jax.checkpoint import checkpoint_dir  # pylint: disable=g-import-not-at-top
  from llada_jax.interop.hf_checkpoint import (  # pylint: disable=g-import-not-at-top
      check_export_folder,
      save_hf,
      stale_weight_files,
  )
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top

  if storage.path(out) == storage.path(workdir) or checkpoint_dir(out).exists():
    raise ConfigError(
        f"--out={out} is not allowed: it is a training workdir (a config.json there would hide "
        "its checkpoints); expected a new folder or an earlier export"
    )
  check_export_folder(storage.path(out))
  config, params = load_model(workdir)
  if not storage.is_remote(out):
    return [
        str(f) for f in save_hf(config, params, out, max_shard_size=max_shard_size, dtype=dtype)
    ]
  with tempfile.TemporaryDirectory(prefix="llada_hf_") as folder:
    files = save_hf(config, params, folder, max_shard_size=max_shard_size, dtype=dtype)
    storage.path(out).mkdir(parents=True, exist_ok=True)
    names = sorted(f.name for f in pathlib.Path(folder).iterdir())
    for name in names:
      storage.copy_file(pathlib.Path(folder) / name, storage.path(out) / name)
    for stale in stale_weight_files(storage.path(out), names):
      stale.unlink()
  return [str(storage.path(out) / f.name) for f in files]
