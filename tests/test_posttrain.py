"""DPO through the trainer (posttrain.method="dpo"): the policy starts as the reference, the
held-out margin rises, checkpoints hold the policy only, a resumed run is bitwise the
uninterrupted one, and bad post-training settings are refused in one line before any work; DPO
and GRPO on two processes equal one process."""

import json

import jax
import numpy as np
import pytest

from conftest import make_tiny_config, preempted_at, write_workdir
from llada_jax.checkpoint import latest_step, load_config
from llada_jax.config import validate
from llada_jax.errors import ConfigError
from llada_jax.loading import load_model_and_step
from llada_jax.posttrain.rewards import parse_rewards, reward
from llada_jax.training.loop import train
from llada_jax.analysis.runs import read_records

WORDS = ["stone", "river", "cloud", "ember", "maple", "frost", "coral", "amber", "cedar", "lunar"]


def _pairs(offset: int, count: int) -> list[dict[str, str]]:
  """Prompt "say W:" prefers W itself over W reversed (a pattern that carries to held-out W)."""
  out = []
  for i in range(count):
    word = WORDS[(offset + i) % len(WORDS)] + WORDS[(offset + 3 * i + 1) % len(WORDS)][:2]
    out.append({"prompt": f"say {word}:", "chosen": f" {word}", "rejected": f" {word[::-1]}"})
  return out


@pytest.fixture(name="setup", scope="module")
def _setup(tmp_path_factory):
  root = tmp_path_factory.mktemp("dpo")
  reference = write_workdir(str(root / "reference"), make_tiny_config())
  for name, rows in (("train.jsonl", _pairs(0, 16)), ("eval.jsonl", _pairs(5, 8))):
    (root / name).write_text("\n".join(json.dumps(r) for r in rows))
  return root, reference


def _config(root, reference, steps):
  config = make_tiny_config(d_model=48)  # the run takes the reference's model (d_model 64)
  config.data.batch_size = 8  # one pair per device of the 8-device mesh
  config.optimizer.update(dict(peak_lr=3e-3, warmup_steps=1))
  config.train.update(dict(num_steps=steps, log_every=1, eval_every=6))
  config.checkpoint.update(dict(save_every=6))
  config.posttrain.update(
      dict(
          method="dpo",
          reference=reference,
          preferences=str(root / "train.jsonl"),
          preferences_eval=str(root / "eval.jsonl"),
          beta=0.5,
          mc_num=4,
      )
  )
  return config


def test_dpo_trains_the_policy_from_the_reference_and_resumes_exactly(setup, tmp_path):
  root, reference = setup
  straight = tmp_path / "straight"
  train(_config(root, reference, 12), straight)
  records = read_records(straight / "metrics.jsonl")
  margins = {r["step"]: r["dpo/margin"] for r in records if r["split"] == "eval"}
  losses = [r["loss"] for r in records if r["split"] == "train"]
  assert losses[0] == pytest.approx(np.log(2.0), abs=1e-6)  # policy = reference: margins 0
  assert np.mean(losses[-3:]) < np.log(2.0)  # the training pairs' margins grow ...
  assert margins[12] > max(margins[6], 0.0)  # ... and the held-out ones follow
  stored = load_config(straight)
  assert stored.model.d_model == 64 and stored.posttrain.method == "dpo"

  interrupted = tmp_path / "interrupted"
  with preempted_at(6):
    train(_config(root, reference, 12), interrupted)
  assert latest_step(interrupted) == 6
  train(_config(root, reference, 12), interrupted)
  _, _, a = load_model_and_step(straight)
  step, _, b = load_model_and_step(interrupted)
  assert step == 12
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  # The reference is read from where it lives, never stored with the policy.
  _, _, ref = load_model_and_step(reference)
  assert jax.tree.structure(ref) == jax.tree.structure(a)
  assert any(
      np.any(np.asarray(x) != np.asarray(y))
      for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(a))
  )


