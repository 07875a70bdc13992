"""diffu-GRPO (llada_jax/posttrain/grpo.py, rewards.py, source.py RolloutSource): advantages,
clipping and the KL by hand, d1's one-pass log-probabilities, rewards, and RL through the
trainer resumed in the middle bitwise equal to an uninterrupted run."""

import json

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config, preempted_at, write_workdir
from llada_jax.checkpoint import latest_step
from llada_jax.config import validate
from llada_jax.errors import ConfigError
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.loading import load_model_and_step
from llada_jax.model import ModelConfig
from llada_jax.model.forward import logits
from llada_jax.posttrain.grpo import (
    Rollouts,
    answer_mask,
    group_advantages,
    grpo_loss,
    token_log_probs,
)
from llada_jax.posttrain.rewards import parse_rewards, reward
from llada_jax.training.loop import train


def test_group_advantages_by_hand():
  rewards = np.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [0.0, 0.0, 0.0, 3.0]])
  got = np.asarray(group_advantages(jnp.asarray(rewards), eps=1e-4))
  np.testing.assert_allclose(got[0], np.array([0.5, -0.5, -0.5, 0.5]) / (0.5 + 1e-4), rtol=1e-6)
  np.testing.assert_array_equal(got[1], 0.0)  # a group of equal rewards teaches nothing
  std = np.sqrt(((np.array([0, 0, 0, 3.0]) - 0.75) ** 2).mean())
  np.testing.assert_allclose(got[2], (np.array([0, 0, 0, 3.0]) - 0.75) / (std + 1e-4), rtol=1e-6)


def test_the_loss_clips_the_ratio_and_adds_the_kl_by_hand():
  """Two answers of 3 and 2 tokens (the third position of the second is past its end)."""
  logp = np.log(np.array([[0.5, 0.2, 0.9], [0.3, 0.6, 0.1]], np.float32))
  old = np.log(np.array([[0.25, 0.2, 0.95], [0.3, 0.9, 0.5]], np.float32))
  ref = np.log(np.array([[0.4, 0.1, 0.9], [0.2, 0.6, 0.7]], np.float32))
  is_answer = np.array([[True, True, True], [True, True, False]])
  advantages = np.array([1.5, -0.5], np.float32)
  eps, beta = 0.2, 0.1
  terms = grpo_loss(*(jnp.asarray(x) for x in (logp, old, ref, is_answer, advantages)), eps, beta)
  want = []
  for i in range(2):
    total = 0.0
    for k in range(int(is_answer[i].sum())):
      rho = np.exp(logp[i, k] - old[i, k])
      a = advantages[i]
      surrogate = min(rho * a, float(np.clip(rho, 1 - eps, 1 + eps)) * a)
      d = ref[i, k] - logp[i, k]
      total += surrogate - beta * (np.exp(d) - d - 1)
    want.append(-total / is_answer[i].sum())
  assert float(terms.loss) == pytest.approx(np.mean(want), rel=1e-5)
  # ratios 2.0 (clipped, A > 0), 1, 0.947 | 1, 0.667 (clipped, A < 0): 1/3 and 1/2 of the tokens
  assert float(terms.clipped) == pytest.approx((1 / 3 + 1 / 2) / 2, rel=1e-6)
  assert float(terms.length) == 2.5


def test_the_answer_ends_at_its_first_end_token():
  tokens = jnp.array([[7, 8, 5, 1, 1, 9], [7, 8, 5, 6, 4, 3]])
  got = np.asarray(answer_mask(tokens, 2, jnp.array([1, 4])))
  np.testing.assert_array_equal(
      got, [[False, False, True, True, False, False], [False, False, True, True, True, False]]
  )


@pytest.fixture(name="tiny", scope="module")
def _tiny():
  config = make_tiny_config()
  params = flax.linen.meta.unbox(MaskedDiffusionLM(config).init(jax.random.PRNGKey(0)))
  return config, params


def _rollouts(rows, prompt_lens, width, answer_len, key_seed=0):
  """Rows left-padded to `width` prompt tokens, then the answer; every answer token counts."""
  n = len(rows)
  tokens = np.zeros((n, width + answer_len), np.int32)
  valid = np.zeros(tokens.shape, bool)
  for r, (row, p) in enumerate(zip(rows, prompt_lens)):
    tokens[r, width - p :] = row
    valid[r, width - p :] = True
  is_answer = np.zeros(tokens.shape, bool)
  is_answer[:, width:] = True
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(key_seed), i))(np.arange(n))
  return Rollouts(tokens, valid, is_answer, np.zeros(n, np.float32), keys, np.zeros(n))


