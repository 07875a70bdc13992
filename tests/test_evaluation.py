"""Evaluation: a trained model beats chance on a learnable multiple-choice set, GSM8K extraction,
the likelihood bound, the results document, and clear errors for bad input."""

import json
import os
import pathlib
import random
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.errors import ConfigError
from llada_jax.evaluation import harness, hooks, tasks
from llada_jax.evaluation.gsm8k import extract_answer, normalize_number
from llada_jax.evaluation.harness import RESULTS_SCHEMA, EvalOptions, run_tasks
from llada_jax.evaluation.model import eval_model_from_params, load_eval_model
from llada_jax.evaluation.multiple_choice import evaluate_multiple_choice
from llada_jax.evaluation.scoring import loglikelihoods
from llada_jax.model import ModelConfig, Transformer

ITEMS = 24
ALPHABET = "abcdefgh"


def _word(rng):
  return "".join(rng.choice(ALPHABET) for _ in range(3))


def _copy_items(rng):
  """Items "xyz =" whose gold choice copies the word (" xyz."); three other words as distractors.
  The words are new to the model: only the rule it learned can pick the gold choice."""
  items = []
  for _ in range(ITEMS):
    word = _word(rng)
    choices = [word]
    while len(choices) < 4:
      other = _word(rng)
      if other not in choices:
        choices.append(other)
    rng.shuffle(choices)
    items.append(
        {"context": f"{word} =", "choices": [c + "." for c in choices], "gold": choices.index(word)}
    )
  return items


def train_copy_model(root: pathlib.Path) -> None:
  """Trains a small model for 400 steps on "xyz = xyz." lines (root/"copy.jsonl", one a document)
  into root/"run", and writes the copy items to root/"copy_mc.jsonl": the model learns to copy,
  which makes the gold choice of the copy items predictable."""
  from llada_jax.data.registry import register_text_task  # pylint: disable=g-import-not-at-top
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  rng = random.Random(0)
  corpus = root / "copy.jsonl"
  lines = [f"{w} = {w}." for w in (_word(rng) for _ in range(3000))]
  corpus.write_text("".join(json.dumps({"text": line}) + "\n" for line in lines))
  register_text_task("eval_copy", [corpus], [corpus])
  (root / "copy_mc.jsonl").write_text("".join(json.dumps(item) + "\n" for item in _copy_items(rng)))
  config = make_tiny_config(d_model=128, mlp_hidden_size=256)
  config.data.update(task="eval_copy", sequence_length=32, batch_size=16)
  config.optimizer.update(warmup_steps=20, peak_lr=4e-3, decay_fraction=0.3, final_lr=4e-4)
  config.train.update(num_steps=400, log_every=100, eval_every=400, eval_batches=1)
  config.checkpoint.update(save_every=400)
  config.evaluation.update(tasks="arc_easy", limit=2, mc_num=2, mc_batch_size=2)  # in the trainer
  train(config, root / "run", hooks.from_config(config))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """(workdir, copy items file) of `train_copy_model`'s run. The 400 steps run in a subprocess on
  one CPU device with XLA's default optimisation (this fixture is runtime-bound: on the suite's 8
  devices at -O0 it took 100 s alone on the 2-core CI host, on 8 at -O2 56 s, on one 33 s)."""
  root = tmp_path_factory.mktemp("copy")
  env = dict(
      os.environ,
      XLA_FLAGS="--xla_backend_optimization_level=2 --xla_force_host_platform_device_count=1",
  )
  script = (
      f"import pathlib, sys; sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r}); "
      f"import test_evaluation; test_evaluation.train_copy_model(pathlib.Path({str(root)!r}))"
  )
  done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-4000:]
  from llada_jax.data.registry import register_text_task  # pylint: disable=g-import-not-at-top

  register_text_task("eval_copy", [root / "copy.jsonl"], [root / "copy.jsonl"])  # the run's task
  return root / "run", root / "copy_mc.jsonl"


