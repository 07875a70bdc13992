"""The lm-evaluation-harness adapter (`--model llada_jax`) over a tiny random workdir checkpoint."""

import itertools
import json
import pathlib

import jax
import numpy as np
import pytest

from conftest import make_tiny_config, write_workdir

lm_eval = pytest.importorskip("lm_eval")

# pylint: disable=wrong-import-position
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llada_jax.diffusion.likelihood import Likelihood  # noqa: E402
from llada_jax.evaluation import lm_eval_adapter  # noqa: E402

# pylint: enable=wrong-import-position


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> pathlib.Path:
  """A training workdir holding one checkpoint of a tiny randomly initialised byte-level model."""
  return write_workdir(tmp_path_factory.mktemp("workdir"), make_tiny_config())


@pytest.fixture(scope="module")
def lm(workdir) -> lm_eval_adapter.LLaDAJaxLM:
  """The adapter as lm_eval builds it (lm_eval's own batch_size and device are overridden)."""
  return lm_eval.api.registry.get_model("llada_jax").create_from_arg_string(
      f"checkpoint={workdir},mc_num=4,batch_size=2,seed=3", {"batch_size": 1, "device": "cuda"}
  )


def _requests(kind, args):
  return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def _log_probs(lm, rows):
  """log-softmax of the plain network's logits for token rows of equal length [N, T, V]."""
  from llada_jax.model import logits  # pylint: disable=import-outside-toplevel

  config, params = lm.model.config, lm.model.params
  return np.asarray(jax.nn.log_softmax(logits(config, params, np.asarray(rows))), np.float64)


def _monte_carlo_means(lm, context, answer, samples):
  """Every value an estimate of LLaDA's bound from `samples` draws can take for a short answer:
  a draw masks a non-empty subset S of the answer's L tokens and scores
  L / |S| * sum over S of log p(a_i | context, answer with S masked) (from the plain network);
  the estimate is the mean of `samples` such draws."""
  mask = lm.model.config.tokens.mask_id
  subsets = [
      s
      for size in range(1, len(answer) + 1)
      for s in itertools.combinations(range(len(answer)), size)
  ]
  rows = [context + [mask if i in s else a for i, a in enumerate(answer)] for s in subsets]
  logp = _log_probs(lm, rows)
  values = [
      len(answer) / len(s) * sum(logp[r, len(context) + i, answer[i]] for i in s)
      for r, s in enumerate(subsets)
  ]
  return np.asarray([np.mean(c) for c in itertools.combinations_with_replacement(values, samples)])


def test_loglikelihood_is_the_monte_carlo_bound_and_checks_one_token_greedily(lm):
  """Against the network's own logits: a continuation of 2-3 tokens scores one of the values a
  mean of mc_num = 4 draws of the bound can take (7 draw values at most, 210 means); a one-token
  continuation scores exactly log p(token | context, one mask), and is greedy when it is the
  argmax of that distribution."""
  assert (lm.mc_num, lm.batch_size, lm.seed) == (4, 2, 3)
  pairs = [("The cat sat on", " a"), ("Two plus two is", " 4."), ("", "abc")]
  requests = _requests("loglikelihood", pairs)
  got = lm.loglikelihood(requests, disable_tqdm=True)
  assert [type(v) for r in got for v in r] == [float, bool] * 3
  encode = lm.model.codec.encode
  for (context, continuation), (ll, greedy) in zip(pairs, got):
    answer = list(encode(continuation))
    assert 2 <= len(answer) <= 3 and not greedy and ll < 0
    means = _monte_carlo_means(lm, list(encode(context)), answer, lm.mc_num)
    assert np.min(np.abs(means - ll)) < 1e-4, (context, continuation, ll)

  context, choices = "Once upon a", [chr(c) for c in range(32, 127)]
  single = lm.loglikelihood(
      _requests("loglikelihood", [(context, c) for c in choices + [""]]), disable_tqdm=True
  )
  ids = list(encode(context))
  logp = _log_probs(lm, [ids + [lm.model.config.tokens.mask_id]])[0, len(ids)]
  tokens = [encode(c)[0] for c in choices]
  np.testing.assert_allclose([ll for ll, _ in single[:-1]], logp[tokens], rtol=1e-5)
  greedy = [choice for choice, (_, is_greedy) in zip(choices, single) if is_greedy]
  assert greedy == [c for c, t in zip(choices, tokens) if t == np.argmax(logp)]
  assert single[-1] == (0.0, True)
  with pytest.raises(NotImplementedError, match="elbo"):
    lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [("some text",)]))