def test_one_pass_log_probabilities_by_hand_and_alone_as_padded(tiny):
  """Without prompt masking, log pi(o_k | q) is the log-softmax at k of one pass over the prompt
  and an all-mask answer; with it, a row gets the same values alone and left-padded wider."""
  config, params = tiny
  mask = config.tokens.mask_id
  cfg = ModelConfig.from_config(config)
  row = [10, 11, 12, 20, 21, 22, 23]  # a 3-token prompt and a 4-token answer
  got = np.asarray(token_log_probs(cfg, params, _rollouts([row], [3], 3, 4), 3, mask, 0.0))[0]
  out = np.asarray(logits(config, params, np.array([[10, 11, 12, mask, mask, mask, mask]])))[0]
  out = (
      out
      - np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - out.max(-1, keepdims=True)
  )
  np.testing.assert_allclose(got[3:], [out[3 + k, a] for k, a in enumerate(row[3:])], rtol=1e-5)
  assert np.all(got[:3] == 0.0)
  # The shifted alignment (an AR start): o_k read from the logits of the position before it.
  shifted = token_log_probs(cfg, params, _rollouts([row], [3], 3, 4), 3, mask, 0.0, shifted=True)
  np.testing.assert_allclose(
      np.asarray(shifted)[0, 3:], [out[2 + k, a] for k, a in enumerate(row[3:])], rtol=1e-5
  )

  other = [30, 31, 40, 41, 42, 43]  # another row (2-token prompt) in the batch, padded to 5
  alone = token_log_probs(cfg, params, _rollouts([row], [3], 3, 4), 3, mask, 0.5)
  rollouts = _rollouts([other[:2] + row[3:], row], [2, 3], 5, 4)
  rollouts = rollouts._replace(mask_keys=rollouts.mask_keys[::-1])  # the row keeps its key
  batched = token_log_probs(cfg, params, rollouts, 5, mask, 0.5)
  np.testing.assert_allclose(np.asarray(batched)[1, 5:], np.asarray(alone)[0, 3:], rtol=1e-5)
  unmasked = token_log_probs(cfg, params, _rollouts([row], [3], 3, 4), 3, mask, 0.0)
  assert np.any(np.asarray(alone) != np.asarray(unmasked))  # the prompt mask changes the pass


def test_rewards_by_name_and_bad_specs():
  spec = parse_rewards("gsm8k,number_format:0.5")
  assert reward(spec, "so 3 + 4 = 7 #### 7", "7") == 1.0 + 0.25
  assert reward(spec, "#### 8", "7") == 0.25
  assert reward(spec, "no idea", "7") == 0.0
  with pytest.raises(ConfigError, match=r"'gsmk' is not a reward; expected names of exact, gsm8k"):
    parse_rewards("gsmk")
  with pytest.raises(ConfigError, match=r"weight 'x' of exact is not a number"):
    parse_rewards("exact:x")


def _config(root, reference, steps):
  config = make_tiny_config()
  config.data.batch_size = 8  # 2 prompts x 4 answers: one row per device of the 8-device mesh
  config.optimizer.update(dict(peak_lr=3e-3, warmup_steps=1))
  config.train.update(dict(num_steps=steps, log_every=1, eval_every=2))
  config.checkpoint.update(dict(save_every=2))
  config.sampling.update(dict(gen_length=4, steps=4, block_length=4, temperature=1.0))
  config.posttrain.update(
      dict(
          method="grpo",
          reference=reference,
          prompts=str(root / "prompts.jsonl"),
          prompts_eval=str(root / "eval.jsonl"),
          rewards="exact",
          group_size=4,
      )
  )
  return config


