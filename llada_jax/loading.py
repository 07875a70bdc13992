"""Loading a model for inference: a training workdir or an HF folder (official LLaDA, or a
Llama/Mistral one imported as the causal model: interop/formats.py).

Parameters only (no optimizer state is built or read), placed on this host's devices whatever mesh
and batch the run trained with. Imports nothing from `llada_jax.training`.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import ml_collections

from llada_jax import storage
from llada_jax.checkpoint import newest_stored_config, restore_newest
from llada_jax.config import TOKENIZER_VOCABULARIES
from llada_jax.errors import ConfigError
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.mesh import make_mesh
from llada_jax.parallel.sharding import abstract_on_mesh, axis_rules

# Kept in a workdir beside its checkpoints (vocabularies "llada_hf" and "hf").
TOKENIZER_FILE = "tokenizer.json"


def load_model(
    path: storage.PathLike, tokenizer: str | None = None
) -> tuple[ml_collections.ConfigDict, Any]:
  """(config, params) from a training workdir or an official HuggingFace LLaDA folder: see
  `load_model_and_step`."""
  return load_model_and_step(path, tokenizer)[1:]


def load_model_and_step(
    path: storage.PathLike, tokenizer: str | None = None
) -> tuple[int | None, ml_collections.ConfigDict, Any]:
  """(checkpoint step or None for an HF folder, config, params) of a workdir or HF folder.

  A workdir gives its newest checkpoint that restores (`restore_newest`: damaged newer steps are
  skipped with a warning, nothing is renamed), parameters only, replicated over the local
  devices whatever batch and mesh it was trained with. tokenizer: a tokenizer.json for the
  "llada_hf" vocabulary (or "hf", when the model's config names it: a converted Llama/Mistral);
  default: the folder's or workdir's own tokenizer.json, or the config's data.tokenizer (a
  relative path is taken from the workdir).

  Raises:
    ConfigError: `path` does not exist or `tokenizer` names no file.
    CheckpointError: no checkpoint, another model, nothing restorable, a bad HF folder.
  """
  root = storage.path(path)
  if not root.exists():
    raise ConfigError(
        f"--checkpoint={path} does not exist: expected a training workdir or an HF " "LLaDA folder"
    )
  if tokenizer is not None and not storage.path(tokenizer).is_file():
    raise ConfigError(
        f"--tokenizer={tokenizer} names no file: expected the model's " "tokenizer.json"
    )
  if (root / "config.json").is_file():
    if storage.is_remote(root):
      raise ConfigError(
          f"--checkpoint={path}: HF folders are read from a local disk; copy it "
          "first (gsutil -m cp -r) or convert it into a workdir on a local disk"
      )
    from llada_jax.interop.formats import hf_format  # pylint: disable=g-import-not-at-top

    step, (config, params) = None, hf_format(str(path))[1](path)
  else:
    step, config, params = restore_newest(
        path, serving_abstract_params, params_only=True, read_only=True
    )
  if tokenizer is not None:
    vocabulary = config.data.vocabulary
    config.data.update(
        vocabulary=vocabulary if vocabulary in TOKENIZER_VOCABULARIES else "llada_hf",
        tokenizer=storage.cached_local_copy(tokenizer),
    )
  else:
    config.data.tokenizer = stored_tokenizer(root, config) or config.data.tokenizer
  return step, config, params


def stored_tokenizer(root: storage.PathLike, config: ml_collections.ConfigDict) -> str | None:
  """A local copy of the tokenizer.json of a tokenizer-vocabulary model stored at `root` (a
  workdir or HF folder): config.data.tokenizer, that path taken from `root` when relative, or
  root/tokenizer.json, the first that exists; None for other vocabularies or none found."""
  if config.data.vocabulary not in TOKENIZER_VOCABULARIES:
    return None
  root, stored = storage.path(root), config.data.tokenizer
  relative = stored and not storage.is_remote(stored) and not os.path.isabs(stored)
  for candidate in (stored, root / stored if relative else None, root / TOKENIZER_FILE):
    if candidate and storage.path(candidate).is_file():
      return storage.cached_local_copy(candidate)
  return None


def stored_config(path: storage.PathLike) -> ml_collections.ConfigDict | None:
  """The config `load_model(path)` will load, read without any parameter (so that a command can
  check its options against the model before the heavy work): an HF folder's config.json, or the
  newest readable stored config of a workdir; None when there is none to read (load_model then
  says why).

  Raises:
    CheckpointError: a stored config or config.json this version cannot use.
  """
  root = storage.path(path)
  if not root.exists():
    return None
  if (root / "config.json").is_file():
    from llada_jax.interop.formats import hf_format  # pylint: disable=g-import-not-at-top

    return hf_format(str(path))[0](path)
  return newest_stored_config(path)


def serving_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` whose mesh is one data-parallel axis over whatever devices there are
  (every other axis, the slices' included, 1): a checkpoint of any training mesh loads on it."""
  serving = ml_collections.ConfigDict(config.to_dict())
  serving.mesh.update(
      dict(data=-1, fsdp=1, expert=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_expert=1, dcn_tensor=1)
  )
  return serving


def serving_abstract_params(config: ml_collections.ConfigDict) -> Any:
  """The parameters of `config` as ShapeDtypeStructs replicated over this host's devices (one
  data-parallel axis; the training batch and mesh play no part)."""
  serving = serving_config(config)
  mesh = make_mesh(serving, jax.local_devices(), check_batch=False)
  boxed = jax.eval_shape(MaskedDiffusionLM(serving).init, jax.random.PRNGKey(0))
  return abstract_on_mesh(boxed, mesh, axis_rules(serving))
