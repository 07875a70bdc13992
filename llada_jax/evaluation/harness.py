"""Runs a list of evaluation tasks on one model and returns the results document.

The same code serves `llada-evaluate` and the trainer's periodic evaluation (config.evaluation,
through `llada_jax.evaluation.hooks`). The document's layout (RESULTS_SCHEMA) is stable: tools may
rely on its keys. `TASKS` is the registry of task names: a new task or protocol is one runner
registered here with `register_task`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib
import time
from typing import Any, Callable

import jax
import ml_collections

from llada_jax.evaluation.elbo import evaluate_elbo
from llada_jax.diffusion.likelihood import check_mc
from llada_jax.errors import ConfigError
from llada_jax.evaluation.gsm8k import PROMPT_FORMATS, evaluate_gsm8k
from llada_jax.evaluation.model import EvalModel
from llada_jax.evaluation.multiple_choice import evaluate_multiple_choice
from llada_jax.evaluation.tasks import MULTIPLE_CHOICE, MultipleChoice, gsm8k, read_jsonl_task
from llada_jax.config import check_sampling
from llada_jax.sampling.options import SamplerOptions

RESULTS_SCHEMA = 1
# Metrics that get a TensorBoard scalar (the others are counts and settings).
SCALAR_METRICS = ("acc", "acc_norm", "exact_match", "bits_per_byte", "bits_per_token")


@dataclasses.dataclass(frozen=True)
class EvalOptions:
  """Everything that shapes an evaluation besides the model (the CLI flags)."""

  tasks: tuple[str, ...] = ("elbo",)
  task_files: tuple[str, ...] = ()
  limit: int | None = None
  seed: int = 0
  mc_num: int = 128
  mc_batch_size: int = 16
  cfg_scale: float = 0.0
  elbo_task: str | None = None
  elbo_samples: int = 1
  gsm8k_format: str = "auto"
  num_fewshot: int = 4
  generation_batch_size: int = 8
  sampler: dict[str, Any] = dataclasses.field(default_factory=dict)  # over config.sampling


def sampler_options(options: EvalOptions, config: ml_collections.ConfigDict) -> SamplerOptions:
  """The generation tasks' sampler: config.sampling with the values of options.sampler.

  Raises:
    ConfigError: options.sampler names something that is not a sampler option.
  """
  return SamplerOptions.from_config(config).replace(**options.sampler)


def check_options(options: EvalOptions, config: ml_collections.ConfigDict | None = None) -> None:
  """Raises ConfigError (one line) for any option no task could run with, before any work: the
  Monte-Carlo numbers, limits, GSM8K prompt settings, each given sampler option and, given the
  model's config, the sampler options of generation tasks together."""
  check_mc(options.mc_num, options.mc_batch_size, prefix="--")
  check_sampling(options.sampler, prefix="--sampler.")
  for name in ("elbo_samples", "generation_batch_size"):
    if getattr(options, name) < 1:
      raise ConfigError(
          f"--{name}={getattr(options, name)} is not allowed: expected a positive " "integer"
      )
  if options.limit is not None and options.limit < 1:
    raise ConfigError(f"--limit={options.limit} is not allowed: expected a positive integer")
  if options.cfg_scale < 0:
    raise ConfigError(f"--cfg_scale={options.cfg_scale} is not allowed: expected a number >= 0")
  if options.num_fewshot < 0:
    raise ConfigError(f"--num_fewshot={options.num_fewshot} is not allowed: expected >= 0")
  if options.gsm8k_format not in PROMPT_FORMATS:
    raise ConfigError(
        f"--gsm8k_format={options.gsm8k_format} is not allowed: expected one of "
        f"{', '.join(PROMPT_FORMATS)}"
    )
  if config is not None and "gsm8k" in options.tasks:
    sampler_options(options, config).validate_given(config, options.sampler, "--sampler.")


# A task runner: (model, options, progress factory or None, task name) -> (metrics, samples or
# None). progress(task, total) may return a callback receiving the number of items just finished.
Progress = Callable[[str, int], Callable[[int], None]] | None
TaskRunner = Callable[[EvalModel, EvalOptions, Progress, str], tuple[dict[str, Any], Any]]


def _run_elbo(
    model: EvalModel, options: EvalOptions, progress: Progress, name: str
) -> tuple[dict[str, Any], None]:
  """The likelihood bound on held-out text (`evaluate_elbo`)."""
  metrics = evaluate_elbo(
      model,
      task=options.elbo_task,
      limit=options.limit,
      samples=options.elbo_samples,
      seed=options.seed,
      progress=progress and progress(name, options.limit or 0),
  )
  return metrics, None


