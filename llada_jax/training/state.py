"""The train state and its creation directly into the shardings the logical axis rules give:
random parameters, or those of an autoregressive HF folder (train.init_from), whose vocabulary
the run takes (`config_with_init_from`)."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from llada_jax import storage
from llada_jax.checkpoint import (
    PARAMETER_FIELDS,
    checkpoint_dir,
    newest_stored_config,
    restore_newest,
)
from llada_jax.config import TOKENIZER_VOCABULARIES, default_config, take_fields, validate
from llada_jax.errors import ConfigError
from llada_jax.keys import Stream
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.sharding import abstract_on_mesh, axis_rules

# The model fields a train.init_from folder must share with the config: the parameter shapes
# (the layer layout aside: the import builds either) and what the weights were trained with.
INIT_FROM_FIELDS = tuple(f for f in PARAMETER_FIELDS if f not in ("scan_layers", "vocab_size")) + (
    "rope_theta",
    "rms_norm_eps",
)
# What a run started from train.init_from takes from the folder (`config_with_init_from`) and a
# resumed run from its checkpoint (training.loop): the vocabulary the parameters were trained on.
VOCABULARY_KEYS = (
    "data.tokenizer",
    "data.vocabulary",
    "model.vocab_size",
    "tokens.mask_id",
    "tokens.pad_id",
    "tokens.eos_id",
    "tokens.bos_id",
    "tokens.eot_id",
)


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint must hold to continue training exactly.

  lr_scale multiplies the schedule (cut at each rollback after a non-finite step), rollbacks counts
  them and skipped counts the updates skipped for a non-finite loss or gradient.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  lr_scale: jax.Array
  rollbacks: jax.Array
  skipped: jax.Array

  @classmethod
  def fresh(cls, params: Any, opt_state: Any) -> TrainState:
    """The state at step 0."""
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=opt_state,
        lr_scale=jnp.ones((), jnp.float32),
        rollbacks=jnp.zeros((), jnp.int32),
        skipped=jnp.zeros((), jnp.int32),
    )


def _init_boxed(
    model: MaskedDiffusionLM, tx: optax.GradientTransformation, rng: jax.Array
) -> TrainState:
  """Initial state whose leaves still carry their logical axis names."""
  params = model.init(rng)
  return TrainState.fresh(params, tx.init(params))


def state_shardings(
    config: ml_collections.ConfigDict,
    model: MaskedDiffusionLM,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[Any, Any]:
  """(abstract state of ShapeDtypeStructs carrying shardings, tree of NamedShardings)."""
  boxed = jax.eval_shape(lambda r: _init_boxed(model, tx, r), jax.random.PRNGKey(0))
  abstract = abstract_on_mesh(boxed, mesh, axis_rules(config))
  return abstract, jax.tree.map(lambda a: a.sharding, abstract)


def create_train_state(
    config: ml_collections.ConfigDict,
    model: MaskedDiffusionLM,
    tx: optax.GradientTransformation,
    mesh: Mesh,
) -> tuple[TrainState, Any]:
  """Initialises parameters and optimizer state, each created already sharded on `mesh`: the
  parameters random (config.seed) or, with train.init_from, that folder's (`imported_params`).

  Raises:
    ConfigError, CheckpointError: as imported_params.
  """
  abstract, shardings = state_shardings(config, model, tx, mesh)
  if config.train.init_from:
    params = imported_params(config, abstract.params)
    noise_key = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.MASK_NOISE)

    def start(p: Any) -> TrainState:
      p = with_mask_embedding_noise(
          p, config.tokens.mask_id, config.train.mask_embedding_noise, noise_key
      )
      return TrainState.fresh(p, tx.init(p))

    fresh = jax.jit(start, out_shardings=shardings, donate_argnums=0)
    logging.info("initialised the parameters from train.init_from=%s", config.train.init_from)
    return fresh(params), shardings
  rng = jax.random.fold_in(jax.random.PRNGKey(config.seed), Stream.INIT)
  init = jax.jit(lambda r: nn.meta.unbox(_init_boxed(model, tx, r)), out_shardings=shardings)
  return init(rng), shardings


def with_mask_embedding_noise(params: Any, mask_id: int, scale: float, rng: jax.Array) -> Any:
  """params with N(0, (scale x std of the embedding table)^2) noise added to row mask_id of the
  token embedding (params["wte"]["embedding"] [V, d]); unchanged for scale 0. LLaDA 2.0's
  remedy for the mask embedding of an AR model, which never saw the token (DESIGN.md §8)."""
  if not scale:
    return params
  table = params["wte"]["embedding"]
  std = jnp.std(table.astype(jnp.float32))
  noise = scale * std * jax.random.normal(rng, table.shape[1:], jnp.float32)
  row = (table[mask_id].astype(jnp.float32) + noise).astype(table.dtype)
  return dict(params, wte=dict(params["wte"], embedding=table.at[mask_id].set(row)))


def init_from_workdir(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict | None:
  """The stored config of the newest checkpoint of train.init_from when it names a llada_jax
  workdir (a folder with checkpoints/: a run of any objective, whose parameters start the next
  stage of a recipe), None when it names an HF folder or nothing.

  Raises:
    ConfigError: a workdir without a readable checkpoint.
    CheckpointError: a stored config this version cannot use.
  """
  path = config.train.init_from
  if not path or not checkpoint_dir(path).is_dir():
    return None
  stored = newest_stored_config(path)
  if stored is None:
    raise ConfigError(
        f"train.init_from={path} is not allowed: its checkpoints/ holds no readable checkpoint "
        "(expected a llada_jax workdir with one, or a Llama/Mistral HuggingFace folder)"
    )
  return stored


def read_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The config of the train.init_from folder: a llada_jax workdir's newest stored config
  (`init_from_workdir`), or an HF folder's causal config (`read_llama_config`: its sizes, its
  tokenizer.json as vocabulary "hf", its special ids, its mask token: the mask_token_id it
  records, else one appended row).

  Raises:
    ConfigError: the folder is neither a workdir with a checkpoint nor has a config.json (named as
      train.init_from), or the import's ConfigErrors.
    CheckpointError: a folder that cannot be imported.
  """
  from llada_jax.interop.llama import read_llama_config  # pylint: disable=g-import-not-at-top

  stored = init_from_workdir(config)
  if stored is not None:
    return stored
  path = config.train.init_from
  if not (storage.path(path) / "config.json").is_file():
    raise ConfigError(
        f"train.init_from={path} is not allowed: it has no config.json nor checkpoints/ "
        "(expected a Llama/Mistral HuggingFace folder or a llada_jax workdir)"
    )
  return read_llama_config(path)