def test_trained_model_reaches_95_percent_where_random_init_is_near_chance(trained):
  workdir, task_file = trained
  model = load_eval_model(workdir)
  items = tasks.read_jsonl_task(task_file)
  trained_metrics, records = evaluate_multiple_choice(model, items, mc_num=16, batch_size=16)
  assert trained_metrics["acc"] >= 0.95, trained_metrics
  assert [r["gold"] for r in records] == [item.gold for item in items]
  assert all(len(r["scores"]) == 4 and max(r["scores"]) < 0 for r in records)

  params = Transformer(ModelConfig.from_config(model.config)).init(
      jax.random.PRNGKey(7), jnp.zeros((1, 8), jnp.int32)
  )
  fresh = eval_model_from_params(
      model.config, nn.meta.unbox(params)["params"], model.codec, None, "random-init"
  )
  random_metrics, _ = evaluate_multiple_choice(fresh, items, mc_num=16, batch_size=16)
  assert random_metrics["acc"] <= 0.6, random_metrics
  assert random_metrics["chance"] == 0.25 and random_metrics["count"] == ITEMS


def test_scores_depend_on_the_seed_only_not_on_how_pairs_are_batched(trained, monkeypatch):
  from llada_jax.evaluation import scoring  # pylint: disable=g-import-not-at-top

  model = load_eval_model(trained[0])
  words = ["abc", "bcd", "cdefgh", "de", "efgabc"]
  prompts = [list(model.codec.encode(f"{w} =")) for w in words]
  answers = [list(model.codec.encode(f" {w}.")) for w in words]
  together = loglikelihoods(model, prompts, answers, mc_num=8, batch_size=4, seed=3)
  monkeypatch.setattr(scoring, "TOKENS_PER_DEVICE", 4 * 32)  # one pair per device per call
  split = loglikelihoods(model, prompts, answers, mc_num=8, batch_size=4, seed=3)
  np.testing.assert_allclose(split.log_likelihood, together.log_likelihood, rtol=1e-5)
  other_seed = loglikelihoods(model, prompts, answers, mc_num=8, batch_size=4, seed=4)
  assert not np.allclose(together.log_likelihood, other_seed.log_likelihood)


