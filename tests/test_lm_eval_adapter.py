"""The lm-evaluation-harness adapter (`--model llada_jax`) over a tiny random workdir checkpoint."""

import json
import pathlib

import numpy as np
import pytest

from conftest import make_tiny_config, write_workdir

lm_eval = pytest.importorskip("lm_eval")

# pylint: disable=wrong-import-position
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from llada_jax.diffusion.likelihood import Likelihood  # noqa: E402
from llada_jax.evaluation import lm_eval_adapter  # noqa: E402
from llada_jax.evaluation.scoring import loglikelihoods  # noqa: E402

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


def test_loglikelihood_is_the_monte_carlo_bound_and_checks_one_token_greedily(lm):
  assert (lm.mc_num, lm.batch_size, lm.seed) == (4, 2, 3)
  pairs = [("The cat sat on", " the mat"), ("Two plus two is", " four"), ("", "abc")]
  requests = _requests("loglikelihood", pairs)
  got = lm.loglikelihood(requests, disable_tqdm=True)
  assert [type(v) for r in got for v in r] == [float, bool] * 3
  encode = lm.model.codec.encode
  want = loglikelihoods(
      lm.model,
      [encode(c) for c, _ in pairs],
      [encode(a) for _, a in pairs],
      mc_num=4,
      batch_size=2,
      seed=3,
      item_ids=[lm_eval_adapter.request_id(r) for r in requests],
  ).log_likelihood
  np.testing.assert_allclose([ll for ll, _ in got], want, rtol=1e-6)
  assert not any(greedy for _, greedy in got) and all(ll < 0 for ll, _ in got)

  context, choices = "Once upon a", [chr(c) for c in range(32, 127)]
  single = lm.loglikelihood(
      _requests("loglikelihood", [(context, c) for c in choices + [""]]), disable_tqdm=True
  )
  greedy = [choice for choice, (_, is_greedy) in zip(choices, single) if is_greedy]
  assert greedy == [choices[int(np.argmax([ll for ll, _ in single[:-1]]))]]
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
  import jax  # pylint: disable=import-outside-toplevel

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
    logp = jax.nn.log_softmax(causal.apply({"params": params}, np.asarray([ids[low : end - 1]]))[0])
    want += sum(float(logp[j - 1 - low, ids[j]]) for j in range(start, end))
    start = end
  np.testing.assert_allclose(got, [want], rtol=1e-4)
  assert model.loglikelihood_rolling(_requests("loglikelihood_rolling", [("",)])) == [0.0]
  # An empty context: the first token is predicted from the prefix token (EOS here).
  ((empty, _),) = model.loglikelihood(_requests("loglikelihood", [("", "It")]))
  logp = jax.nn.log_softmax(causal.apply({"params": params}, np.asarray([ids[:2]]))[0])
  np.testing.assert_allclose(empty, float(logp[0, ids[1]] + logp[1, ids[2]]), rtol=1e-5)