def config_with_init_from(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """A copy of `config` with the vocabulary of its train.init_from folder (VOCABULARY_KEYS: the
  folder's tokenizer.json, vocabulary "hf" or the one a llada_jax export records, its special ids,
  model.vocab_size with the appended mask row; a workdir's stored vocabulary and kept
  tokenizer.json), each change logged; every other field is the config's. The run's model fields
  must be the folder's (INIT_FROM_FIELDS). A folder without a tokenizer.json keeps the config's
  data.tokenizer for a tokenizer vocabulary.

  Raises:
    ConfigError: no config.json in the folder, or a model field of INIT_FROM_FIELDS that differs
      from the folder's (checked before any tensor is read).
    CheckpointError: a folder that cannot be imported.
  """
  from llada_jax.loading import stored_tokenizer  # pylint: disable=g-import-not-at-top

  imported = read_init_from(config)
  if checkpoint_dir(config.train.init_from).is_dir():  # a workdir: the tokenizer it kept
    imported.data.tokenizer = (
        stored_tokenizer(config.train.init_from, imported) or imported.data.tokenizer
    )
  if not imported.data.tokenizer and imported.data.vocabulary in TOKENIZER_VOCABULARIES:
    imported.data.tokenizer = config.data.tokenizer
  _check_init_from_model(config, imported)
  out, changed = take_fields(config, imported, VOCABULARY_KEYS)
  if changed:
    logging.warning(
        "train.init_from=%s: the run takes the folder's vocabulary, not the config's: %s",
        config.train.init_from,
        ", ".join(changed),
    )
  return validate(out)


def _check_init_from_model(
    config: ml_collections.ConfigDict, imported: ml_collections.ConfigDict
) -> None:
  """ConfigError for the first INIT_FROM_FIELDS model field in which config differs from the
  imported folder's config."""
  for field in INIT_FROM_FIELDS:
    if config.model[field] != imported.model[field]:
      raise ConfigError(
          f"model.{field}={config.model[field]!r} is not allowed with "
          f"train.init_from={config.train.init_from}: the imported model has "
          f"{imported.model[field]!r}"
      )


def imported_params(config: ml_collections.ConfigDict, abstract: Any = None) -> Any:
  """The parameters of config.train.init_from, each placed as `abstract` (the parameters'
  ShapeDtypeStructs carrying their shardings; None: replicated on this host's devices, as for
  serving) says as it is read: a llada_jax workdir's newest
  checkpoint that restores (its optimizer state never read), or a Llama/Mistral HF folder's (the
  one import path, interop.llama.load_llama) in model.param_dtype.

  The config must have the folder's vocabulary (`config_with_init_from` gives it; the trainer
  applies it before anything is built): its mask token is the folder's (the mask_token_id it
  records, else the appended row). model.causal is the config's (the objective's), not the
  imported causal model's: the AR network becomes the mask predictor.

  Raises:
    ConfigError: a model field of INIT_FROM_FIELDS, the vocabulary or a token id differs from the
      folder's (checked before any tensor is read), or the import's ConfigErrors.
    CheckpointError: a folder that cannot be imported.
  """
  from llada_jax.interop.llama import load_llama  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import serving_abstract_params  # pylint: disable=g-import-not-at-top

  path = config.train.init_from
  abstract = serving_abstract_params(config) if abstract is None else abstract
  imported = read_init_from(config)
  if checkpoint_dir(path).is_dir():  # a llada_jax workdir (read_init_from read its config)
    _check_init_from_model(config, imported)
    _, _, params = restore_newest(
        path, lambda _: abstract, params_only=True, read_only=True, wanted=config
    )
    return params
  _check_init_from_model(config, imported)
  for key in VOCABULARY_KEYS[1:]:  # data.tokenizer aside: it names the file, the ids are checked
    section, field = key.split(".")
    if config[section][field] != imported[section][field]:
      raise ConfigError(
          f"{key}={config[section][field]!r} is not allowed with train.init_from={path}: the "
          f"imported model has {imported[section][field]!r}"
      )
  base = default_config()
  base.model.update(config.model.to_dict())  # the layer layout (scan_layers) to build
  dtype = config.model.param_dtype
  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  return load_llama(path, dtype=dtype, base=base, shardings=shardings)[1]
