"""The one answer-ending rule (EOS, EoT, stop strings) in every command that generates."""

import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.evaluation import gsm8k
from llada_jax.evaluation.model import EvalModel
from llada_jax.evaluation.tasks import MathProblem
from llada_jax.sampling import ending, text

EOS, EOT = 1, 5


def _tokens(eot=EOT):
  config = make_tiny_config()
  config.tokens.update(eos_id=EOS, eot_id=eot)
  return config


@pytest.mark.parametrize(
    "ids,eot,kept",
    [
        ([7, 8, EOT, 9, EOS], EOT, [7, 8]),
        ([7, EOS, 8, EOT], EOT, [7]),
        ([7, 8, EOT, 9], -1, [7, 8, EOT, 9]),  # a vocabulary without EoT
        ([7, 8, 9], EOT, [7, 8, 9]),
    ],
)
def test_ids_end_at_the_first_end_token(ids, eot, kept):
  assert ending.cut_ids(ids, _tokens(eot).tokens) == kept


def test_text_ends_at_the_earliest_stop_string():
  assert ending.cut_text("a #### 72\n\nQuestion: b #### 12", ("Question:", "\n\n")) == "a #### 72"
  assert ending.cut_text("no stop here", ("Question:",)) == "no stop here"
  assert ending.cut_text("keep", ("",)) == "keep"


def test_sample_cuts_answers_at_eot_and_stop_strings(monkeypatch):
  """llada-sample once trimmed at EOS only; it now ends answers as chat and evaluation do."""
  from llada_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top

  config = _tokens()
  encode = lambda s: list(get_vocabulary(config).encode(s))
  answer = encode("hi there") + [EOT] + encode("more") + [EOS]

  def fake_generate(model, params, tokens, mask, options=None, **kwargs):
    return np.concatenate([tokens, np.asarray([answer] * len(tokens))], 1)

  monkeypatch.setattr(text.MaskedDiffusionLM, "generate", fake_generate)
  result = text.sample(config, None, texts=["ab"], stops=["there"], steps=1)
  assert result["tokens"] == [encode("hi there")]
  assert result["text"] == ["hi "]


def test_fewshot_gsm8k_scores_the_answer_before_the_invented_follow_up(monkeypatch):
  """A generation "... #### 72\\n\\nQuestion: ... #### 12" is scored 72 (once it was 12)."""
  from llada_jax.data.vocab import get_vocabulary  # pylint: disable=g-import-not-at-top

  config = make_tiny_config(max_sequence_length=4096)
  codec = get_vocabulary(config)
  generations = [
      "She sells 9 a day. #### 72\n\nQuestion: What is 5 + 7?\nAnswer: #### 12",
      "Total: #### 11\nQuestion: Then?\nAnswer: #### 72",
  ]

  def fake_answers(model, prompts, **kwargs):
    return [list(codec.encode(g)) for g in generations[: len(prompts)]]

  monkeypatch.setattr(gsm8k, "generate_answers", fake_answers)
  model = EvalModel(config, None, codec, None, None, "test")
  problems = [MathProblem("q1", "#### 72", "72"), MathProblem("q2", "#### 72", "72")]
  metrics, records = gsm8k.evaluate_gsm8k(
      model, problems, prompt_format="fewshot", num_fewshot=0, gen_length=16
  )
  assert [r["predicted"] for r in records] == ["72", "11"]
  assert [r["correct"] for r in records] == [True, False]
  assert metrics["exact_match"] == 0.5