def test_a_request_scores_the_same_alone_and_among_longer_requests(lm):
  """The seed of a request is its task, document and choice: not its place among the requests."""
  target = Instance(
      request_type="loglikelihood",
      doc={},
      arguments=("Once upon a", " time"),
      idx=1,
      metadata=("mytask", 5, 1),
  )
  others = [
      Instance(
          request_type="loglikelihood",
          doc={},
          arguments=("A much longer context " * 3 + str(i), " and continuation " * 2),
          idx=0,
          metadata=("mytask", i, 1),
      )
      for i in range(12)
  ]
  alone = lm.loglikelihood([target], disable_tqdm=True)[0][0]
  together = lm.loglikelihood(others[:7] + [target] + others[7:], disable_tqdm=True)[7][0]
  assert together == pytest.approx(alone, rel=1e-5)


def test_generate_until_cuts_at_the_first_stop_string(lm):
  prompts = ["Question: what is one plus one?\nAnswer:", "ROMEO:"]
  free = lm.generate_until(
      _requests("generate_until", [(p, {"until": []}) for p in prompts]), disable_tqdm=True
  )
  assert [type(t) for t in free] == [str, str] and all(free)
  assert len(free[0]) >= 3
  stop = free[0][1:3]
  kwargs = {"until": ["\x00never\x00", stop], "max_gen_toks": 16, "do_sample": False, "top_p": 0.9}
  cut = lm.generate_until(
      _requests("generate_until", [(prompts[0], kwargs), (prompts[1], {})]), disable_tqdm=True
  )
  assert cut[0] == free[0][: free[0].find(stop)] and stop not in cut[0]
  assert cut[1] == free[1]


def test_max_gen_toks_sets_gen_length_in_whole_blocks(lm):
  options = lm.sampler_options({"max_gen_toks": 20})
  assert (options.gen_length, options.block_length, options.steps) == (24, 8, 12)
  options = lm.sampler_options({"max_gen_toks": 5, "temperature": 0.5})
  assert (options.gen_length, options.block_length, options.steps) == (5, 5, 3)
  assert options.temperature == 0.5
  assert lm.sampler_options({}).steps == 8
  assert lm.sampler_options({"do_sample": False, "temperature": 0.7}).temperature == 0.0