def _run_gsm8k(
    model: EvalModel, options: EvalOptions, progress: Progress, name: str
) -> tuple[dict[str, Any], Any]:
  """GSM8K exact match by generation (`evaluate_gsm8k`)."""
  problems = gsm8k("test")[: options.limit]
  return evaluate_gsm8k(
      model,
      problems,
      prompt_format=options.gsm8k_format,
      num_fewshot=options.num_fewshot,
      seed=options.seed,
      batch_size=options.generation_batch_size,
      progress=progress and progress(name, len(problems)),
      **dataclasses.asdict(sampler_options(options, model.config)),
  )


def _run_multiple_choice(
    items: Callable[[], list[MultipleChoice]],
    model: EvalModel,
    options: EvalOptions,
    progress: Progress,
    name: str,
) -> tuple[dict[str, Any], Any]:
  """Accuracy by likelihood over the choices (`evaluate_multiple_choice`)."""
  chosen = items()[: options.limit]
  return evaluate_multiple_choice(
      model,
      chosen,
      mc_num=options.mc_num,
      batch_size=options.mc_batch_size,
      cfg_scale=options.cfg_scale,
      seed=options.seed,
      progress=progress and progress(name, sum(len(i.choices) for i in chosen)),
  )


TASKS: dict[str, TaskRunner] = {"elbo": _run_elbo}
TASKS.update(
    {
        name: functools.partial(_run_multiple_choice, items)
        for name, items in MULTIPLE_CHOICE.items()
    }
)
TASKS["gsm8k"] = _run_gsm8k


def register_task(name: str, runner: TaskRunner) -> None:
  """Adds a task `name` that `--tasks` and config.evaluation.tasks then accept.

  Raises:
    ConfigError: the name is taken.
  """
  if name in TASKS:
    raise ConfigError(f"task {name!r} is already registered: expected a new name")
  TASKS[name] = runner


def parse_tasks(names: str, flag: str = "--tasks") -> list[str]:
  """A comma-separated task list (of the option `flag`), checked against `TASKS`."""
  tasks = [n.strip() for n in names.split(",") if n.strip()]
  for name in tasks:
    if name not in TASKS:
      hint = " (or give --task_file=path.jsonl)" if flag == "--tasks" else ""
      raise ConfigError(f"{flag}: unknown task {name!r}; known tasks: {', '.join(TASKS)}{hint}")
  if len(set(tasks)) != len(tasks):
    raise ConfigError(f"{flag}={names} names a task twice")
  return tasks


def task_names(options: EvalOptions) -> list[str]:
  """Names of the tasks to run: the registered ones, then one per task file (its file stem)."""
  return list(options.tasks) + [pathlib.Path(f).stem for f in options.task_files]


def run_tasks(model: EvalModel, options: EvalOptions, progress: Progress = None) -> dict[str, Any]:
  """Evaluates every task of `options`; returns the results document (JSON-serialisable).

  progress(task, total) may return a callback receiving the number of items just finished.
  """
  check_options(options, model.config)
  start = time.time()
  results: dict[str, Any] = {}
  samples: dict[str, Any] = {}
  files = dict(zip(task_names(options)[len(options.tasks) :], options.task_files))
  for name in task_names(options):
    task_start = time.time()
    runner = (
        functools.partial(_run_multiple_choice, functools.partial(read_jsonl_task, files[name]))
        if name in files
        else TASKS[name]
    )
    metrics, task_samples = runner(model, options, progress, name)
    if task_samples is not None:
      samples[name] = task_samples
    metrics["wall_time_s"] = time.time() - task_start
    results[name] = metrics
  return dict(
      schema=RESULTS_SCHEMA,
      checkpoint=model.path,
      step=model.step,
      results=results,
      samples=samples,
      options=dataclasses.asdict(options),
      model=model.config.model.to_dict(),
      tokens=model.config.tokens.to_dict(),
      num_processes=jax.process_count(),
      num_devices=jax.device_count(),
      wall_time_s=time.time() - start,
  )


def to_json(document: dict[str, Any]) -> str:
  """The results document as strict JSON: a NaN or infinity (e.g. the stderr of a single item)
  is written as null, which every JSON parser reads."""

  def safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
      return None
    if isinstance(value, dict):
      return {k: safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
      return [safe(v) for v in value]
    return value

  return json.dumps(safe(document), indent=1, allow_nan=False)


def scalars(document: dict[str, Any]) -> dict[str, float]:
  """'<task>/<metric>' -> value for the headline metrics, for TensorBoard."""
  return {
      f"{task}/{name}": float(value)
      for task, metrics in document["results"].items()
      for name, value in metrics.items()
      if name in SCALAR_METRICS
  }
