"""Generate text from a trained workdir with the compiled reverse process.

  python -m llada_jax.sample --workdir=runs/demo --prompt="ROMEO:" \
      --gen_length=128 --steps=128 --block_length=32
"""

from __future__ import annotations

from absl import app, flags

from llada_jax.cli_support import parse_flags_or_exit, run_reporting_errors
from llada_jax.errors import ConfigError

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir holding Orbax checkpoints.")
_PROMPT = flags.DEFINE_multi_string("prompt", ["ROMEO:"], "Prompt text; repeat for a batch.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", None, "Answer tokens (default: config.sampling).")
_STEPS = flags.DEFINE_integer("steps", None, "Reverse-process steps (default: config.sampling).")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", None, "Semi-autoregressive block length.")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "Gumbel noise scale; 0 is greedy.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling noise.")


def _sample() -> None:
  from llada_jax.sampling.text import load_for_sampling, sample_texts  # pylint: disable=g-import-not-at-top

  if not _WORKDIR.value:
    raise ConfigError("--workdir is required, e.g. --workdir=runs/demo")
  config, params = load_for_sampling(_WORKDIR.value)
  s = config.sampling
  texts = sample_texts(
      config, params, _PROMPT.value,
      steps=s.steps if _STEPS.value is None else _STEPS.value,
      gen_length=s.gen_length if _GEN_LENGTH.value is None else _GEN_LENGTH.value,
      block_length=s.block_length if _BLOCK_LENGTH.value is None else _BLOCK_LENGTH.value,
      temperature=s.temperature if _TEMPERATURE.value is None else _TEMPERATURE.value,
      seed=_SEED.value)
  for prompt, text in zip(_PROMPT.value, texts):
    print(f"=== prompt: {prompt!r}\n{prompt}{text}\n", flush=True)


def main(argv: list[str]) -> None:
  del argv
  run_reporting_errors(_sample)


def run() -> None:
  """Console script `llada-sample`."""
  app.run(main, flags_parser=parse_flags_or_exit)


if __name__ == "__main__":
  run()
