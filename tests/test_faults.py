"""Fault kinds found by public bug reports and a newcomer run, each pinned by a test: inference that
depends on the training batch, late flag errors, vocabularies without a text path, chat without a
template, schedule and fit warnings, one-line config-key errors, debris of early errors."""

import json
import logging
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import cli_env, make_tiny_config, write_workdir
from llada_jax.errors import ConfigError
from llada_jax import checkpoint

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def spm_workdir(tmp_path_factory):
  config = make_tiny_config()
  config.data.vocabulary = "spm8k"
  config.model.update(vocab_size=8001)
  config.tokens.mask_id = 8000
  config.data.batch_size = 12  # a training batch that 8 serving devices cannot split
  return write_workdir(tmp_path_factory.mktemp("spm"), config)


def test_inference_loads_whatever_batch_the_run_trained_with(spm_workdir):
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top

  assert jax.local_device_count() == 8
  config, params = load_model(spm_workdir)
  assert config.data.batch_size == 12
  leaf = jax.tree.leaves(params)[0]
  assert len(leaf.sharding.device_set) == 8 and leaf.sharding.is_fully_replicated


def test_an_spm8k_model_takes_text_in_every_command(spm_workdir):
  """Sampling from text, multiple choice and GSM8K prompts (once only bytes and tokenizer.json
  could encode)."""
  from llada_jax.evaluation.gsm8k import build_prompts  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.model import load_eval_model  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.multiple_choice import evaluate_multiple_choice  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.tasks import MathProblem, MultipleChoice  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.text import sample  # pylint: disable=g-import-not-at-top

  config, params = load_model(spm_workdir)
  result = sample(config, params, texts=["ROMEO: what"], steps=4, gen_length=8, block_length=8)
  assert result["prompt"] == ["ROMEO: what"] and isinstance(result["text"][0], str)
  model = load_eval_model(spm_workdir)
  items = [MultipleChoice("The cat", ("sat", "ran"), 0)]
  metrics, records = evaluate_multiple_choice(model, items, mc_num=2, batch_size=2)
  assert metrics["count"] == 1 and len(records[0]["scores"]) == 2
  prompts, _, chat = build_prompts(model, [MathProblem("1 + 1?", "#### 2", "2")], "fewshot", 0, 16)
  assert not chat and model.codec.decode(prompts[0]) == "Question: 1 + 1?\nAnswer:"


def test_monte_carlo_batch_shrinks_to_mc_num_and_bad_flags_fail_before_any_task(monkeypatch):
  from llada_jax.evaluation import harness  # pylint: disable=g-import-not-at-top
  from llada_jax.evaluation.model import EvalModel  # pylint: disable=g-import-not-at-top

  harness.check_options(harness.EvalOptions(mc_num=4, mc_batch_size=16))
  with pytest.raises(ConfigError, match="--mc_num=20 is not allowed"):
    harness.check_options(harness.EvalOptions(mc_num=20, mc_batch_size=16))
  ran = []
  monkeypatch.setattr(harness, "evaluate_elbo", lambda *a, **k: ran.append("elbo") or {})
  config = make_tiny_config()
  model = EvalModel(config, None, None, None, None, "test")
  options = harness.EvalOptions(
      tasks=("elbo", "gsm8k"),
      sampler=dict(
          steps=5, gen_length=16, block_length=8, temperature=0.0, remasking="low_confidence"
      ),
  )
  with pytest.raises(ConfigError, match="steps=5 is not allowed"):
    harness.run_tasks(model, options)
  assert not ran  # the elbo task did not run first


def test_likelihood_with_fewer_samples_than_a_batch(spm_workdir):
  """mc_num=4 below a batch of 16: the estimate is the mean of 4 samples of LLaDA's bound. With a
  two-token answer a sample takes one of three values, computed here from the plain network's
  logits: l = 1 of L = 2 tokens masked (either one), weight L / l = 2, or both masked, weight 1;
  the estimate is one of the 15 means of 4 of them."""
  import itertools  # pylint: disable=g-import-not-at-top
  from llada_jax.diffusion.likelihood import log_likelihood  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top
  from llada_jax.model import logits  # pylint: disable=g-import-not-at-top

  config, params = load_model(spm_workdir)
  prompt, answer = [5, 6, 7], [8, 9]
  result = log_likelihood(config, params, prompt, answer, mc_num=4, batch_size=16)
  mask = config.tokens.mask_id
  subsets = [(0,), (1,), (0, 1)]
  rows = [prompt + [mask if i in s else a for i, a in enumerate(answer)] for s in subsets]
  logp = np.asarray(jax.nn.log_softmax(logits(config, params, np.asarray(rows))), np.float64)
  values = [
      len(answer) / len(s) * sum(logp[r, len(prompt) + i, answer[i]] for i in s)
      for r, s in enumerate(subsets)
  ]
  means = [np.mean(c) for c in itertools.combinations_with_replacement(values, 4)]
  assert np.min(np.abs(np.asarray(means) - result.log_likelihood)) < 1e-4, (result, values)


