"""Generate text from a trained workdir with the compiled reverse process.

  python -m llada_jax.sample --workdir=runs/demo --prompt="ROMEO:" \
      --gen_length=112 --steps=112 --block_length=16 [--remasking=random --temperature=1]

Prompts come as text (--prompt, repeatable) or token ids (--prompt_ids=1,2,3, repeatable); a batch
of prompts is left-padded. --output_json=PATH writes {"tokens": [[...]], "text": [...]}. The
sampler flags (`llada_jax.sampling.flags`: --steps, --gen_length, --block_length, --temperature,
--cfg_scale, --remasking, --parallel_threshold, --cache, ...) default to the checkpoint's
config.sampling.
"""

from __future__ import annotations

import json

from absl import flags

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError
from llada_jax.sampling import flags as sampler_flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding Orbax checkpoints.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A workdir or an official HuggingFace LLaDA folder."
)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_PROMPT_IDS = flags.DEFINE_multi_string(
    "prompt_ids", None, "Prompt as comma-separated token ids; repeat for a batch."
)
_STOP = flags.DEFINE_multi_string(
    "stop",
    [],
    "Cut each answer's text before the first of these "
    "strings (repeatable); answers always end at EOS and EoT.",
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling noise.")
_OUTPUT_JSON = flags.DEFINE_string("output_json", None, "Also write tokens and text here.")


def _parse_ids(texts: list[str]) -> list[list[int]]:
  try:
    return [[int(t) for t in text.split(",") if t.strip()] for text in texts]
  except ValueError:
    raise ConfigError(
        f"--prompt_ids={texts} is not allowed: expected comma-separated integers "
        "such as --prompt_ids=1,2,3"
    ) from None


def _sample(argv: list[str]) -> None:
  """The `llada-sample` command: flags checked, model loaded, answers printed (and saved)."""
  del argv
  from llada_jax.loading import load_model, stored_config  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.text import sample  # pylint: disable=g-import-not-at-top

  path = _CHECKPOINT.value or _WORKDIR.value
  if not path:
    raise ConfigError("--workdir (or --checkpoint) is required, e.g. --workdir=runs/demo")
  if _PROMPT.value and _PROMPT_IDS.value:
    raise ConfigError("--prompt and --prompt_ids are not allowed together: give one of them")
  ids = _parse_ids(_PROMPT_IDS.value) if _PROMPT_IDS.value else None
  sampler_flags.check_given()  # before the model loads
  stored = stored_config(path)
  if stored is not None:  # what the model's own config refuses, before its parameters load
    sampler_flags.validated_options(stored)
  config, params = load_model(path)
  options = sampler_flags.validated_options(config)
  result = sample(
      config,
      params,
      texts=_PROMPT.value or (None if ids else ["ROMEO:"]),
      ids=ids,
      seed=_SEED.value,
      stops=_STOP.value,
      options=options,
  )
  for prompt, text in zip(result["prompt"], result["text"]):
    print(f"=== prompt: {prompt!r}\n{prompt}{text}\n", flush=True)
  if not any(result["text"]):
    print(json.dumps({"tokens": result["tokens"]}), flush=True)
  if _OUTPUT_JSON.value:
    with open(_OUTPUT_JSON.value, "w", encoding="utf-8") as f:
      json.dump({"tokens": result["tokens"], "text": result["text"]}, f, indent=1)


run = entry_point(_sample)  # console script `llada-sample`


if __name__ == "__main__":
  run()