def test_simple_evaluate_runs_a_local_multiple_choice_task(workdir, tmp_path, monkeypatch):
  """lm_eval's accuracy comes from the adapter's scores: with scoring patched so that the gold
  choice wins for items 0 and 1 and loses for items 2 and 3, acc is exactly 0.5 (scores the
  adapter dropped would give 1.0, every gold choice being first; reversed ones 0.25)."""
  import datasets  # pylint: disable=import-outside-toplevel

  # datasets read HF_DATASETS_OFFLINE and HF_DATASETS_CACHE when lm_eval imported it: patch both.
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
    monkeypatch.setattr(datasets.config, name, True)
  monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
  items = [
      dict(question="2 + 2 =", choices=[" 4", " 5", " 22"], answer=0),
      dict(question="The sky is", choices=[" blue", " green"], answer=0),
      dict(question="Cats say", choices=[" meow", " woof"], answer=0),
      dict(question="Ice is", choices=[" cold", " hot"], answer=0),
  ]
  data = tmp_path / "items.jsonl"
  data.write_text("".join(json.dumps(item) + "\n" for item in items))
  (tmp_path / "tiny_mc.yaml").write_text(
      "task: llada_tiny_mc\n"
      "dataset_path: json\n"
      f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
      "test_split: test\n"
      "output_type: multiple_choice\n"
      "doc_to_text: '{{question}}'\n"
      "doc_to_choice: choices\n"
      "doc_to_target: answer\n"
      "metric_list:\n  - metric: acc\n"
  )
  scores = {
      "4": 0.0,
      "5": -1.0,
      "22": -1.0,
      "blue": 0.0,
      "green": -1.0,  # gold wins
      "meow": -2.0,
      "woof": 0.0,
      "cold": -2.0,
      "hot": -1.0,
  }  # gold loses

  def patched(model, prompts, answers, **kwargs):
    del prompts, kwargs
    values = [scores[model.codec.decode(answer).strip()] for answer in answers]
    return Likelihood(np.asarray(values), np.zeros(len(values)))

  monkeypatch.setattr(lm_eval_adapter, "loglikelihoods", patched)
  results = lm_eval.simple_evaluate(
      model="llada_jax",
      model_args=f"checkpoint={workdir},mc_num=1,batch_size=1",
      tasks=["llada_tiny_mc"],
      task_manager=TaskManager(include_path=str(tmp_path)),
      batch_size=4,
      device="cpu",
  )  # model_args' batch_size wins; device is ignored
  metrics = results["results"]["llada_tiny_mc"]
  assert metrics["acc,none"] == 0.5
  assert results["config"]["checkpoint"] == str(workdir)


def test_rolling_loglikelihood_of_an_arm_model_is_the_exact_chain_rule(tmp_path):
  """Windows of 63 predicted bytes (max_sequence_length 64 less one) over a 162-byte text, the
  first after EOS: the sum is the text's exact log-likelihood under the causal network, computed
  here window by window, each window's tokens predicted from the 63 ids before its end."""
  from llada_jax.data.codec import text_codec  # pylint: disable=import-outside-toplevel
  from llada_jax.loading import load_model  # pylint: disable=import-outside-toplevel
  from llada_jax.model import Transformer, ModelConfig  # pylint: disable=import-outside-toplevel

  config = make_tiny_config(causal=True)
  workdir = write_workdir(tmp_path / "arm", config)
  model = lm_eval.api.registry.get_model("llada_jax").create_from_arg_string(
      f"checkpoint={workdir},mc_num=4,batch_size=2", {}
  )
  text = "It was the best of times, it was the worst of times, " * 3
  got = model.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]))
  _, params = load_model(str(workdir))
  causal = Transformer(ModelConfig.from_config(config))
  ids = [config.tokens.eos_id] + text_codec(config).encode(text)
  want, predicted = 0.0, config.model.max_sequence_length - 1  # tokens predicted per window
  start = 1
  while start < len(ids):  # targets ids[start:end] from the `predicted` ids before `end - 1`
    end = min(start + predicted, len(ids))
    low = max(0, end - 1 - predicted)
    logp = _next_token_log_probs(causal, params, config, ids[low : end - 1])
    want += sum(float(logp[j - 1 - low, ids[j]]) for j in range(start, end))
    start = end
  np.testing.assert_allclose(got, [want], rtol=1e-4)
  assert model.loglikelihood_rolling(_requests("loglikelihood_rolling", [("",)])) == [0.0]
  # An empty context: the first token is predicted from the prefix token (EOS here).
  ((empty, _),) = model.loglikelihood(_requests("loglikelihood", [("", "It")]))
  logp = _next_token_log_probs(causal, params, config, ids[:2])
  np.testing.assert_allclose(empty, float(logp[0, ids[1]] + logp[1, ids[2]]), rtol=1e-5)


