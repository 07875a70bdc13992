"""The sampler's absl flags, defined once for `llada-sample` and `llada-chat`.

Importing this module defines one flag per `SamplerOptions` field (--steps, --gen_length,
--block_length, --temperature, --cfg_scale, --remasking, --logits_eos_inf, ...), each None unless
given: None takes the checkpoint's config.sampling value (`options_from_flags`). A command
line imports this module at its top, before its flags are parsed. `llada-evaluate` takes the same
options as `--sampler.*` instead (its --cfg_scale is the likelihood's).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections
from absl import flags

from llada_jax.config import check_sampling
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
  """options_from_flags(config) validated for the model (`SamplerOptions.validate_given`: a
  refused option is named as typed, --steps=6, or, when no flag gave it, as the checkpoint's
  default, config.sampling.steps=112)."""
  return options_from_flags(config).validate_given(config, given(), "--")
