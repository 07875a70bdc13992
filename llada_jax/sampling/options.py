"""SamplerOptions: every option of the reverse process, its default and its one validation.

The defaults are `config.sampling` of `llada_jax.config.default_config()` (one declaration: a
checkpoint stored before an option existed loads with its default, since stored configs are read
over `default_config()`). Every entry point builds its options here: `generate`'s keyword
overrides, the `llada-sample` / `llada-chat` flags (`llada_jax.sampling.flags`), `llada-evaluate
--sampler.*`, the lm-eval adapter and the trainer's evaluation; `validate` is the one check.

Stop strings are not an option of the reverse process: the compiled sampler fills all gen_length
positions and never sees text; answers are cut afterwards by `llada_jax.sampling.ending`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Collection

import jax
import ml_collections

from llada_jax.config import (
    REMASKING,
    check_sampling,
    check_sampling_fields,
    check_sampling_names,
    default_config,
    objective_of,
)
from llada_jax.errors import ConfigError

_DEFAULTS = default_config().sampling


def _option(name: str, help_text: str) -> Any:
  """A field whose default is default_config().sampling[name]; help_text is its flag's help."""
  return dataclasses.field(  # pylint: disable=invalid-field-call  # used in the dataclass body
      default=_DEFAULTS[name], metadata={"help": help_text}
  )


