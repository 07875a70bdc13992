"""GSM8K by conditional generation: prompt, sample with the reverse process, extract, compare.

Prompts are few-shot ("Question: ...\\nAnswer: <worked solution ending #### N>" examples from the
train split, as lm-evaluation-harness) or, for chat models, the LLaDA-Instruct chat template. A
few-shot generation is cut at the first FEWSHOT_STOPS string (the model goes on to invent the next
question), then the answer is the number after '####', else the last number in the text; a
prediction is right when it equals the gold number exactly (after removing commas, '$' and a
trailing '.').
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import numpy as np

from llada_jax.errors import ConfigError
from llada_jax.evaluation.generation import generate_answers
from llada_jax.evaluation.model import EvalModel
from llada_jax.evaluation.multiple_choice import mean_and_stderr
from llada_jax.evaluation.tasks import MathProblem, gsm8k
from llada_jax.sampling.ending import cut_text

PROMPT_FORMATS = ("auto", "fewshot", "chat")
# Where a few-shot answer ends (lm-evaluation-harness's gsm8k `until`, and the blank line that
# separates the examples): past them the model writes the next question and its answer.
FEWSHOT_STOPS = ("Question:", "\n\n")
_NUMBER = re.compile(r"-?[$]?\d[\d,]*(?:\.\d+)?")


def normalize_number(text: str) -> str:
  """'$1,234.50' -> '1234.5', '72.' -> '72', '-3.0' -> '-3': one spelling per number."""
  text = text.strip().replace(",", "").replace("$", "").rstrip(".")
  try:
    value = float(text)
  except ValueError:
    return text
  if value == int(value):
    return str(int(value))
  return repr(value)


def extract_answer(text: str) -> str | None:
  """The number after the last '####' if there is one, else the last number; None if none."""
  if "####" in text:
    found = _NUMBER.findall(text.split("####")[-1])
    if found:
      return normalize_number(found[0])
  found = _NUMBER.findall(text)
  return normalize_number(found[-1]) if found else None


def fewshot_prefix(num_fewshot: int) -> str:
  """The first num_fewshot train problems as worked examples."""
  shots = gsm8k("train")[:num_fewshot]
  return "".join(f"Question: {p.question}\nAnswer: {p.solution}\n\n" for p in shots)


def build_prompts(
    model: EvalModel,
    problems: Sequence[MathProblem],
    prompt_format: str,
    num_fewshot: int,
    gen_length: int,
) -> tuple[list[list[int]], int, bool]:
  """Prompt ids (left-truncated to leave gen_length tokens), how many were cut, and whether they
  are chat prompts."""
  if prompt_format not in PROMPT_FORMATS:
    raise ConfigError(
        f"--gsm8k_format={prompt_format} is not allowed: expected one of {PROMPT_FORMATS}"
    )
  chat = hasattr(model.codec, "special") and model.codec.special.get("eot_id", -1) >= 0
  if prompt_format == "chat" and not chat:
    raise ConfigError(
        "--gsm8k_format=chat is not allowed for this checkpoint: its tokenizer has "
        "no chat tokens; use fewshot"
    )
  use_chat = chat if prompt_format == "auto" else prompt_format == "chat"
  limit = model.config.model.max_sequence_length - gen_length
  if limit < 1:
    raise ConfigError(
        f"gen_length={gen_length} is not allowed: expected less than "
        f"model.max_sequence_length={model.config.model.max_sequence_length}"
    )
  prefix = "" if use_chat else fewshot_prefix(num_fewshot)
  prompts, cut = [], 0
  for problem in problems:
    if use_chat:
      from llada_jax.data.hf_tokenizer import ChatMessage, chat_prompt_ids  # pylint: disable=g-import-not-at-top

      ids = chat_prompt_ids(model.codec, [ChatMessage("user", problem.question)])
    else:
      ids = list(model.codec.encode(f"{prefix}Question: {problem.question}\nAnswer:"))
    cut += len(ids) > limit
    prompts.append(ids[-limit:])
  return prompts, cut, use_chat


def evaluate_gsm8k(
    model: EvalModel,
    problems: Sequence[MathProblem],
    *,
    prompt_format: str,
    num_fewshot: int,
    seed: int = 0,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
    **sampler: Any,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """Exact-match accuracy with its standard error, and one record per problem."""
  prompts, truncated, chat = build_prompts(
      model, problems, prompt_format, num_fewshot, sampler["gen_length"]
  )
  stops = () if chat else FEWSHOT_STOPS
  answers = generate_answers(
      model, prompts, seed=seed, batch_size=batch_size, progress=progress, **sampler
  )
  records, correct = [], []
  for problem, answer in zip(problems, answers):
    text = cut_text(model.codec.decode(answer), stops)
    predicted = extract_answer(text)
    correct.append(float(predicted == normalize_number(problem.answer)))
    records.append(
        dict(
            question=problem.question,
            generation=text,
            predicted=predicted,
            gold=problem.answer,
            correct=bool(correct[-1]),
        )
    )
  accuracy, stderr = mean_and_stderr(np.asarray(correct))
  return (
      dict(
          exact_match=accuracy, exact_match_stderr=stderr, count=len(problems), truncated=truncated
      ),
      records,
  )
