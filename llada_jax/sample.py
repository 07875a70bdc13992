"""Generate text from a trained workdir with the compiled reverse process.

  python -m llada_jax.sample --workdir=runs/demo --prompt="ROMEO:" \
      --gen_length=112 --steps=112 --block_length=16 [--remasking=random --temperature=1]

Prompts come as text (--prompt, repeatable) or token ids (--prompt_ids=1,2,3, repeatable); a batch
of prompts is left-padded. --output_json=PATH writes {"tokens": [[...]], "text": [...]}.
"""

from __future__ import annotations

import json

from absl import flags

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding Orbax checkpoints.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "A workdir or an official HuggingFace LLaDA folder."
)
_PROMPT = flags.DEFINE_multi_string("prompt", None, "Prompt text; repeat for a batch.")
_PROMPT_IDS = flags.DEFINE_multi_string(
    "prompt_ids", None, "Prompt as comma-separated token ids; repeat for a batch."
)
_GEN_LENGTH = flags.DEFINE_integer("gen_length", None, "Answer tokens (default: config.sampling).")
_STEPS = flags.DEFINE_integer("steps", None, "Reverse-process steps (default: config.sampling).")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", None, "Semi-autoregressive block length.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Gumbel noise scale; 0 is greedy.")
_REMASKING = flags.DEFINE_string(
    "remasking", None, "low_confidence, random, margin or entropy (default: config)."
)
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 0.0, "Classifier-free guidance weight.")
_LOGITS_EOS_INF = flags.DEFINE_bool("logits_eos_inf", False, "Never propose EOS.")
_CONFIDENCE_EOS_EOT_INF = flags.DEFINE_bool(
    "confidence_eos_eot_inf", False, "Commit EOS/EoT proposals last."
)
_PARALLEL_THRESHOLD = flags.DEFINE_float(
    "parallel_threshold",
    0.0,
    "0: exact schedule; τ in (0, 1]: commit every proposal with "
    "probability > τ (at least one a step), an approximation that is faster on confident models.",
)
_CACHE = flags.DEFINE_enum(
    "cache",
    "none",
    ["none", "prefix", "dual"],
    "Key/value cache: none (exact), prefix or dual (approximate, faster).",
)
_CACHE_REFRESH = flags.DEFINE_integer(
    "cache_refresh",
    0,
    "Refresh the cache every N steps inside " "a block too (0: at block boundaries only).",
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
  del argv
  from llada_jax.sampling.text import load_model, sample  # pylint: disable=g-import-not-at-top

  path = _CHECKPOINT.value or _WORKDIR.value
  if not path:
    raise ConfigError("--workdir (or --checkpoint) is required, e.g. --workdir=runs/demo")
  if _PROMPT.value and _PROMPT_IDS.value:
    raise ConfigError("--prompt and --prompt_ids are not allowed together: give one of them")
  config, params = load_model(path)
  s = config.sampling

  def pick(flag, default):
    return default if flag.value is None else flag.value

  result = sample(
      config,
      params,
      texts=_PROMPT.value or (None if _PROMPT_IDS.value else ["ROMEO:"]),
      ids=_parse_ids(_PROMPT_IDS.value) if _PROMPT_IDS.value else None,
      steps=pick(_STEPS, s.steps),
      gen_length=pick(_GEN_LENGTH, s.gen_length),
      block_length=pick(_BLOCK_LENGTH, s.block_length),
      temperature=pick(_TEMPERATURE, s.temperature),
      remasking=pick(_REMASKING, s.remasking),
      cfg_scale=_CFG_SCALE.value,
      logits_eos_inf=_LOGITS_EOS_INF.value,
      confidence_eos_eot_inf=_CONFIDENCE_EOS_EOT_INF.value,
      seed=_SEED.value,
      stops=_STOP.value,
      parallel_threshold=_PARALLEL_THRESHOLD.value,
      cache=_CACHE.value,
      cache_refresh=_CACHE_REFRESH.value,
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