@pytest.mark.parametrize(
    "changes,message",
    [
        (
            {"method": "ppo"},
            r"posttrain.method='ppo' is not allowed: expected '' \(pre-training or SFT on "
            r"data.task\), 'dpo' or 'grpo'",
        ),
        ({"beta": 0.0}, r"posttrain.beta=0.0 is not allowed: expected a positive number"),
        (
            {"inner_updates": 0},
            r"posttrain.inner_updates=0 is not allowed: expected a positive number",
        ),
        ({"preferences": ""}, r"posttrain.preferences='' is not allowed: expected a path"),
        ({"reference": "/nowhere"}, r"posttrain.reference=/nowhere is not allowed: it holds no"),
        (
            {"preferences_eval": "/nowhere.jsonl"},
            r"posttrain.preferences_eval=/nowhere.jsonl does not exist: expected a JSONL file",
        ),
    ],
)
def test_bad_post_training_settings_are_refused_before_any_work(setup, tmp_path, changes, message):
  root, reference = setup
  config = _config(root, reference, 2)
  config.posttrain.update(changes)
  with pytest.raises(ConfigError, match=message):
    train(config, tmp_path / "work")
  assert not (tmp_path / "work").exists() or not any((tmp_path / "work").iterdir())


def test_llada_compile_compiles_the_dpo_step_with_its_reference(setup):
  """The DPO train step ahead of time (llada-compile's path): the reference is an argument
  beside the state (twice the parameter bytes in), and the model FLOPs are four forward passes
  of 2 x batch x mc_num rows (the policy's forward and backward, the reference's forward)."""
  from llada_jax.aot import compile_program  # pylint: disable=g-import-not-at-top
  from llada_jax.posttrain.reference import config_with_reference  # pylint: disable=g-import-not-at-top
  from llada_jax.training.flops import forward_flops_per_token  # pylint: disable=g-import-not-at-top

  root, reference = setup
  config = config_with_reference(_config(root, reference, 2))
  dpo = compile_program(config, jax.devices()[:8], "train")
  plain = config.copy_and_resolve_references()
  plain.posttrain.method = ""
  pretrain = compile_program(plain, jax.devices()[:8], "train")
  params_bytes = 4 * dpo.parameters  # float32, replicated over the 8 data-parallel devices
  assert 0.9 * params_bytes < dpo.argument_bytes - pretrain.argument_bytes < 1.1 * params_bytes
  length = config.data.sequence_length
  rows = 2 * config.data.batch_size * config.posttrain.mc_num
  assert dpo.model_flops == 4 * rows * length * forward_flops_per_token(config, length)


def _greedy_answers(config, params, prompts_file):
  """The greedy answers' texts to the prompts of a GRPO prompt file, cut as the rewards cut them
  (public pieces: the prompt reader, the model object's sampler, the answer ending)."""
  # pylint: disable=import-outside-toplevel
  from llada_jax.data.codec import text_codec
  from llada_jax.lm import MaskedDiffusionLM
  from llada_jax.posttrain.source import read_prompts
  from llada_jax.sampling.ending import end_answer
  from llada_jax.sampling.text import left_pad

  tasks = read_prompts(prompts_file, config)
  tokens, valid = left_pad([t.prompt for t in tasks], config.tokens.pad_id)
  keys = jax.random.split(jax.random.PRNGKey(0), len(tasks))
  rows = np.asarray(
      MaskedDiffusionLM(config).generate(params, tokens, valid, rng=keys, temperature=0.0)
  )
  decode = text_codec(config).decode
  return [end_answer(r[tokens.shape[1] :].tolist(), config.tokens, decode)[1] for r in rows]