def test_rl_resumed_in_the_middle_is_bitwise_the_uninterrupted_run(tmp_path):
  """posttrain.inner_updates=2 (d1's mu): steps 2 and 3 train on step 2's rollouts (same
  rewards), the ratio to the sampling policy is 1 at step 2 and not at step 3 (the policy moved,
  the masks are fresh). A run preempted at step 3, inside the second group (the parameters have
  moved since it was sampled), resumes from the kept rollouts, samples the third group from its
  own parameters, and ends bitwise the uninterrupted run, which differs from the reference."""
  from llada_jax.analysis.runs import read_records  # pylint: disable=import-outside-toplevel

  reference = write_workdir(str(tmp_path / "reference"), make_tiny_config())
  lines = [{"prompt": f"{a}+{b}=", "answer": str(a + b)} for a in range(3) for b in range(3)]
  (tmp_path / "prompts.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
  (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(x) for x in lines[:2]))

  def config():
    c = _config(tmp_path, reference, 6)
    c.posttrain.update(dict(inner_updates=2, rewards="number_format"))
    return validate(c)

  train(config(), tmp_path / "straight")
  with preempted_at(3):
    train(config(), tmp_path / "resumed")
  assert latest_step(tmp_path / "resumed") == 3
  assert [f.name for f in (tmp_path / "resumed" / "rollouts").iterdir()] == [
      "group_0000000002.process_0.npz"
  ]
  train(config(), tmp_path / "resumed")
  _, _, a = load_model_and_step(tmp_path / "straight")
  step, _, b = load_model_and_step(tmp_path / "resumed")
  assert step == 6
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  _, _, ref = load_model_and_step(reference)
  assert any(
      np.any(np.asarray(x) != np.asarray(y))
      for x, y in zip(jax.tree.leaves(ref), jax.tree.leaves(a))
  )
  train_records = {
      r["step"]: r
      for r in read_records(tmp_path / "straight" / "metrics.jsonl")
      if r["split"] == "train"
  }
  # Record of step s: the update of step s - 1 (steps 2 and 3 are records 3 and 4).
  assert train_records[3]["grpo/reward"] == train_records[4]["grpo/reward"]
  assert train_records[3]["grpo/ratio"] == pytest.approx(1.0, abs=1e-5)
  assert abs(train_records[4]["grpo/ratio"] - 1.0) > 1e-4


@pytest.mark.parametrize("objective", ["mdm", "block"])
def test_llada_compile_compiles_the_grpo_update_with_its_reference(tmp_path, objective):
  """The GRPO update ahead of time (llada-compile's path, the trainer's loss): the reference is
  an argument beside the state, the rollouts data.batch_size rows of prompt_length +
  gen_length tokens, and the model FLOPs four forward passes over them (the policy's forward and
  backward, the reference's forward)."""
  from llada_jax.aot import compile_program  # pylint: disable=g-import-not-at-top
  from llada_jax.training.flops import forward_flops_per_token  # pylint: disable=g-import-not-at-top

  config = _config(tmp_path, "unread", 2)
  if objective == "block":  # the block-level one pass: two streams of prompt + answer
    config.diffusion.update(dict(objective="block", block_size=4))
  config = validate(config)
  grpo_report = compile_program(config, jax.devices()[:8], "train", prompt_length=12)
  plain = config.copy_and_resolve_references()
  plain.posttrain.method = ""
  pretrain = compile_program(plain, jax.devices()[:8], "train")
  params_bytes = 4 * grpo_report.parameters  # float32, replicated over the 8 devices
  assert grpo_report.argument_bytes - pretrain.argument_bytes > 0.9 * params_bytes
  length = 12 + config.sampling.gen_length
  flops = 4 * config.data.batch_size * length * forward_flops_per_token(config, length)
  assert grpo_report.model_flops == flops


def test_block_log_probabilities_are_the_chain_rule_at_block_one_and_alone_as_padded(tiny):
  """A block model's one-pass log-probabilities: with B = 1 and no prompt masking, log p(o_k |
  q, o_<k) of the plain causal network (the independent chain rule of tests/test_block.py);
  with B = 4 and prompt masking, a row's values are the same alone and left-padded beside a
  shorter prompt, whose blocks start elsewhere."""
  from test_block import _chain_rule_logp  # pylint: disable=g-import-not-at-top

  config, params = tiny
  mask, cfg = config.tokens.mask_id, ModelConfig.from_config(config)
  row = [10, 11, 12, 20, 21, 22, 23]  # a 3-token prompt and a 4-token answer
  one = token_log_probs(cfg, params, _rollouts([row], [3], 3, 4), 3, mask, 0.0, block_size=1)
  want = _chain_rule_logp(config, params, jnp.asarray([row]))[0]
  np.testing.assert_allclose(np.asarray(one)[0, 3:], want[3:], rtol=1e-5)

  def blocks(rollouts, width):
    return np.asarray(token_log_probs(cfg, params, rollouts, width, mask, 0.5, block_size=4))

  alone = blocks(_rollouts([row], [3], 3, 4), 3)
  other = [30, 31, 40, 41, 42, 43]  # a 2-token prompt, padded to 5 with the row
  rollouts = _rollouts([other[:2] + row[3:], row], [2, 3], 5, 4)
  batched = blocks(rollouts._replace(mask_keys=rollouts.mask_keys[::-1]), 5)
  np.testing.assert_allclose(batched[1, 5:], alone[0, 3:], rtol=1e-5)
  assert not np.allclose(alone[0, 3:], np.asarray(one)[0, 3:], atol=1e-3)
