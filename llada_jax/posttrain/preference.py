"""Preference data for DPO and VRPO: JSONL records {"prompt", "chosen", "rejected"}.

The prompt is text or a list of chat messages ({"role": "system" | "user" | "assistant",
"content": text}), rendered with the model's chat template (`llada_jax.data.codec.chat_prompt`:
LLaDA-Instruct's where the vocabulary has it, else the plain transcript); chosen and rejected are
the two answers' text, each ended with the model's end of answer (end of turn under the chat
template, else EOS) as SFT ends its responses.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Sequence

import ml_collections

from llada_jax.data.codec import Codec, chat_prompt, has_chat_template, text_codec
from llada_jax.data.hf_tokenizer import ChatMessage
from llada_jax.data.registry import read_jsonl_lines
from llada_jax.diffusion.likelihood import check_pairs
from llada_jax.errors import ConfigError

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class PreferencePair:
  """Token ids of one preference: the prompt and the preferred (chosen) and dispreferred
  (rejected) answers."""

  prompt: tuple[int, ...]
  chosen: tuple[int, ...]
  rejected: tuple[int, ...]


def read_preferences(
    path: str | pathlib.Path,
    config: ml_collections.ConfigDict,
    flag: str = "posttrain.preferences",
) -> list[PreferencePair]:
  """The preference pairs of a JSONL file, tokenized for `config`'s model (`flag` names the
  setting that gave the path in errors).

  Raises:
    ConfigError: one line naming file:line and what is wrong: not a JSON object, a missing or
      non-string chosen/rejected, a prompt that is neither text nor a list of {role, content}
      messages, two equal answers, or a pair the scorer cannot take (empty answer, ids outside the
      vocabulary, longer than model.max_sequence_length; `likelihood.check_pairs`).
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(
        f"{flag}={path} does not exist: expected a JSONL file of {{prompt, chosen, rejected}} "
        "objects"
    )
  codec = text_codec(config)
  pairs = []
  for number, obj in read_jsonl_lines(path, ("chosen", "rejected")):
    where = f"{path}:{number}:"
    if obj["chosen"] == obj["rejected"]:
      raise ConfigError(f"{where} chosen and rejected are the same answer: expected two answers")
    prompt = prompt_ids(codec, obj.get("prompt"), where)
    pair = encode_pair(config, codec, prompt, obj["chosen"], obj["rejected"])
    try:
      check_pairs(config, [pair.prompt] * 2, [pair.chosen, pair.rejected], 1, 1, 0.0)
    except ConfigError as e:
      raise ConfigError(f"{where} {e}") from None
    pairs.append(pair)
  if not pairs:
    raise ConfigError(f"{path} holds no preference pairs: expected one JSON object per line")
  return pairs


def encode_pair(
    config: ml_collections.ConfigDict,
    codec: Codec,
    prompt: str | Sequence[int],
    chosen: str,
    rejected: str,
) -> PreferencePair:
  """One pair in ids: the prompt (text, or ids already rendered) and both answers, each ended with
  the model's end of answer (EoT under the chat template, else EOS)."""
  end = [config.tokens.eot_id if has_chat_template(codec) else config.tokens.eos_id]
  ids = codec.encode(prompt) if isinstance(prompt, str) else list(prompt)
  return PreferencePair(
      tuple(ids), tuple(codec.encode(chosen) + end), tuple(codec.encode(rejected) + end)
  )


def prompt_ids(codec: Codec, prompt: Any, where: str) -> list[int]:
  """The ids of a prompt: text as it is, messages through the chat template; ConfigError naming
  `where` (file:line) for anything else."""
  if isinstance(prompt, str):
    return codec.encode(prompt)
  ok = (
      isinstance(prompt, list)
      and prompt
      and all(
          isinstance(m, dict)
          and m.get("role") in ROLES
          and isinstance(m.get("content"), str)
          and set(m) == {"role", "content"}
          for m in prompt
      )
  )
  if not ok:
    raise ConfigError(
        f"{where} prompt={str(prompt)[:60]!r} is not allowed: expected text or a non-empty list "
        f"of {{'role': one of {', '.join(ROLES)}, 'content': text}} messages"
    )
  ids, _ = chat_prompt(codec, [ChatMessage(m["role"], m["content"]) for m in prompt])
  return ids