@dataclasses.dataclass(frozen=True)
class SamplerOptions:
  """Every option of the reverse process (`generate`); frozen and hashable (a compile-cache and
  grouping key). Defaults: default_config().sampling."""

  steps: int = _option("steps", "Reverse-process steps, a multiple of the number of blocks.")
  gen_length: int = _option("gen_length", "Answer tokens, a multiple of block_length.")
  block_length: int = _option("block_length", "Semi-autoregressive block length.")
  temperature: float = _option("temperature", "Gumbel noise scale; 0 is greedy.")
  top_k: int = _option(
      "top_k", "Sample among the k most probable tokens only (0: all; greedy decoding ignores it)."
  )
  top_p: float = _option(
      "top_p",
      "Nucleus sampling: the fewest most probable tokens holding this probability (1: all).",
  )
  cfg_scale: float = _option("cfg_scale", "Classifier-free guidance weight w >= 0.")
  remasking: str = _option("remasking", "Remasking rule: " + ", ".join(REMASKING) + ".")
  logits_eos_inf: bool = _option("logits_eos_inf", "Never propose EOS.")
  confidence_eos_eot_inf: bool = _option("confidence_eos_eot_inf", "Commit EOS/EoT proposals last.")
  parallel_threshold: float = _option(
      "parallel_threshold",
      "0: exact schedule; τ in (0, 1]: commit every proposal with "
      "probability > τ (at least one a step; a block model: at least the step's scheduled count, "
      "LLaDA 2.x's rule), an approximation that is faster on confident models.",
  )
  cache: str = _option(
      "cache", "Key/value cache: none (exact), prefix or dual (approximate, faster)."
  )
  cache_refresh: int = _option(
      "cache_refresh",
      "Refresh the cache every N steps inside a block too (0: at block boundaries only).",
  )
  float64: bool = _option(
      "float64",
      "Gumbel noise and probabilities in float64, as the official code (needs jax_enable_x64).",
  )
  early_stop: bool = _option(
      "early_stop",
      "Stop after the block in which every row has committed EOS/EoT, the rest set to EOS: exact "
      "for block diffusion models (always on), an approximation for LLaDA models.",
  )

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> SamplerOptions:
    """The options of config.sampling (not validated); a block diffusion model's blocks are its
    own (block_length = diffusion.block_size, whatever config.sampling says)."""
    options = cls(**{f.name: config.sampling[f.name] for f in dataclasses.fields(cls)})
    if objective_of(config).blocks:
      options = dataclasses.replace(options, block_length=config.diffusion.block_size)
    return options

  @property
  def use_threshold(self) -> bool:
    """Confidence-threshold decoding (parallel_threshold > 0) instead of the fixed schedule."""
    return self.parallel_threshold > 0

  def replace(self, **overrides: Any) -> SamplerOptions:
    """A copy with the given options changed; None leaves an option as it is.

    Raises:
      ConfigError: a name that is not an option.
    """
    check_sampling_names(overrides)
    return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

  def validate(
      self, config: ml_collections.ConfigDict | None = None, prefix: str = ""
  ) -> SamplerOptions:
    """Returns self if the options can be used; raises ConfigError (one line naming the option,
    its value and what is allowed) otherwise.

    Without config the options are checked alone (what `llada_jax.config.validate` checks of
    config.sampling, with prefix "sampling."); with the model's config also what they need of
    that model and this process: gen_length below model.max_sequence_length, no cache, guidance
    or threshold for a causal model (whose steps and blocks play no part), jax_enable_x64 for
    float64. Prompt-dependent checks run in `generate`.
    """
    if config is not None and objective_of(config).blocks:
      self._validate_for_blocks(config, prefix)  # before the rules that name block_length
    values = dataclasses.asdict(self)
    if config is not None and objective_of(config).causal:
      # One step per token: steps and blocks play no part (each value is still checked alone).
      check_sampling_fields({k: values.pop(k) for k in ("steps", "block_length")}, prefix)
    check_sampling(values, prefix)
    if config is None:
      return self
    limit = config.model.max_sequence_length
    if self.gen_length >= limit:
      raise ConfigError(
          f"{prefix}gen_length={self.gen_length!r} is not allowed: expected less "
          f"than model.max_sequence_length={limit}"
      )
    if objective_of(config).causal:
      for name, off in (("parallel_threshold", 0.0), ("cfg_scale", 0.0)):
        if getattr(self, name) != off:
          raise ConfigError(
              f"{prefix}{name}={getattr(self, name)!r} is not allowed for an autoregressive "
              f"model: expected {off} (it decodes one token a step, unguided)"
          )
    if self.cache != "none" and config.model.causal:
      raise ConfigError(
          f"{prefix}cache={self.cache!r} is not allowed for a causal "
          "model.causal=True: expected cache='none' (the caches reuse keys of a "
          "bidirectional mask predictor)"
      )
    if self.float64 and not jax.config.jax_enable_x64:
      raise ConfigError(
          f"{prefix}float64=True is not allowed while jax_enable_x64 is off: set "
          "JAX_ENABLE_X64=1 (or jax.config.update('jax_enable_x64', True))"
      )
    return self

  def validate_given(
      self, config: ml_collections.ConfigDict, given: Collection[str], prefix: str
  ) -> SamplerOptions:
    """validate(config) for options of which those named in `given` were typed on a command line
    as `prefix`NAME (--steps, --sampler.steps); the others are the checkpoint's config.sampling.

    Raises:
      ConfigError: as validate, naming a typed option as typed (--steps=6) and one no flag gave
        as the checkpoint's default (config.sampling.steps=112 (the checkpoint's default; no
        --steps was given)).
    """
    try:
      return self.validate(config, prefix=prefix)
    except ConfigError as e:
      match = re.match(rf"{re.escape(prefix)}(\w+)=", str(e))
      name = match.group(1) if match else None
      if name is None or name in given or name not in _DEFAULTS:
        raise
      head, allowed, rest = str(e).partition(" is not allowed")
      raise ConfigError(
          f"config.sampling.{head.removeprefix(prefix)} (the checkpoint's default; no "
          f"{prefix}{name} was given){allowed}{rest}"
      ) from None

  def _validate_for_blocks(self, config: ml_collections.ConfigDict, prefix: str) -> None:
    """What a block diffusion model needs: the sampler's blocks are the model's, and its one
    cache is the exact cache of finished blocks (cache="prefix", never refreshed)."""
    size = config.diffusion.block_size
    if self.gen_length % size:
      raise ConfigError(
          f"{prefix}gen_length={self.gen_length!r} is not allowed for a block diffusion model: "
          f"expected a multiple of its diffusion.block_size={size}"
      )
    if self.block_length != size:
      raise ConfigError(
          f"{prefix}block_length={self.block_length!r} is not allowed for a block diffusion "
          f"model: expected its diffusion.block_size={size}"
      )
    if self.cache == "dual" or (self.cache == "prefix" and self.cache_refresh):
      raise ConfigError(
          f"{prefix}cache={self.cache!r} with cache_refresh={self.cache_refresh} is not "
          "allowed for a block diffusion model: expected cache='none' or 'prefix' (the exact "
          "cache of finished blocks) with cache_refresh=0"
      )
