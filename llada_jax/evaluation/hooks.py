"""The trainer's periodic evaluation (config.evaluation.tasks) as a hook `llada-train` passes in.

The training loop knows nothing of evaluation: it calls each hook at its evaluation steps with the
current parameters and writes the scalars returned under "eval/". The tasks run through the same
harness as `llada-evaluate`.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from llada_jax import storage
from llada_jax.data.codec import text_codec
from llada_jax.evaluation import harness
from llada_jax.evaluation.model import eval_model_from_params
from llada_jax.sampling.options import SamplerOptions

# (step, parameters, workdir) -> {"<task>/<metric>": value}.
EvalHook = Callable[[int, Any, storage.PathLike], dict[str, float]]


def from_config(config: ml_collections.ConfigDict) -> list[EvalHook]:
  """The hooks config.evaluation asks for: one running its tasks, or none when tasks is empty.

  Raises:
    ConfigError: an unknown task name, or sampling options this model cannot run (before anything
      is trained).
  """
  ev = config.evaluation
  if not ev.tasks:
    return []
  # What generation tasks need of this model (gen_length below max_sequence_length, x64 for
  # float64), checked before the first step rather than at the first evaluation.
  SamplerOptions.from_config(config).validate(config, prefix="sampling.")
  options = harness.EvalOptions(
      tasks=tuple(harness.parse_tasks(ev.tasks, flag="evaluation.tasks")),
      limit=ev.limit,
      seed=config.seed,
      mc_num=ev.mc_num,
      mc_batch_size=ev.mc_batch_size,
      sampler=dict(config.sampling.to_dict(), logits_eos_inf=False, confidence_eos_eot_inf=False),
  )

  def evaluate_tasks(step: int, params: Any, workdir: storage.PathLike) -> dict[str, float]:
    model = eval_model_from_params(config, params, text_codec(config), step, str(workdir))
    return harness.scalars(harness.run_tasks(model, options))

  return [evaluate_tasks]
