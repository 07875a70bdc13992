"""A multi-turn terminal chat with a LLaDA model (like the official chat.py).

  python -m llada_jax.chat --checkpoint=HF_OR_WORKDIR [--tokenizer=tokenizer.json] \
      [--gen_length=128 --steps=128 --block_length=32 --temperature=0 ...]

Each line read from standard input is a user turn; the whole conversation goes through the
LLaDA-Instruct chat template (a plain "User: / Assistant:" transcript for vocabularies without one,
such as byte and spm8k) and the reverse process fills the assistant's answer, which ends as every
answer does (`llada_jax.sampling.ending`). An empty line or end of input ends the chat.
"""

from __future__ import annotations

import sys

from absl import flags

from llada_jax.cli_support import entry_point
from llada_jax.errors import ConfigError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "HF LLaDA folder or llada_jax workdir.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", None, "tokenizer.json (default: the one in --checkpoint)."
)
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 128, "Answer tokens per turn.")
_STEPS = flags.DEFINE_integer("steps", 128, "Reverse-process steps per turn.")
_BLOCK_LENGTH = flags.DEFINE_integer("block_length", 32, "Semi-autoregressive block length.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Gumbel noise scale; 0 is greedy.")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 0.0, "Classifier-free guidance weight.")
_REMASKING = flags.DEFINE_string("remasking", "low_confidence", "Remasking rule.")
_LOGITS_EOS_INF = flags.DEFINE_bool("logits_eos_inf", False, "Never propose EOS.")
_CONFIDENCE_EOS_EOT_INF = flags.DEFINE_bool(
    "confidence_eos_eot_inf", False, "Commit EOS/EoT proposals last."
)
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the sampling noise.")


def _chat(argv: list[str]) -> None:
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  from llada_jax.data.codec import chat_prompt, text_codec  # pylint: disable=g-import-not-at-top
  from llada_jax.data.hf_tokenizer import ChatMessage  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.ending import end_answer  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.generate import generate  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.text import load_model  # pylint: disable=g-import-not-at-top

  if not _CHECKPOINT.value:
    raise ConfigError("--checkpoint is required: an HF LLaDA folder or a workdir")
  config, params = load_model(_CHECKPOINT.value, _TOKENIZER.value)
  codec = text_codec(config)
  room = config.model.max_sequence_length - _GEN_LENGTH.value
  if room < 1:
    raise ConfigError(
        f"--gen_length={_GEN_LENGTH.value} is not allowed: expected less than "
        f"model.max_sequence_length={config.model.max_sequence_length}"
    )
  messages: list[ChatMessage] = []
  for turn, line in enumerate(sys.stdin):
    if not line.strip():
      break
    messages.append(ChatMessage("user", line.strip()))
    ids, stops = chat_prompt(codec, messages)
    prompt = np.asarray([ids[-room:]], np.int32)  # a long conversation drops its oldest tokens
    out = generate(
        config,
        params,
        prompt,
        steps=_STEPS.value,
        gen_length=_GEN_LENGTH.value,
        block_length=_BLOCK_LENGTH.value,
        temperature=_TEMPERATURE.value,
        cfg_scale=_CFG_SCALE.value,
        remasking=_REMASKING.value,
        logits_eos_inf=_LOGITS_EOS_INF.value,
        confidence_eos_eot_inf=_CONFIDENCE_EOS_EOT_INF.value,
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
