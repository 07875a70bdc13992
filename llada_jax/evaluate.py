"""Evaluate a checkpoint: likelihood bound, multiple choice, GSM8K (LLaDA's protocol).

  python -m llada_jax.evaluate --checkpoint=runs/demo --tasks=elbo,hellaswag,arc_easy \
      [--task_file=my_benchmark.jsonl] [--limit=200] [--output=results.json] \
      [--mc_num=128 --cfg_scale=0] [--sampler.gen_length=256 --sampler.steps=256 ...]

--sampler.NAME sets any sampler option of generation tasks (`SamplerOptions`); unset ones take the
checkpoint's config.sampling, but temperature 0 and low_confidence remasking by default.

Tasks: elbo (bits per token/byte on the validation split of the checkpoint's data task),
hellaswag, arc_easy, arc_challenge, piqa (multiple choice by Monte-Carlo conditional likelihood),
gsm8k (generation + answer extraction). --task_file adds a multiple-choice JSONL file of
{"context", "choices", "gold"[, "continuation_prefix"]} lines. Runs on every process of a
multi-host job (items are split over hosts and devices); process 0 writes the results and, for a
training workdir, TensorBoard scalars under eval/ at the checkpoint's step.
"""

from __future__ import annotations

import dataclasses

import ml_collections
from absl import flags
from ml_collections import config_dict, config_flags

from llada_jax import storage
from llada_jax.cli_support import entry_point
from llada_jax.config import default_config
from llada_jax.errors import ConfigError

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Training workdir or HF LLaDA folder.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "tokenizer.json (default: the checkpoint's).")
_TASKS = flags.DEFINE_string("tasks", "elbo", "Comma-separated tasks.")
_TASK_FILE = flags.DEFINE_multi_string("task_file", [], "Multiple-choice JSONL file; repeatable.")
_LIMIT = flags.DEFINE_integer("limit", None, "At most this many items (sequences for elbo) a task.")
_OUTPUT = flags.DEFINE_string("output", None, "Write the results JSON here.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of every random choice (results depend on it only).")
_MC_NUM = flags.DEFINE_integer("mc_num", 128, "Monte-Carlo samples per choice (1 for one-token).")
_MC_BATCH = flags.DEFINE_integer("mc_batch_size", 16, "Samples per forward pass (divides mc_num).")
_CFG_SCALE = flags.DEFINE_float("cfg_scale", 0.0, "Classifier-free guidance weight.")
_ELBO_TASK = flags.DEFINE_string("elbo_task", None, "Data task for elbo (default: checkpoint's).")
_ELBO_SAMPLES = flags.DEFINE_integer("elbo_samples", 1, "Noise draws per elbo sequence.")
_GSM8K_FORMAT = flags.DEFINE_enum(
    "gsm8k_format",
    "auto",
    ["auto", "fewshot", "chat"],
    "GSM8K prompt: auto is chat for chat tokenizers, else fewshot.",
)
_NUM_FEWSHOT = flags.DEFINE_integer("num_fewshot", 4, "Worked examples in a few-shot prompt.")
_PROGRESS = flags.DEFINE_bool("progress", True, "Progress bar with ETA on process 0.")
# Every sampler option (llada_jax.sampling.options.SamplerOptions) as --sampler.NAME; unset ones
# take the checkpoint's config.sampling, except that generation is greedy with low-confidence
# remasking unless told otherwise, as in LLaDA's GSM8K evaluation.
_SAMPLER = config_flags.DEFINE_config_dict(
    "sampler",
    ml_collections.ConfigDict(
        dict(
            {
                name: config_dict.placeholder(type(value))
                for name, value in default_config().sampling.items()
            },
            temperature=0.0,
            remasking="low_confidence",
            batch_size=8,  # prompts per generation call
        )
    ),
    "Reverse-process options for generation tasks.",
)


def _progress_factory():
  """tqdm bars on process 0 (none elsewhere or with --noprogress)."""
  import jax  # pylint: disable=g-import-not-at-top

  if not _PROGRESS.value or jax.process_index() != 0:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  def make(task: str, total: int):
    bar = tqdm(total=total or None, desc=task, unit="item", dynamic_ncols=True)
    return bar.update

  return make


def _evaluate(argv: list[str]) -> None:
  """The `llada-evaluate` command: options checked, model loaded, tasks run, results written."""
  del argv
  import jax  # pylint: disable=g-import-not-at-top

  from llada_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.model import load_eval_model  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.tasks import read_jsonl_task  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.distributed import initialize  # pylint: disable=g-import-not-at-top

  if not _CHECKPOINT.value:
    raise ConfigError("--checkpoint is required: a training workdir or an HF LLaDA folder")
  tasks = harness.parse_tasks(_TASKS.value)
  for path in _TASK_FILE.value:
    read_jsonl_task(path)  # a bad file fails before the model is loaded
  if not tasks and not _TASK_FILE.value:
    raise ConfigError("--tasks is empty and no --task_file is given: nothing to evaluate")
  options = harness.EvalOptions(
      tasks=tuple(tasks),
      task_files=tuple(_TASK_FILE.value),
      limit=_LIMIT.value,
      seed=_SEED.value,
      mc_num=_MC_NUM.value,
      mc_batch_size=_MC_BATCH.value,
      cfg_scale=_CFG_SCALE.value,
      elbo_task=_ELBO_TASK.value,
      elbo_samples=_ELBO_SAMPLES.value,
      gsm8k_format=_GSM8K_FORMAT.value,
      num_fewshot=_NUM_FEWSHOT.value,
      generation_batch_size=_SAMPLER.value.batch_size,
      sampler={k: v for k, v in _SAMPLER.value.items() if k != "batch_size" and v is not None},
  )
  harness.check_options(options)  # before the model loads
  initialize()
  model = load_eval_model(_CHECKPOINT.value, _TOKENIZER.value)
  options = dataclasses.replace(
      options, sampler=dataclasses.asdict(harness.sampler_options(options, model.config))
  )
  harness.check_options(options, model.config)  # the sampler, before any task runs
  document = harness.run_tasks(model, options, _progress_factory())
  if jax.process_index() != 0:
    return
  for task, metrics in document["results"].items():
    shown = ", ".join(
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )
    print(f"{task}: {shown}", flush=True)
  if _OUTPUT.value:
    storage.path(_OUTPUT.value).write_text(harness.to_json(document), encoding="utf-8")
  if model.step is not None:
    from llada_jax.training import metrics  # pylint: disable=g-import-not-at-top

    writer = metrics.MetricWriter(model.path, metrics.Accounting.from_config(model.config))
    writer.write(model.step, harness.scalars(document), prefix="eval/")
    writer.close()


run = entry_point(_evaluate)  # console script `llada-evaluate`


if __name__ == "__main__":
  run()
