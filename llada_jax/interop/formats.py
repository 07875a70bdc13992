"""Which importer reads an HF folder: official LLaDA (interop.hf_checkpoint), an autoregressive
Llama/Mistral model (interop.llama), LLaDA 2.x MoE (interop.llada2_moe) or LLaDA-MoE
(interop.llada_moe), told apart by config.json's model_type and architectures."""

from __future__ import annotations

import functools
import pathlib
from typing import Any, Callable

from llada_jax.errors import ConfigError
from llada_jax.interop import hf_checkpoint, llada2_moe, llada_moe, llama
from llada_jax.interop.hf_checkpoint import load_hf, read_hf_config


def hf_format(
    hf_dir: str, mask_id: int | None = None, eos_id: int | None = None
) -> tuple[Callable[[str], Any], Callable]:
  """(read_config, load) for an HF folder of either format, told apart by config.json's
  model_type and architectures: a Llama/Mistral AR model (interop.llama: the causal model, with
  `mask_id` or an appended mask row), a LLaDA 2.x MoE model (interop.llada2_moe: `mask_id`,
  `eos_id` override the family's ids), a LLaDA-MoE model (interop.llada_moe: `mask_id` overrides
  the family's) or an official LLaDA model (interop.hf_checkpoint). read_config(path) gives
  the llada_jax config; load(path, dtype=, base=, shardings=) gives (config, params).

  Raises:
    CheckpointError: no readable config.json. ConfigError: mask_id given for a dense LLaDA
      folder, which has its own mask token; eos_id given for a folder other than LLaDA 2.x's (the
      others name their EOS).
  """
  hf = hf_checkpoint.read_json(pathlib.Path(hf_dir) / "config.json")
  if llada2_moe.is_llada2_moe(hf):
    return (
        functools.partial(llada2_moe.read_config, mask_id=mask_id, eos_id=eos_id),
        functools.partial(llada2_moe.load, mask_id=mask_id, eos_id=eos_id),
    )
  if eos_id is not None:
    raise ConfigError(
        f"--eos_id={eos_id} is not allowed for {hf_dir}: it is for LLaDA 2.x (llada2_moe) folders; "
        "this one names its EOS"
    )
  if llada_moe.is_llada_moe(hf):
    return (
        functools.partial(llada_moe.read_config, mask_id=mask_id),
        functools.partial(llada_moe.load, mask_id=mask_id),
    )
  if llama.model_type(hf_dir) in llama.MODEL_TYPES:
    return (
        functools.partial(llama.read_llama_config, mask_id=mask_id),
        functools.partial(llama.load_llama, mask_id=mask_id),
    )
  if mask_id is not None:
    raise ConfigError(
        f"--mask_id={mask_id} is not allowed for {hf_dir}: it is for LLaMA/Mistral folders; "
        "a LLaDA folder has its own mask token"
    )
  return read_hf_config, load_hf
