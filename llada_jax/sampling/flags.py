"""The sampler's absl flags, defined once for `llada-sample` and `llada-chat`.

Importing this module defines one flag per `SamplerOptions` field (--steps, --gen_length,
--block_length, --temperature, --cfg_scale, --remasking, --logits_eos_inf, ...), each None unless
given: None takes the checkpoint's config.sampling value (`options_from_flags`). A command
line imports this module at its top, before its flags are parsed. `llada-evaluate` takes the same
options as `--sampler.*` instead (its --cfg_scale is the likelihood's).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import ml_collections
from absl import flags

from llada_jax.config import check_sampling
from llada_jax.errors import ConfigError
from llada_jax.sampling.options import SamplerOptions

_DEFINE = {
    int: flags.DEFINE_integer,
    float: flags.DEFINE_float,
    bool: flags.DEFINE_bool,
    str: flags.DEFINE_string,
}

SAMPLER_FLAGS: dict[str, flags.FlagHolder] = {
    f.name: _DEFINE[type(f.default)](
        f.name, None, f"{f.metadata['help']} Default: the checkpoint's config.sampling.{f.name}."
    )
    for f in dataclasses.fields(SamplerOptions)
}


def given() -> dict[str, Any]:
  """The sampler options given on the command line, by name."""
  return {name: flag.value for name, flag in SAMPLER_FLAGS.items() if flag.value is not None}


def options_from_flags(config: ml_collections.ConfigDict) -> SamplerOptions:
  """config.sampling overridden by the sampler flags given on the command line (not validated)."""
  return SamplerOptions.from_config(config).replace(**given())


def check_given() -> None:
  """Checks the given options before a checkpoint is loaded: each value, and the rules between
  options that were all given (e.g. --block_length must divide --gen_length).

  Raises:
    ConfigError: a value its option does not allow, e.g. --remasking='top_p'.
  """
  check_sampling(given(), prefix="--")


def validated_options(config: ml_collections.ConfigDict) -> SamplerOptions:
  """options_from_flags(config) validated for the model (`SamplerOptions.validate`).

  Raises:
    ConfigError: as validate, naming a given option as typed (--steps=6) and one that was not
      given as the checkpoint's default (config.sampling.steps=112), which no flag on the command
      line holds.
  """
  try:
    return options_from_flags(config).validate(config, prefix="--")
  except ConfigError as e:
    raise ConfigError(_name_default(str(e))) from None


def _name_default(message: str) -> str:
  """message with its leading `--name=value`, if no --name was given, as config.sampling's."""
  match = re.match(r"--(\w+)=", message)
  if not match or match.group(1) not in SAMPLER_FLAGS or match.group(1) in given():
    return message
  name = match.group(1)
  head, allowed, rest = message.partition(" is not allowed")
  return (
      f"config.sampling.{head.removeprefix('--')} (the checkpoint's default; no --{name} was "
      f"given){allowed}{rest}"
  )
