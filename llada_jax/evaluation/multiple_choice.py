"""Multiple choice by conditional likelihood, LLaDA's protocol for HellaSwag, ARC, PIQA, ...

Each choice is scored by the Monte-Carlo estimate of log p(prefix + choice | context); the
prediction is the highest score (`acc`) or the highest score per character of the choice
(`acc_norm`, as lm-evaluation-harness). Choices of one token are scored exactly with a single
sample. Pairs too long for the model lose their oldest tokens, the context's first and, for a choice
longer than the model, the choice's own first tokens (counted as `truncated`).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np

from llada_jax.errors import ConfigError
from llada_jax.evaluation.model import EvalModel
from llada_jax.evaluation.scoring import loglikelihoods
from llada_jax.evaluation.tasks import MultipleChoice


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  """Mean and its standard error (sample standard deviation / sqrt(n))."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float(values.mean()), float("nan")
  return float(values.mean()), float(values.std(ddof=1) / np.sqrt(values.size))


def fit_pair(
    context: list[int], continuation: list[int], limit: int
) -> tuple[list[int], list[int], bool]:
  """The window of context ++ continuation ending at the continuation's end, at most `limit`
  tokens (lm-eval's rule): oldest context tokens go first, then the continuation's first ones
  (one context token is kept). Also returns whether anything was cut."""
  cut = len(context) + len(continuation) > limit
  continuation = continuation[-(limit - 1) :]
  return context[max(0, len(context) + len(continuation) - limit) :], continuation, cut


def encode_pairs(
    model: EvalModel, items: Sequence[MultipleChoice]
) -> tuple[list[list[int]], list[list[int]], int]:
  """(contexts, continuations, number of items cut) as ids, one pair per choice, item-major."""
  limit = model.config.model.max_sequence_length
  contexts, continuations, cut = [], [], set()
  for number, item in enumerate(items):
    context = list(model.codec.encode(item.context))
    for choice in item.choices:
      continuation = list(model.codec.encode(item.continuation_prefix + choice))
      if not continuation:
        raise ConfigError(f"item {number}: choice {choice!r} encodes to no tokens")
      fitted_context, fitted_continuation, was_cut = fit_pair(context, continuation, limit)
      if was_cut:
        cut.add(number)
      contexts.append(fitted_context)
      continuations.append(fitted_continuation)
  return contexts, continuations, len(cut)


def evaluate_multiple_choice(
    model: EvalModel,
    items: Sequence[MultipleChoice],
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
  """acc and acc_norm with standard errors, count, truncated and mc_num; and per item its choices'
  scores (nats), their standard errors and the predictions."""
  contexts, continuations, truncated = encode_pairs(model, items)
  scores, stderrs = np.zeros(len(contexts)), np.zeros(len(contexts))
  single = np.asarray([len(c) == 1 for c in continuations])
  for group, (group_mc, group_batch) in ((single, (1, 1)), (~single, (mc_num, batch_size))):
    index = np.flatnonzero(group)
    if index.size:
      result = loglikelihoods(
          model,
          [contexts[i] for i in index],
          [continuations[i] for i in index],
          mc_num=group_mc,
          batch_size=group_batch,
          cfg_scale=cfg_scale,
          seed=seed,
          progress=progress,
          item_ids=index,
      )
      scores[index], stderrs[index] = result.log_likelihood, result.stderr
  correct, correct_norm, records, start = [], [], [], 0
  for item in items:
    item_scores = scores[start : start + len(item.choices)]
    item_stderrs = stderrs[start : start + len(item.choices)]
    start += len(item.choices)
    lengths = np.asarray([max(len(c), 1) for c in item.choices], np.float64)
    predicted, predicted_norm = int(np.argmax(item_scores)), int(np.argmax(item_scores / lengths))
    correct.append(float(predicted == item.gold))
    correct_norm.append(float(predicted_norm == item.gold))
    records.append(
        dict(
            scores=item_scores.tolist(),
            stderr=item_stderrs.tolist(),
            gold=item.gold,
            predicted=predicted,
            predicted_norm=predicted_norm,
        )
    )
  acc, acc_stderr = mean_and_stderr(np.asarray(correct))
  acc_norm, acc_norm_stderr = mean_and_stderr(np.asarray(correct_norm))
  chance = float(np.mean([1.0 / len(item.choices) for item in items]))
  return (
      dict(
          acc=acc,
          acc_stderr=acc_stderr,
          acc_norm=acc_norm,
          acc_norm_stderr=acc_norm_stderr,
          count=len(items),
          truncated=truncated,
          mc_num=mc_num,
          chance=chance,
      ),
      records,
  )