def _bound_by_hand(model, rows, draws, seed=0):
  """LLaDA's bound (nats per token) on the first `rows` held-out sequences of the model's task, by
  hand: t on a stratified grid of `draws` values in (0, 1), p = (1 - eps) t + eps, each token
  masked with probability p (NumPy), the plain network's masked cross-entropies divided by p and
  summed, over the row's tokens. (mean over rows, its standard error over rows)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from llada_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(model.config.to_dict())
  config.data.update(masking="device", num_shards=-1)
  batch = {
      k: np.asarray(v)[:rows]
      for k, v in pipeline.eval_batches(config, model.item_sharding, 1)[0].items()
  }
  tokens, valid = batch["targets"], batch["valid"]
  rng = np.random.default_rng(seed)
  t = (np.arange(draws) + rng.uniform()) / draws
  p = (1 - config.diffusion.eps) * t + config.diffusion.eps  # [draws]
  masked = (rng.uniform(size=(rows, draws) + tokens.shape[1:]) < p[None, :, None]) & valid[:, None]
  inputs = np.where(masked, config.tokens.mask_id, tokens[:, None])

  def repeat(x):
    return jnp.asarray(np.repeat(x, draws, axis=0))

  network = Transformer(ModelConfig.from_config(config))
  logits = network.apply(
      {"params": model.params},
      jnp.asarray(inputs.reshape(rows * draws, -1)),
      repeat(valid),
      repeat(batch["positions"]),
      repeat(batch["segment_ids"]),
  )
  logp = np.asarray(jax.nn.log_softmax(logits), np.float64).reshape(masked.shape + (-1,))
  ce = -np.take_along_axis(logp, np.broadcast_to(tokens[:, None], masked.shape)[..., None], -1)
  per_row = (np.where(masked, ce[..., 0] / p[None, :, None], 0.0).sum(-1)).mean(-1)
  per_row = per_row / valid.sum(-1)
  return per_row.mean(), per_row.std(ddof=1) / np.sqrt(rows)


def test_results_document_schema_and_elbo(trained):
  workdir, task_file = trained
  model = load_eval_model(workdir)
  options = EvalOptions(
      tasks=("elbo",),
      task_files=(str(task_file),),
      limit=8,
      mc_num=4,
      mc_batch_size=4,
      elbo_samples=64,  # the bound to a few percent: nats and bits differ by 31%
  )
  document = run_tasks(model, options)
  assert set(document) == {
      "schema",
      "checkpoint",
      "step",
      "results",
      "samples",
      "options",
      "model",
      "tokens",
      "num_processes",
      "num_devices",
      "wall_time_s",
  }
  assert document["schema"] == RESULTS_SCHEMA and document["step"] == 400
  elbo, mc = document["results"]["elbo"], document["results"]["copy_mc"]
  assert elbo["count"] == 8 and elbo["tokens"] == 8 * 32
  # Each "xyz = xyz." document is 10 bytes + EOS: 11 tokens of byte vocabulary per 10 bytes.
  assert elbo["bits_per_byte"] == pytest.approx(elbo["bits_per_token"] * 11 / 10, rel=0.02)
  # The bound by hand on the same 8 sequences is in nats: bits_per_token is it over ln 2 (nats
  # reported as bits would be ln 2 = 0.69 of it, about 7 standard errors below).
  nats, nats_stderr = _bound_by_hand(model, rows=8, draws=64)
  bits, bits_stderr = elbo["bits_per_token"], elbo["bits_per_token_stderr"]
  assert abs(bits - nats / np.log(2)) < 4 * np.hypot(bits_stderr, nats_stderr / np.log(2)), (
      bits,
      bits_stderr,
      nats / np.log(2),
      nats_stderr / np.log(2),
  )
  assert mc["count"] == 8 and {"acc", "acc_stderr", "acc_norm", "wall_time_s"} <= set(mc)
  json.dumps(document)


def test_gsm8k_generation_runs_and_records_each_problem(trained):
  model = load_eval_model(trained[0])
  options = EvalOptions(
      tasks=("gsm8k",),
      limit=3,
      num_fewshot=0,
      generation_batch_size=2,
      sampler=dict(
          gen_length=16,
          steps=4,
          block_length=8,
          temperature=0.0,
          remasking="low_confidence",
          logits_eos_inf=False,
          confidence_eos_eot_inf=False,
      ),
  )
  document = run_tasks(model, options)
  metrics, records = document["results"]["gsm8k"], document["samples"]["gsm8k"]
  assert metrics["count"] == 3 and metrics["truncated"] == 3  # questions exceed 64 - 16 tokens
  problems = tasks.gsm8k("test")[:3]
  assert [r["question"] for r in records] == [p.question for p in problems]
  correct = [
      extract_answer(r["generation"]) == normalize_number(p.answer)
      for r, p in zip(records, problems)
  ]
  assert [r["correct"] for r in records] == correct
  assert metrics["exact_match"] == np.mean(correct)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so she makes 9 * 2 = $18 a day.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("The answer is 72.", "72"),
        ("costs $5.50 then 3.0", "3"),
        ("#### -7", "-7"),
        ("she paid $1,050.00", "1050"),
        ("no digits here", None),
        ("first 3, #### then 4 and 5", "4"),
    ],
)
def test_gsm8k_answer_extraction(text, expected):
  assert extract_answer(text) == expected


def test_gsm8k_gold_answers_parse_and_normalize():
  problems = tasks.gsm8k("test")
  assert len(problems) == 1319
  assert all(normalize_number(p.answer) == extract_answer(p.solution) for p in problems)


def test_bundled_benchmarks_load_with_their_sizes():
  sizes = {name: len(load()) for name, load in tasks.MULTIPLE_CHOICE.items()}
  assert sizes == {"hellaswag": 10042, "arc_easy": 2376, "arc_challenge": 1172, "piqa": 1838}


@pytest.mark.parametrize(
    "line,message",
    [
        ('{"context": "a", "choices": ["x", "y"]}', "missing field 'gold'"),
        ('{"context": "a", "choices": ["x", "y"], "gold": 2}', "gold=2 is not allowed"),
        ('{"context": "a", "choices": "xy", "gold": 0}', "choices a list of strings"),
        ("not json", "not a JSON object"),
    ],
)
def test_bad_task_file_lines_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"context": "a", "choices": ["x", "y"], "gold": 0}\n' + line + "\n")
  with pytest.raises(ConfigError, match=rf"bad.jsonl:2: .*{message}"):
    tasks.read_jsonl_task(path)


def test_unknown_task_lists_the_known_ones():
  with pytest.raises(ConfigError, match="unknown task 'mmlu'; known tasks: elbo, hellaswag"):
    harness.parse_tasks("elbo,mmlu")
  config = make_tiny_config()
  config.evaluation.tasks = "piqa,mmlu"
  with pytest.raises(ConfigError, match="evaluation.tasks: unknown task 'mmlu'; known tasks: elbo"):
    hooks.from_config(config)  # what llada-train builds before it starts


def test_a_registered_task_runs_in_the_harness_and_by_name(monkeypatch):
  """A new protocol is one runner in the registry: --tasks accepts it and run_tasks calls it."""
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(harness, "TASKS", dict(harness.TASKS))
  calls = []

  def runner(model, options, progress, name):
    calls.append((name, options.limit))
    return {"acc": 0.25}, [{"item": 0}]

  harness.register_task("my_task", runner)
  assert harness.parse_tasks("elbo,my_task") == ["elbo", "my_task"]
  with pytest.raises(ConfigError, match="already registered"):
    harness.register_task("my_task", runner)
  model = SimpleNamespace(config=make_tiny_config(), path="p", step=3)
  document = run_tasks(model, EvalOptions(tasks=("my_task",), limit=5))
  assert calls == [("my_task", 5)]
  assert document["results"]["my_task"]["acc"] == 0.25
  assert document["samples"]["my_task"] == [{"item": 0}]
  assert harness.scalars(document) == {"my_task/acc": 0.25}


def test_results_json_is_strict_json():
  document = {"results": {"piqa": {"acc": 1.0, "acc_stderr": float("nan")}}, "x": [float("inf")]}
  assert json.loads(harness.to_json(document)) == {
      "results": {"piqa": {"acc": 1.0, "acc_stderr": None}},
      "x": [None],
  }


def test_trainer_hooks_refuse_sampling_options_the_model_cannot_run_before_training():
  config = make_tiny_config()  # max_sequence_length 64
  config.evaluation.tasks = "gsm8k"
  config.sampling.update(gen_length=64, steps=64, block_length=16)
  with pytest.raises(ConfigError, match=r"^sampling.gen_length=64 is not allowed: expected less"):
    hooks.from_config(config)


def test_tokenizer_that_does_not_match_the_checkpoint_is_refused(trained, tmp_path):
  import tokenizers  # pylint: disable=g-import-not-at-top
  from llada_jax.data.hf_tokenizer import SPECIAL_TOKENS  # pylint: disable=g-import-not-at-top

  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.train_from_iterator(
      ["abc = abc."] * 10,
      tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS.values())),
  )
  tokenizer.save(str(tmp_path / "tokenizer.json"))
  with pytest.raises(ConfigError, match="tokens.mask_id=259 is not allowed: the tokenizer has"):
    load_eval_model(trained[0], tokenizer=str(tmp_path / "tokenizer.json"))


def test_cli_writes_results_and_fails_in_one_line(trained, tmp_path):
  workdir, task_file = trained
  output = tmp_path / "results.json"
  cmd = [
      sys.executable,
      "-m",
      "llada_jax.evaluate",
      f"--checkpoint={workdir}",
      "--tasks=",
      f"--task_file={task_file}",
      "--limit=4",
      "--mc_num=4",
      "--mc_batch_size=4",
      f"--output={output}",
      "--noprogress",
  ]
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-2000:]
  document = json.loads(output.read_text())
  assert document["results"]["copy_mc"]["count"] == 4
  bad = subprocess.run(
      cmd[:4] + ["--tasks=hellaswag,nope"], capture_output=True, text=True, timeout=300, check=False
  )
  assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
      "error: --tasks: unknown task 'nope'"
  )


def test_trainer_ran_the_evaluation_tasks_at_its_eval_step(trained):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  tags = {
      (event.step, value.tag)
      for path in (trained[0] / "tensorboard").glob("events.out.tfevents.*")
      for event in tf.compat.v1.train.summary_iterator(str(path))
      for value in event.summary.value
  }
  assert {(400, "eval/arc_easy/acc"), (400, "eval/arc_easy/acc_norm")} <= tags


def test_two_processes_give_the_single_process_results(trained, tmp_path):
  """launch/local.sh runs llada-evaluate as 2 processes x 2 CPU devices: items are split over
  hosts and devices, and the gathered scores equal a single process's."""
  workdir, task_file = trained
  root = pathlib.Path(__file__).resolve().parents[1]
  output = tmp_path / "multi.json"
  flags = [
      f"--checkpoint={workdir}",
      "--tasks=gsm8k",
      f"--task_file={task_file}",
      "--limit=6",
      "--mc_num=4",
      "--mc_batch_size=4",
      "--num_fewshot=0",
      "--sampler.gen_length=16",
      "--sampler.steps=4",
      "--sampler.block_length=8",
      "--sampler.batch_size=2",
      "--noprogress",
  ]
  done = subprocess.run(
      [
          str(root / "launch" / "local.sh"),
          "2",
          "2",
          "--",
          sys.executable,
          "-m",
          "llada_jax.evaluate",
          *flags,
          f"--output={output}",
      ],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=root,
      check=False,
      env=dict(os.environ, PYTHONPATH=str(root)),
  )
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
  multi = json.loads(output.read_text())
  assert multi["num_processes"] == 2 and multi["num_devices"] == 4

  model = load_eval_model(workdir)
  single = run_tasks(
      model,
      EvalOptions(
          tasks=("gsm8k",),
          task_files=(str(task_file),),
          limit=6,
          mc_num=4,
          mc_batch_size=4,
          num_fewshot=0,
          generation_batch_size=2,
          sampler=dict(
              gen_length=16,
              steps=4,
              block_length=8,
              temperature=0.0,
              remasking="low_confidence",
              logits_eos_inf=False,
              confidence_eos_eot_inf=False,
          ),
      ),
  )
  golds = [item.gold for item in tasks.read_jsonl_task(task_file)[:6]]
  questions = [p.question for p in tasks.gsm8k("test")[:6]]
  for document in (multi, single):  # every item exactly once, in order
    assert [r["gold"] for r in document["samples"]["copy_mc"]] == golds
    assert [r["question"] for r in document["samples"]["gsm8k"]] == questions
  for a, b in zip(multi["samples"]["copy_mc"], single["samples"]["copy_mc"], strict=True):
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4)
  assert [s["generation"] for s in multi["samples"]["gsm8k"]] == [
      s["generation"] for s in single["samples"]["gsm8k"]
  ]