def test_chat_with_byte_and_spm8k_models(spm_workdir, tmp_path):
  """llada-chat once demanded a tokenizer.json that byte and spm8k models do not have."""
  byte_workdir = write_workdir(tmp_path / "byte", make_tiny_config())
  env = cli_env()
  for workdir in (byte_workdir, spm_workdir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "llada_jax.chat",
            f"--checkpoint={workdir}",
            "--gen_length=8",
            "--steps=8",
            "--block_length=8",
        ],
        input="Hello there\nAnd then?\n",
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sum(line.startswith("assistant:") for line in result.stdout.splitlines()) == 2


def test_a_short_run_warns_that_the_learning_rate_never_peaks(caplog):
  from llada_jax.training import loop  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.optimizer.warmup_steps, config.train.num_steps = 50, 10
  with caplog.at_level(logging.WARNING):
    loop._warn_schedule(config)  # pylint: disable=protected-access
  assert "never reaches optimizer.peak_lr" in caplog.text
  caplog.clear()
  config.train.num_steps = 100
  loop._warn_schedule(config)  # pylint: disable=protected-access
  assert not caplog.text


def test_an_early_error_leaves_no_checkpoint_folder(tmp_path):
  from llada_jax.training.loop import train  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.data.task = "no_such_task"
  with pytest.raises(ConfigError, match="no_such_task"):
    train(config, tmp_path / "w")
  assert not checkpoint.checkpoint_dir(tmp_path / "w").exists()


def test_an_unknown_config_key_is_one_readable_line():
  from llada_jax.cli_support import _unknown_key_message  # pylint: disable=g-import-not-at-top

  raw = KeyError('\'numsteps\'\nDid you mean "num_steps" instead of "numsteps"?')
  for error in (raw, KeyError(str(raw))):  # once or twice quoted, as ml_collections raises it
    assert _unknown_key_message(error) == (
        "unknown config key 'numsteps' in a --config.* override (did you mean \"num_steps\" "
        'instead of "numsteps"?)'
    )


def test_a_fit_from_two_runs_carries_a_warning(tmp_path):
  from llada_jax.analysis import analyse  # pylint: disable=g-import-not-at-top

  for i, budget in enumerate((1e10, 1e12)):
    run = tmp_path / f"s{i}-mdm"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"objective": "mdm", "parameters": 10 ** (i + 3)}))
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps({"step": s, "split": "eval", "flops": c, "bits_per_byte": 2 * c**-0.1 + 1})
            + "\n"
            for s, c in enumerate(np.geomspace(budget / 30, budget, 3), 1)
        )
    )
  document, _, _ = analyse(tmp_path, "flops", "frontier", None, 0, None, 0.0, True)
  assert any("from 2 runs" in w for w in document["warnings"])


@pytest.mark.skipif(not pathlib.Path("/proc/self/stat").exists(), reason="Linux /proc")
def test_a_lock_whose_pid_now_belongs_to_a_later_process_is_stale(tmp_path):
  """A trainer killed on this host leaves its lock, and the kernel gives its pid to another
  process. The lock records the holder's start time (/proc/<pid>/stat, field 22); the process now
  at that pid started at another time, so the lock is taken over as stale, not refused as in use.
  With that process's own start time the lock is refused."""
  import socket  # pylint: disable=g-import-not-at-top
  from llada_jax.training.workdir_lock import LOCK_NAME, WorkdirLock  # pylint: disable=g-import-not-at-top

  later = subprocess.Popen(["sleep", "60"])
  try:
    stat = pathlib.Path(f"/proc/{later.pid}/stat").read_text(encoding="utf-8")
    started = int(stat.rsplit(")", 1)[1].split()[19])
    killed = {"pid": later.pid, "host": socket.gethostname(), "started": "earlier"}
    lock = tmp_path / LOCK_NAME
    lock.write_text(json.dumps(dict(killed, process_start=started - 1)))
    taker = WorkdirLock(tmp_path)
    taker.acquire()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    taker.release()
    lock.write_text(json.dumps(dict(killed, process_start=started)))
    with pytest.raises(ConfigError, match=f"in use by another trainer: pid {later.pid} on "):
      WorkdirLock(tmp_path).acquire()
  finally:
    later.kill()
    later.wait()


def test_a_damaged_newest_checkpoint_falls_back_to_the_next_newest(tmp_path):
  """Checkpoints 1, 2 and 3, each with its own parameters: with 3 damaged the newest readable one
  is 2 (not the oldest, 1); with 3 and 2 damaged it is 1."""
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import load_model_and_step  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import create_train_state  # pylint: disable=g-import-not-at-top

  config = make_tiny_config()
  config.checkpoint.keep = 3
  model, tx = MaskedDiffusionLM(config), make_optimizer(config)
  state, _ = create_train_state(
      config, model, tx, make_mesh(config, jax.devices()[:1], check_batch=False)
  )
  saved = {}
  saver = checkpoint.Checkpointer(tmp_path, config)
  for step in (1, 2, 3):
    saved[step] = jax.tree.map(lambda p, k=step: np.asarray(p) + k, jax.device_get(state.params))
    saver.save(step, state.replace(params=saved[step]), force=True)
    saver.wait()
  saver.close()
  for damaged, want in (((3,), 2), ((3, 2), 1)):
    for step in damaged:
      for path in (checkpoint.checkpoint_dir(tmp_path) / str(step) / "state").glob("ocdbt.*/d/*"):
        path.write_bytes(path.read_bytes()[:7])  # a crash: every tensor file cut short
    step, _, params = load_model_and_step(tmp_path)
    assert step == want
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), saved[want])