def _next_token_log_probs(causal, params, config, ids):
  """log p(next token) [T, V] of a causal network over ids: NumPy log-softmax of its logits over
  every token but the mask token (which a causal model never predicts)."""
  z = np.asarray(jax.jit(causal.apply)({"params": params}, np.asarray([ids]))[0], np.float64)
  z[:, config.tokens.mask_id] = -np.inf
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _printable_choices(model, context):
  """One-token continuations of context (every printable byte) as loglikelihood requests."""
  choices = [chr(c) for c in range(32, 127)]
  tokens = [model.model.codec.encode(c)[0] for c in choices]
  return choices, tokens, _requests("loglikelihood", [(context, c) for c in choices])


def test_an_arm_is_greedy_on_its_next_token_argmax_and_generates_by_argmax_decoding(tmp_path):
  from llada_jax.model import Transformer, ModelConfig  # pylint: disable=import-outside-toplevel

  config = make_tiny_config(causal=True)
  config.model.init_std = 0.3
  workdir = write_workdir(tmp_path / "arm", config)
  model = lm_eval.api.registry.get_model("llada_jax").create_from_arg_string(
      f"checkpoint={workdir}", {}
  )
  causal, params = Transformer(ModelConfig.from_config(config)), model.model.params
  context = "Hello"  # its argmax next byte is printable
  choices, tokens, requests = _printable_choices(model, context)
  ids = model.model.codec.encode(context)
  logp = _next_token_log_probs(causal, params, config, ids)[-1]
  got = model.loglikelihood(requests, disable_tqdm=True)
  np.testing.assert_allclose([ll for ll, _ in got], logp[tokens], rtol=1e-5)
  assert np.argmax(logp) in tokens  # the check below has one greedy choice to find
  assert [c for c, (_, g) in zip(choices, got) if g] == [
      c for c, t in zip(choices, tokens) if t == np.argmax(logp)
  ]
  answer = list(ids)
  for _ in range(10):  # more than the checkpoint's block_length (8): nothing to round up to
    answer.append(int(np.argmax(_next_token_log_probs(causal, params, config, answer)[-1])))
  answer = answer[len(ids) :]
  ends = [i for i, t in enumerate(answer) if t == config.tokens.eos_id]
  want = model.model.codec.decode(answer[: ends[0]] if ends else answer)
  (text,) = model.generate_until(
      _requests("generate_until", [(context, {"until": [], "max_gen_toks": 10})]),
      disable_tqdm=True,
  )
  assert text == want


def test_a_block_model_checks_one_token_continuations_with_default_model_args(tmp_path):
  """The first token of the greedily decoded first block is the one greedy continuation."""
  from llada_jax.sampling import generate  # pylint: disable=import-outside-toplevel

  config = make_tiny_config()
  config.diffusion.objective, config.diffusion.block_size = "block", 4
  config.sampling.update(dict(block_length=4))
  config.model.init_std = 0.3  # peaked predictions (this context's greedy first byte is printable)
  workdir = write_workdir(tmp_path / "block", config)
  model = lm_eval.api.registry.get_model("llada_jax").create_from_arg_string(
      f"checkpoint={workdir}", {}
  )
  context = "Once upon a"
  choices, tokens, requests = _printable_choices(model, context)
  got = model.loglikelihood(requests, disable_tqdm=True)
  ids = model.model.codec.encode(context)
  first = int(
      np.asarray(generate(config, model.model.params, np.asarray([ids]), gen_length=4, steps=4))[
          0, len(ids)
      ]
  )
  assert first in tokens  # the check below has one greedy choice to find
  assert [c for c, (_, g) in zip(choices, got) if g] == [
      c for c, t in zip(choices, tokens) if t == first
  ]
  (text,) = model.generate_until(
      _requests("generate_until", [(context, {"until": [], "max_gen_toks": 1})]),
      disable_tqdm=True,
  )
  # One block of the model is generated and the answer cut back to max_gen_toks.
  assert len(model.model.codec.encode(text)) <= 1
