"""ELBO-based DPO / VRPO (llada_jax/posttrain): the loss by hand, antithetic sharing, batch
invariance, the frozen reference, VRPO's variance reduction and the preference file."""

import json

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.diffusion.likelihood import bound_estimator
from llada_jax.errors import ConfigError
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model.forward import logits
from llada_jax.posttrain.dpo import dpo_loss, pack_preferences, preference_terms
from llada_jax.posttrain.preference import PreferencePair, read_preferences

PAIRS = [
    PreferencePair((5, 6, 7), (8, 9, 10, 11), (12, 13)),
    PreferencePair((20, 21), (22, 23, 24), (25, 26, 27, 28, 29)),
    PreferencePair((30,), (31, 32), (33, 34, 35)),
]


def _params(config, seed):
  return flax.linen.meta.unbox(MaskedDiffusionLM(config).init(jax.random.PRNGKey(seed)))


@pytest.fixture(name="mdm", scope="module")
def _mdm():
  config = make_tiny_config()
  return config, _params(config, 0), _params(config, 1)


def _log_prob_by_hand(config, params, prompt, answer) -> float:
  """log p(answer | prompt) of a causal model from its logits, in NumPy (the chain rule)."""
  ids = np.asarray(prompt + answer)[None]
  out = np.asarray(logits(config, params, ids), np.float64)[0]
  out = out[:, : config.tokens.mask_id]  # a causal model never predicts the mask row
  logp = (
      out
      - np.log(np.exp(out - out.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - out.max(-1, keepdims=True)
  )
  return float(sum(logp[len(prompt) + i - 1, a] for i, a in enumerate(answer)))


def test_the_dpo_loss_of_two_pairs_is_the_formula_by_hand():
  """An ARM's bound is its exact log-likelihood, so the loss is DPO's by hand:
  -log sigmoid(beta [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])."""
  config = make_tiny_config(causal=True)
  policy, reference = _params(config, 0), _params(config, 1)
  pairs, beta = PAIRS[:2], 0.3
  batch = pack_preferences(pairs, [0, 1], seed=0)
  loss, terms = dpo_loss(bound_estimator(config, 1, 1), policy, reference, batch, beta)
  margins = []
  for p in pairs:
    chosen = [
        _log_prob_by_hand(config, w, list(p.prompt), list(p.chosen)) for w in (policy, reference)
    ]
    rejected = [
        _log_prob_by_hand(config, w, list(p.prompt), list(p.rejected)) for w in (policy, reference)
    ]
    margins.append((chosen[0] - chosen[1]) - (rejected[0] - rejected[1]))
  want = np.mean([np.log1p(np.exp(-beta * m)) for m in margins])
  np.testing.assert_allclose(np.asarray(terms.margin), margins, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)


def test_policy_equal_to_reference_gives_margins_of_exactly_zero(mdm):
  """Antithetic sampling: the policy and the reference score an answer with the same timesteps
  and masks, so equal models have margins of exactly 0 and the loss log 2; independent masks
  (the naive estimator) do not."""
  config, params, _ = mdm
  batch = pack_preferences(PAIRS, [0, 1, 2], seed=3)
  estimator = bound_estimator(config, 8, 8)
  loss, terms = dpo_loss(estimator, params, params, batch, beta=0.1)
  assert np.all(np.asarray(terms.margin) == 0.0)
  assert float(loss) == pytest.approx(np.log(2.0), abs=1e-7)
  naive = preference_terms(estimator, params, params, batch, antithetic=False)
  assert np.all(np.asarray(naive.margin) != 0.0)


def test_a_pair_scores_the_same_alone_and_in_any_batch(mdm):
  """A pair's terms depend on (seed, step, its index) only: alone, in another order, among other
  pairs and padded wider, they agree."""
  config, params, reference = mdm
  estimator = bound_estimator(config, 8, 4)

  def margins(pairs, indices, width=None):
    batch = pack_preferences(pairs, indices, seed=5, step=2, width=width)
    return np.asarray(preference_terms(estimator, params, reference, batch).margin)

  together = margins(PAIRS, [0, 1, 2])
  np.testing.assert_allclose(margins([PAIRS[1]], [1]), together[1:2], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      margins([PAIRS[2], PAIRS[0]], [2, 0], width=20), together[[2, 0]], rtol=1e-5, atol=1e-5
  )
  other_step = np.asarray(
      preference_terms(
          estimator, params, reference, pack_preferences(PAIRS, [0, 1, 2], seed=5, step=3)
      ).margin
  )
  assert np.all(other_step != together)  # each step draws fresh masks


def test_the_gradient_moves_the_policy_and_never_the_reference(mdm):
  config, params, reference = mdm
  estimator = bound_estimator(config, 4, 4)
  batch = pack_preferences(PAIRS, [0, 1, 2], seed=0)
  grad_policy, grad_reference = jax.grad(
      lambda p, r: dpo_loss(estimator, p, r, batch, beta=0.5)[0], argnums=(0, 1)
  )(params, reference)
  assert max(float(jnp.abs(g).max()) for g in jax.tree.leaves(grad_policy)) > 0
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grad_reference))