def test_pairs_longer_than_the_model_keep_their_newest_tokens():
  from types import SimpleNamespace  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.multiple_choice import encode_pairs  # pylint: disable=g-import-not-at-top

  codec = SimpleNamespace(encode=lambda text: [ord(c) for c in text])
  model = SimpleNamespace(config=make_tiny_config(), codec=codec)  # max_sequence_length 64
  items = [
      tasks.MultipleChoice("c" * 50, ("short", "x" * 70), 0),
      tasks.MultipleChoice("fits", ("a", "b"), 1),
  ]
  contexts, continuations, truncated = encode_pairs(model, items)
  assert truncated == 1 and all(len(c) + len(a) <= 64 for c, a in zip(contexts, continuations))
  assert continuations[0] == codec.encode(" short") and len(contexts[0]) == 50
  assert continuations[1] == codec.encode(" " + "x" * 70)[-63:] and contexts[1] == [ord("c")]
  assert contexts[2] == codec.encode("fits") and continuations[3] == codec.encode(" b")


def test_evaluate_names_a_sampler_default_as_the_checkpoints_not_as_typed():
  config = make_tiny_config()  # config.sampling: steps 8, gen_length 16, block_length 8
  options = EvalOptions(tasks=("gsm8k",), sampler={"gen_length": 12})
  with pytest.raises(
      ConfigError,
      match=r"^config.sampling.block_length=8 \(the checkpoint's default; no --sampler.block_length"
      r" was given\) is not allowed: expected a divisor of gen_length=12$",
  ):
    harness.check_options(options, config)
  with pytest.raises(ConfigError, match=r"^--sampler.block_length=5 is not allowed"):
    harness.check_options(EvalOptions(tasks=("gsm8k",), sampler={"block_length": 5}), config)
  arm = make_tiny_config(causal=True)  # its steps and blocks play no part: any gen_length
  harness.check_options(options, arm)
