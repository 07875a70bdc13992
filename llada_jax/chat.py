"""A multi-turn terminal chat with a LLaDA model (like the official chat.py).

  python -m llada_jax.chat --checkpoint=HF_OR_WORKDIR [--tokenizer=tokenizer.json] \
      [--gen_length=128 --steps=128 --block_length=32 --temperature=0 ...]

Each line read from standard input is a user turn; the whole conversation goes through the
LLaDA-Instruct chat template (a plain "User: / Assistant:" transcript for vocabularies without one,
such as byte and spm8k) and the reverse process fills the assistant's answer, which ends as every
answer does (`llada_jax.sampling.ending`). An empty line or end of input ends the chat.

The sampler flags are those of llada-sample (`llada_jax.sampling.flags`), defaulting to the
checkpoint's config.sampling; an HF folder has none of its own and gets default_config()'s, so
pass the official chat's --gen_length=128 --steps=128 --block_length=32 to match it.
"""

from __future__ import annotations

import sys

from absl import flags

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError
from llada_jax.sampling import flags as sampler_flags

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF LLaDA folder or llada_jax workdir.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "tokenizer.json (default: the one in --checkpoint)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling noise.")


def _chat(argv: list[str]) -> None:
  """The `llada-chat` command: a multi-turn conversation in the model's chat template."""
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from llada_jax.data.codec import chat_prompt, text_codec  # pylint: disable=g-import-not-at-top
  from llada_jax.data.hf_tokenizer import ChatMessage  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.ending import end_answer  # pylint: disable=g-import-not-at-top
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model, stored_config  # pylint: disable=g-import-not-at-top

  if not _CHECKPOINT.value:
    raise ConfigError("--checkpoint is required: an HF LLaDA folder or a workdir")
  sampler_flags.check_given()  # before the model loads
  stored = stored_config(_CHECKPOINT.value)
  if stored is not None:  # what the model's own config refuses, before its parameters load
    sampler_flags.validated_options(stored)
  config, params = load_model(_CHECKPOINT.value, _TOKENIZER.value)
  model = MaskedDiffusionLM(config)
  options = sampler_flags.validated_options(config)
  codec = text_codec(config)
  room = config.model.max_sequence_length - options.gen_length  # >= 1 (validate)
  messages: list[ChatMessage] = []
  for turn, line in enumerate(sys.stdin):
    if not line.strip():
      break
    messages.append(ChatMessage("user", line.strip()))
    ids, stops = chat_prompt(codec, messages)
    prompt = np.asarray([ids[-room:]], np.int32)  # a long conversation drops its oldest tokens
    out = model.generate(
        params,
        prompt,
        options=options,
        rng=jax.random.fold_in(jax.random.PRNGKey(_SEED.value), turn),
    )
    _, text = end_answer(
        np.asarray(out)[0, prompt.shape[1] :].tolist(), config.tokens, codec.decode, stops
    )
    messages.append(ChatMessage("assistant", text.strip()))
    print(f"assistant: {text.strip()}", flush=True)


run = entry_point(_chat)  # console script `llada-chat`


if __name__ == "__main__":
  run()
