"""Convert between official HuggingFace LLaDA folders and llada_jax workdirs.

  python -m llada_jax.convert from-hf --hf_dir=D --workdir=W [--dtype=bfloat16 --mask_id=ID
      --eos_id=ID]
  python -m llada_jax.convert to-hf --workdir=W --out=D [--dtype=bfloat16 --max_shard_size=5GB]

from-hf reads an official LLaDA folder, a LLaDA 2.x (llada2_moe) or LLaDA-MoE one, or an
autoregressive Llama/Mistral one (config.json's model_type and architectures tell them apart). A
Llama/Mistral folder becomes the causal model, model.causal=True, whose training with
model.causal=False and diffusion.objective=mdm is the AR initialisation of LLaDA 2.0 and Dream;
its mask token is --mask_id, an existing id, or by default one appended row. It writes
a step-0 Orbax checkpoint (parameters plus a fresh optimizer state) that
`llada-sample` reads and `llada-train` fine-tunes from; to-hf writes config.json and safetensors
that the official PyTorch loader reads: an MDM or block model as a LLaDA folder (its objective,
block size, logit alignment and vocabulary in llada_jax_* fields), an ARM as a Llama folder for
transformers' LlamaForCausalLM (an appended mask row left out, a mask token inside the vocabulary
recorded as mask_token_id); from-hf reads either back as the same model.
"""

from __future__ import annotations

from absl import flags, logging

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError
from llada_jax.interop.workdir import from_hf, to_hf

_HF_DIR = flags.DEFINE_string("hf_dir", None, "HuggingFace LLaDA folder (from-hf).")
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "llada_jax workdir (written by from-hf, read by to-hf)."
)
_OUT = flags.DEFINE_string("out", None, "Output HuggingFace folder (to-hf).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Parameter dtype written.")
_MASK_ID = flags.DEFINE_integer(
    "mask_id",
    None,
    "from-hf of a Llama/Mistral folder: an existing token id to use as the mask token "
    "(default: one row is appended to the vocabulary for it); of a LLaDA 2.x or LLaDA-MoE "
    "folder: the mask token id (default: config.json's mask_token_id, else the family's 156895).",
)
_EOS_ID = flags.DEFINE_integer(
    "eos_id",
    None,
    "from-hf of a LLaDA 2.x (llada2_moe) folder: the EOS token id (default: config.json's, else "
    "the family's 156892).",
)
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file (to-hf).")


def _convert(argv: list[str]) -> None:
  """The `llada-convert` command: from-hf or to-hf."""
  commands = ("from-hf", "to-hf")
  if len(argv) != 2 or argv[1] not in commands:
    raise ConfigError(f"command {argv[1:]} is not allowed: expected one of {', '.join(commands)}")
  if argv[1] == "from-hf":
    if not _HF_DIR.value or not _WORKDIR.value:
      raise ConfigError("from-hf needs --hf_dir and --workdir")
    count = from_hf(_HF_DIR.value, _WORKDIR.value, _DTYPE.value, _MASK_ID.value, _EOS_ID.value)
    logging.info(
        "imported %s parameters from %s into %s", f"{count:,}", _HF_DIR.value, _WORKDIR.value
    )
  else:
    if not _WORKDIR.value or not _OUT.value:
      raise ConfigError("to-hf needs --workdir and --out")
    files = to_hf(_WORKDIR.value, _OUT.value, _DTYPE.value, _MAX_SHARD_SIZE.value)
    logging.info("wrote %d safetensors file(s) to %s", len(files), _OUT.value)


run = entry_point(_convert)  # console script `llada-convert`


if __name__ == "__main__":
  run()