@pytest.mark.parametrize("method", ["dpo", "grpo"])
def test_two_processes_post_train_like_one_process_with_eight_devices(tmp_path, method):
  """launch/local.sh runs DPO or GRPO as 2 processes x 4 CPU devices on one mesh: each process
  packs (DPO) or samples and rewards (GRPO: one whole group of 4) its half of the batch, and the
  held-out metrics cover every held-out item. The parameters after 2 steps and the held-out
  metrics equal those of one process with 8 devices.

  GRPO's held-out references are the single-process policy's own greedy answers, so each
  held-out answer earns at least the "exact" reward of 1, and a process counting only its own
  rows would log about half the mean."""
  # pylint: disable=import-outside-toplevel
  import importlib.util
  import os
  import pathlib
  import subprocess
  import sys

  root = pathlib.Path(__file__).resolve().parents[1]
  micro = root / "tests" / "configs" / "micro.py"
  spec = importlib.util.spec_from_file_location("micro", micro)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  reference = write_workdir(str(tmp_path / "reference"), module.get_config())
  overrides = {
      "posttrain.method": method,
      "posttrain.reference": reference,
      "train.num_steps": 2,
      "train.eval_every": 2,
      "optimizer.peak_lr": 3e-3,
  }
  if method == "dpo":
    for name, rows in (("train.jsonl", _pairs(0, 16)), ("eval.jsonl", _pairs(5, 9))):
      (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows))
    overrides.update(
        {
            "posttrain.preferences": str(tmp_path / "train.jsonl"),
            "posttrain.preferences_eval": str(tmp_path / "eval.jsonl"),
            "posttrain.mc_num": 2,
        }
    )
  else:
    lines = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(x) for x in lines[::-1]))
    overrides.update(
        {
            "posttrain.prompts": str(tmp_path / "prompts.jsonl"),
            "posttrain.prompts_eval": str(tmp_path / "eval.jsonl"),
            # a random model's sampled answers hold digits; "exact" scores the held-out answers
            "posttrain.rewards": "number_format,gsm8k,exact",
            "posttrain.group_size": 4,
            "sampling.temperature": 1.0,
        }
    )
  config = module.get_config()
  for key, value in overrides.items():
    section, field = key.split(".")
    config[section][field] = value
  train(validate(config), tmp_path / "single")
  step, _, single = load_model_and_step(tmp_path / "single")
  assert step == 2
  if method == "grpo":  # the same prompts, answered as the trained single-process policy does
    answers = _greedy_answers(config, single, str(tmp_path / "eval.jsonl"))
    rows = [{"prompt": x["prompt"], "answer": a} for x, a in zip(lines[::-1], answers)]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(x) for x in rows))
  result = subprocess.run(
      [str(root / "launch" / "local.sh"), "2", "4", "--", sys.executable, "-m", "llada_jax.train"]
      + [f"--config={micro}", f"--workdir={tmp_path / 'multi'}"]
      + [f"--config.{k}={v}" for k, v in overrides.items()],
      capture_output=True,
      text=True,
      timeout=600,
      env=dict(os.environ, PYTHONPATH=str(root)),
      cwd=root,
      check=False,
  )
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
  _, _, multi = load_model_and_step(tmp_path / "multi")
  jax.tree.map(
      # gloo's sums are not the one process's: Adam's normalised steps of 3e-3 differ by ~3e-7
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
      jax.device_get(multi),
      jax.device_get(single),
  )

  def held_out(run):
    records = read_records(tmp_path / run / "metrics.jsonl")
    return [
        {k: v for k, v in r.items() if k.startswith(method + "/")}
        for r in records
        if r.get("split") == "eval"
    ]

  if method == "grpo":  # each held-out answer is its own reference: "exact" gives 1 for each
    spec = parse_rewards(overrides["posttrain.rewards"])
    want = sum(reward(spec, a, a) for a in answers) / len(answers)
    assert want >= 1.0 and held_out("multi") == [{"grpo/reward": pytest.approx(want, rel=1e-6)}]
  else:
    (multi_metrics,), (single_metrics,) = held_out("multi"), held_out("single")
    assert multi_metrics.keys() == single_metrics.keys() and "dpo/loss" in multi_metrics
    for key, value in single_metrics.items():
      assert multi_metrics[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
