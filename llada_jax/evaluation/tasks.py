"""Evaluation data: the bundled benchmarks and the generic multiple-choice JSONL format.

A multiple-choice item is a context, its choices and the gold index; each choice is scored as the
continuation `continuation_prefix + choice` of the context. Bundled: HellaSwag (validation),
ARC-Easy/Challenge (test) and PIQA (validation), copied with their SOURCE and licence files into
llada_jax/evaluation/data/, and GSM8K (test) from llada_jax/data/sft/gsm8k/.
Generic JSONL: one object a line with `context` (str), `choices` (list of str), `gold` (int) and
optionally `continuation_prefix` (str, default " ").
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import pathlib
from typing import Callable

from llada_jax.errors import ConfigError

DATA_DIR = pathlib.Path(__file__).parent / "data"
GSM8K_DIR = pathlib.Path(__file__).parent.parent / "data" / "sft" / "gsm8k"


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """One item: score log p(continuation_prefix + choice | context) for every choice."""

  context: str
  choices: tuple[str, ...]
  gold: int
  continuation_prefix: str = " "


@dataclasses.dataclass(frozen=True)
class MathProblem:
  """A GSM8K problem: the question, the worked solution and its final number."""

  question: str
  solution: str
  answer: str


def _check_item(item: MultipleChoice, where: str) -> MultipleChoice:
  if len(item.choices) < 2:
    raise ConfigError(f"{where}: {len(item.choices)} choices is not allowed: expected at least 2")
  if not 0 <= item.gold < len(item.choices):
    raise ConfigError(
        f"{where}: gold={item.gold} is not allowed: expected an index in "
        f"[0, {len(item.choices)})"
    )
  return item


def read_jsonl_task(path: str | pathlib.Path) -> list[MultipleChoice]:
  """Items of a generic multiple-choice JSONL file; a bad line fails naming file:line."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ConfigError(
        f"--task_file={path} names no file: expected a JSONL file of "
        '{"context", "choices", "gold"} objects'
    )
  items = []
  with path.open(encoding="utf-8") as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ConfigError(f"{where}: not a JSON object ({e.msg})") from None
      if not isinstance(record, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
      missing = [k for k in ("context", "choices", "gold") if k not in record]
      if missing:
        raise ConfigError(
            f"{where}: missing field {missing[0]!r}: every line needs context, " "choices and gold"
        )
      choices, gold = record["choices"], record["gold"]
      if (
          not isinstance(choices, list)
          or not all(isinstance(c, str) for c in choices)
          or not isinstance(gold, int)
          or not isinstance(record["context"], str)
      ):
        raise ConfigError(
            f"{where}: expected context a string, choices a list of strings and " "gold an integer"
        )
      items.append(
          _check_item(
              MultipleChoice(
                  record["context"], tuple(choices), gold, record.get("continuation_prefix", " ")
              ),
              where,
          )
      )
  if not items:
    raise ConfigError(f"--task_file={path} holds no items")
  return items


def _hellaswag() -> list[MultipleChoice]:
  """HellaSwag validation: 6 lines per item (context, gold, four endings)."""
  lines = bz2.decompress((DATA_DIR / "hellaswag" / "hellaswag_val_full.txt.bz2").read_bytes())
  lines = lines.decode("utf-8").splitlines()
  return [
      MultipleChoice(lines[i], tuple(lines[i + 2 : i + 6]), int(lines[i + 1]))
      for i in range(0, len(lines) - 5, 6)
  ]


def _arc(level: str) -> list[MultipleChoice]:
  """ARC test in llm-foundry's format; scored as lm-eval does: "Question: q\\nAnswer: choice"."""
  items = []
  path = DATA_DIR / "arc" / f"arc_{level}_test.jsonl"
  for line in path.read_text(encoding="utf-8").splitlines():
    record = json.loads(line)
    items.append(
        MultipleChoice(record["query"] + "\nAnswer:", tuple(record["choices"]), record["gold"])
    )
  return items


def _piqa() -> list[MultipleChoice]:
  """PIQA validation: "Question: goal\\nAnswer: solution", labels from valid-labels.lst."""
  folder = DATA_DIR / "piqa"
  labels = (folder / "valid-labels.lst").read_text(encoding="utf-8").split()
  items = []
  for line, label in zip((folder / "valid.jsonl").read_text(encoding="utf-8").splitlines(), labels):
    record = json.loads(line)
    items.append(
        MultipleChoice(
            f"Question: {record['goal']}\nAnswer:", (record["sol1"], record["sol2"]), int(label)
        )
    )
  return items


def gsm8k(split: str = "test") -> list[MathProblem]:
  """GSM8K problems; the gold answer is the number after '####'."""
  problems = []
  for line in (GSM8K_DIR / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
    record = json.loads(line)
    solution = record["answer"]
    problems.append(
        MathProblem(
            record["question"], solution, solution.split("####")[-1].strip().replace(",", "")
        )
    )
  return problems


MULTIPLE_CHOICE: dict[str, Callable[[], list[MultipleChoice]]] = {
    "hellaswag": _hellaswag,
    "arc_easy": lambda: _arc("easy"),
    "arc_challenge": lambda: _arc("challenge"),
    "piqa": _piqa,
}