def test_vrpo_reduces_the_variance_of_the_loss_estimate(mdm):
  """VRPO (n_t = n stratified timesteps, masks shared with the reference) against the naive
  estimator (n_t = 1, independent masks) at the same budget n = 8: the variance of the loss
  estimate over seeds is several times smaller."""
  config, params, reference = mdm
  vrpo, naive = bound_estimator(config, 8, 8), bound_estimator(config, 8, 8, one_timestep=True)

  @jax.jit
  def losses(seed_batch):
    return (
        dpo_loss(vrpo, params, reference, seed_batch, 1.0)[0],
        dpo_loss(naive, params, reference, seed_batch, 1.0, antithetic=False)[0],
    )

  draws = np.asarray([losses(pack_preferences(PAIRS, [0, 1, 2], seed=s)) for s in range(24)])
  ratio = draws[:, 0].var() / draws[:, 1].var()
  assert ratio < 0.5, ratio


def _write(path, lines):
  path.write_text("\n".join(json.dumps(x) if not isinstance(x, str) else x for x in lines))
  return path


def test_preference_files_read_text_and_chat_prompts(tmp_path, tiny_config):
  path = _write(
      tmp_path / "prefs.jsonl",
      [
          {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5"},
          {
              "prompt": [{"role": "user", "content": "hi"}],
              "chosen": "hello",
              "rejected": "go away",
          },
      ],
  )
  pairs = read_preferences(path, tiny_config)
  eos = tiny_config.tokens.eos_id
  assert pairs[0] == PreferencePair(
      tuple(b + 3 for b in b"Q: 2+2?"), (ord(" ") + 3, ord("4") + 3, eos), (35, 56, eos)
  )
  assert bytes(i - 3 for i in pairs[1].prompt) == b"User: hi\nAssistant:"
  assert pairs[1].chosen[-1] == eos and len(pairs[1].rejected) == len("go away") + 1


@pytest.mark.parametrize(
    "line,message",
    [
        ("{not json", r":1: not a JSON object"),
        ({"prompt": "a", "chosen": "b"}, r":1: no string field 'rejected'"),
        ({"prompt": "a", "chosen": "b", "rejected": "b"}, r":1: chosen and rejected are the same"),
        ({"prompt": 3, "chosen": "b", "rejected": "c"}, r":1: prompt='3' is not allowed"),
        (
            {"prompt": [{"role": "robot", "content": "x"}], "chosen": "b", "rejected": "c"},
            r"expected text or a non-empty list of \{'role': one of system, user, assistant",
        ),
        (
            {"prompt": "a" * 70, "chosen": "b", "rejected": "c"},
            r":1: prompt \+ answer length 72 is not allowed: expected at most "
            r"model.max_sequence_length=64",
        ),
    ],
)
def test_a_bad_preference_line_is_named_in_one_line(tmp_path, tiny_config, line, message):
  path = _write(tmp_path / "prefs.jsonl", [line])
  with pytest.raises(ConfigError, match=message) as error:
    read_preferences(path, tiny_config)
  assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_block_model_scores_pairs_with_its_block_bound():
  """DPO on a block diffusion model runs its block NELBO: equal models have margins of exactly 0,
  a pair scores the same alone and in a batch, and other parameters move the margins."""
  config = make_tiny_config()
  config.diffusion.update(dict(objective="block", block_size=4))
  policy, reference = _params(config, 0), _params(config, 1)
  estimator = bound_estimator(config, 4, 4)
  batch = pack_preferences(PAIRS, [0, 1, 2], seed=2)
  same = preference_terms(estimator, policy, policy, batch)
  assert np.all(np.asarray(same.margin) == 0.0)
  together = np.asarray(preference_terms(estimator, policy, reference, batch).margin)
  alone = preference_terms(estimator, policy, reference, pack_preferences(PAIRS[2:], [2], seed=2))
  np.testing.assert_allclose(np.asarray(alone.margin), together[2:], rtol=1e-5, atol=1e-5)
  assert np.all(together != 0.0)
