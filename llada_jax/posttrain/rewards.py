"""Rewards of RL post-training: a table of Python functions reward(answer_text, reference) ->
float, named by posttrain.rewards ("name" or "name:weight,name:weight"; the reward of an answer is
the weighted sum). A new verifiable task adds one function here.

- "gsm8k": 1 when the answer's number (`evaluation.gsm8k.extract_answer`: after the last "####",
  else the last number) equals the reference's, else 0 (d1's correctness reward).
- "exact": 1 when the answer, stripped of surrounding whitespace, equals the reference.
- "number_format": 0.5 when the answer holds a number at all (a format reward, d1-style shaping).
"""

from __future__ import annotations

from typing import Callable

from llada_jax.errors import ConfigError
from llada_jax.evaluation.gsm8k import extract_answer, normalize_number

Reward = Callable[[str, str], float]


def _gsm8k(answer: str, reference: str) -> float:
  found = extract_answer(answer)
  return float(found is not None and found == normalize_number(reference))


def _exact(answer: str, reference: str) -> float:
  return float(answer.strip() == reference.strip())


def _number_format(answer: str, reference: str) -> float:
  del reference
  return 0.5 * float(extract_answer(answer) is not None)


REWARDS: dict[str, Reward] = {"gsm8k": _gsm8k, "exact": _exact, "number_format": _number_format}


def parse_rewards(spec: str) -> tuple[tuple[str, float], ...]:
  """("name", weight) pairs of posttrain.rewards.

  Raises:
    ConfigError: an empty spec, an unknown name or a weight that is not a number.
  """
  out = []
  for part in spec.split(","):
    name, _, weight = part.strip().partition(":")
    if name not in REWARDS:
      raise ConfigError(
          f"posttrain.rewards={spec!r} is not allowed: {name!r} is not a reward; expected "
          f"names of {', '.join(sorted(REWARDS))}, each optionally ':weight', comma-separated"
      )
    try:
      out.append((name, float(weight) if weight else 1.0))
    except ValueError:
      raise ConfigError(
          f"posttrain.rewards={spec!r} is not allowed: weight {weight!r} of {name} is not a number"
      ) from None
  return tuple(out)


def reward(spec: tuple[tuple[str, float], ...], answer: str, reference: str) -> float:
  """The weighted sum of the rewards of `spec` (`parse_rewards`) for one answer."""
  return sum(weight * REWARDS[name](answer, reference) for name, weight in spec)
