"""Where an answer ends: the one rule of every command (sample, chat, evaluation, lm-eval).

An answer ends before its first end token, the end of sequence (EOS) or the end of turn (EoT) of the
model's vocabulary (`config.tokens`, -1 when a vocabulary has none), and its text before the
earliest stop string the caller gives (few-shot separators such as "Question:", lm-eval's
`until` list). The reverse process fills all gen_length positions at once, so the cut is applied to
the finished answer: a stop string may span several tokens, and where the tokenizer splits it is
not known inside the compiled sampler.
"""

from __future__ import annotations

from typing import Callable, Sequence

import ml_collections


def end_ids(tokens: ml_collections.ConfigDict) -> tuple[int, ...]:
  """The ids that end an answer: EOS and EoT, those the vocabulary has (>= 0)."""
  return tuple(i for i in (tokens.eos_id, tokens.eot_id) if i >= 0)


def cut_ids(ids: Sequence[int], tokens: ml_collections.ConfigDict) -> list[int]:
  """The ids before the first EOS or EoT (all of them when there is none)."""
  ids = list(ids)
  ends = [ids.index(i) for i in end_ids(tokens) if i in ids]
  return ids[: min(ends)] if ends else ids


def cut_text(text: str, stops: Sequence[str] = ()) -> str:
  """text before the earliest occurrence of any non-empty stop string."""
  ends = [text.find(s) for s in stops if s and s in text]
  return text[: min(ends)] if ends else text


def end_answer(
    ids: Sequence[int],
    tokens: ml_collections.ConfigDict,
    decode: Callable[[list[int]], str],
    stops: Sequence[str] = (),
) -> tuple[list[int], str]:
  """(ids, text) of a generated answer: ids cut at the first end token, their text at the first
  stop string."""
  kept = cut_ids(ids, tokens)
  return kept, cut_text(decode(kept), stops)
