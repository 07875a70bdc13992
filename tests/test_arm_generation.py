"""Autoregressive models generate and score as causal language models: next-token decoding with a
key/value cache (greedy = argmax decoding of the network's own logits by hand, and = transformers'
`generate` for an imported Llama), temperature / top-k / top-p sampling with the softmax's
frequencies, a row's answer alone as in a batch, and log-likelihoods without the mask row
(= transformers' log-probabilities of the same Llama)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import make_tiny_config
from llada_jax.diffusion.likelihood import log_likelihood
from llada_jax.errors import ConfigError
from llada_jax.keys import item_keys
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.model import ModelConfig, Transformer, logits
from llada_jax.sampling import generate

GEN = 8


@pytest.fixture(scope="module")
def arm():
  """A tiny random causal model whose weights are scaled up (peaked, distinct predictions)."""
  config = make_tiny_config(causal=True)
  config.model.init_std = 0.3
  model = Transformer(ModelConfig.from_config(config))
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(1), jnp.zeros((1, 8), jnp.int32)))
  return config, params["params"]


def _argmax_decoding(config, params, prompt, steps):
  """Greedy next-token decoding by hand: a full causal pass over the tokens so far, the argmax of
  the last position's logits over every token but the mask token (NumPy), appended."""
  tokens = list(prompt)
  for _ in range(steps):
    last = np.asarray(logits(config, params, np.asarray([tokens])))[0, -1].astype(np.float64)
    last[config.tokens.mask_id] = -np.inf
    tokens.append(int(last.argmax()))
  return tokens[len(prompt) :]


def _cut_at_end(tokens, config):
  """The tokens up to and including the first EOS/EoT, EOS after it (how an ARM answer ends)."""
  ends = {config.tokens.eos_id, config.tokens.eot_id} - {-1}
  out, ended = [], False
  for t in tokens:
    out.append(config.tokens.eos_id if ended else t)
    ended = ended or t in ends
  return out


def _padded(prompts, pad_id):
  width = max(map(len, prompts))
  batch = np.full((len(prompts), width), pad_id, np.int32)
  mask = np.zeros(batch.shape, bool)
  for row, p in enumerate(prompts):
    batch[row, width - len(p) :] = p
    mask[row, width - len(p) :] = True
  return batch, mask, width


PROMPTS = [[7, 8, 9], [20, 21, 22, 23, 24, 25], [100, 3]]


def test_greedy_answers_are_argmax_decoding_by_hand(arm):
  config, params = arm
  batch, mask, width = _padded(PROMPTS, config.tokens.pad_id)
  out = np.asarray(
      generate(config, params, batch, mask, gen_length=GEN, steps=GEN, block_length=GEN)
  )
  for row, prompt in enumerate(PROMPTS):
    want = _cut_at_end(_argmax_decoding(config, params, prompt, GEN), config)
    assert out[row, width:].tolist() == want, f"prompt {row}"
    np.testing.assert_array_equal(out[row, :width], batch[row])


def test_top_k_one_and_a_tiny_nucleus_are_greedy(arm):
  config, params = arm
  batch, mask, width = _padded(PROMPTS, config.tokens.pad_id)
  kwargs = dict(gen_length=GEN, steps=GEN, block_length=GEN, temperature=1.0)
  greedy = np.asarray(generate(config, params, batch, mask, **dict(kwargs, temperature=0.0)))
  for truncation in (dict(top_k=1), dict(top_p=1e-6)):
    sampled = np.asarray(
        generate(config, params, batch, mask, rng=jax.random.PRNGKey(3), **kwargs, **truncation)
    )
    np.testing.assert_array_equal(sampled, greedy)
  free = np.asarray(generate(config, params, batch, mask, rng=jax.random.PRNGKey(3), **kwargs))
  assert not np.array_equal(free[:, width:], greedy[:, width:])


@pytest.mark.parametrize(
    "options,keep",
    [
        (dict(temperature=1.0), None),
        (dict(temperature=0.7), None),
        (dict(temperature=1.0, top_k=3), 3),
        (dict(temperature=1.0, top_p=0.5), "p"),
    ],
)
def test_first_token_frequencies_are_the_truncated_softmax(arm, options, keep):
  """4000 rows of one prompt, each with its own key: the first answer token's frequencies match
  softmax(logits / T) over every token but the mask (truncated to the k most probable, or the
  nucleus of mass 0.5, and renormalised), within 4 standard errors (and 2 counts) per token."""
  config, params = arm
  prompt = [7, 8, 9]
  rows = 4000
  last = np.asarray(logits(config, params, np.asarray([prompt])))[0, -1].astype(np.float64)
  last[config.tokens.mask_id] = -np.inf
  scaled = last / options["temperature"]
  p = np.exp(scaled - scaled.max())
  p /= p.sum()
  order = np.argsort(-p)
  if keep == "p":
    before = np.cumsum(p[order]) - p[order]
    kept = order[before < options["top_p"]]
  else:
    kept = order[: keep or len(p)]
  want = np.zeros_like(p)
  want[kept] = p[kept] / p[kept].sum()
  keys = item_keys(jax.random.PRNGKey(0), np.arange(rows))
  out = np.asarray(
      generate(
          config,
          params,
          np.tile(prompt, (rows, 1)),
          rng=keys,
          gen_length=1,
          steps=1,
          block_length=1,
          **options,
      )
  )[:, -1]
  got = np.bincount(out, minlength=len(p)) / rows
  tolerance = 4 * np.sqrt(want * (1 - want) / rows) + 2 / rows  # + 2 counts: Poisson tails
  assert np.all(np.abs(got - want) <= tolerance), np.abs(got - want).max()
  if keep is not None:
    assert got[np.setdiff1d(np.arange(len(p)), kept)].sum() == 0


def test_a_row_is_answered_as_alone_whatever_its_batch_and_when_it_ends(arm):
  """Rows of different lengths sampled at T=1 with per-item keys; a row that emits EOS writes EOS
  afterwards while the others go on."""
  config, params = arm
  # An EOS-leaning model: a bias on the EOS column makes some rows end early.
  params = jax.tree.map(lambda a: a, params)
  head = np.asarray(params["ff_out"]["kernel"]).copy()
  head[:, config.tokens.eos_id] += 0.4 * np.abs(head).max()
  params["ff_out"]["kernel"] = jnp.asarray(head)
  prompts = PROMPTS + [[30, 31, 32, 33, 34, 35, 36, 37]]
  batch, mask, width = _padded(prompts, config.tokens.pad_id)
  keys = item_keys(jax.random.PRNGKey(9), [5, 1, 7, 2])
  kwargs = dict(gen_length=GEN, steps=GEN, block_length=GEN, temperature=1.0)
  together = np.asarray(generate(config, params, batch, mask, rng=keys, **kwargs))[:, width:]
  ended = 0
  for row, prompt in enumerate(prompts):
    alone = np.asarray(
        generate(config, params, np.asarray([prompt]), rng=keys[row : row + 1], **kwargs)
    )[0, len(prompt) :]
    np.testing.assert_array_equal(alone, together[row])
    eos = np.flatnonzero(alone == config.tokens.eos_id)
    if len(eos) and eos[0] < GEN - 1:
      ended += 1
      assert (alone[eos[0] :] == config.tokens.eos_id).all()
  assert 0 < ended < len(prompts), "the test needs rows that end early and rows that do not"


def test_arm_refuses_what_it_cannot_do(arm):
  config, params = arm
  kwargs = dict(gen_length=GEN, steps=GEN, block_length=GEN)
  for options, needle in (
      (dict(parallel_threshold=0.5), "parallel_threshold=0.5 is not allowed for an autoregressive"),
      (dict(cfg_scale=1.0), "cfg_scale=1.0 is not allowed for an autoregressive"),
  ):
    with pytest.raises(ConfigError, match=needle):
      generate(config, params, np.asarray([[7, 8]]), **kwargs, **options)
  with pytest.raises(ConfigError, match="empty prompt is not allowed for an autoregressive"):
    generate(config, params, np.asarray([[7, 8]]), np.asarray([[False, False]]), **kwargs)
  with pytest.raises(ConfigError, match="not allowed for an autoregressive model"):
    generate(config, params, np.asarray([[7, config.tokens.mask_id]]), **kwargs)


def _log_softmax_without_mask(row_logits, mask_id):
  z = np.asarray(row_logits, np.float64).copy()
  z[..., mask_id] = -np.inf
  return (
      z
      - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
      - z.max(-1, keepdims=True)
  )


def test_arm_likelihood_and_loss_leave_the_mask_row_out(arm):
  """log p(answer | prompt) and the per-sequence loss of an ARM: the chain rule of log-softmaxes
  over every token but the mask token (NumPy from the network's logits)."""
  config, params = arm
  prompt, answer = [7, 8, 9], [40, 41, 42, 43]
  full = np.asarray(logits(config, params, np.asarray([prompt + answer])))[0]
  logp = _log_softmax_without_mask(full, config.tokens.mask_id)
  want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))
  got = log_likelihood(config, params, prompt, answer, mc_num=1, batch_size=1)
  np.testing.assert_allclose(float(got.log_likelihood), want, rtol=1e-5)
  lm = MaskedDiffusionLM(config)
  tokens = jnp.asarray([prompt + answer])
  batch = dict(targets=tokens, valid=jnp.ones_like(tokens, bool))
  loss, _ = lm.loss(params, batch, jax.random.PRNGKey(0), reduction="sequence")
  seq = prompt + answer
  want_loss = -np.mean([logp[i, seq[i + 1]] for i in range(len(seq) - 1)])
  np.testing.assert_allclose(float(loss[0]), want_loss, rtol=1e-5)


def _hf_llama(tmp_path_factory):
  """A tiny random transformers LlamaForCausalLM saved as an HF folder, and the model."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  hf_config = transformers.LlamaConfig(
      vocab_size=97,
      hidden_size=48,
      intermediate_size=80,
      num_hidden_layers=2,
      num_attention_heads=6,
      num_key_value_heads=2,
      max_position_embeddings=64,
      rope_theta=500.0,
      tie_word_embeddings=False,
      bos_token_id=1,
      eos_token_id=2,
      pad_token_id=0,
  )
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(hf_config).float().eval()
  with torch.no_grad():
    for parameter in model.parameters():
      if parameter.ndim == 2:
        parameter.normal_(0.0, 0.3)
  folder = tmp_path_factory.mktemp("hf_llama")
  model.save_pretrained(folder, safe_serialization=True)
  return folder, model, torch


@pytest.fixture(scope="module")
def imported_llama(tmp_path_factory):
  from llada_jax.interop.llama import load_llama  # pylint: disable=g-import-not-at-top

  folder, model, torch = _hf_llama(tmp_path_factory)
  config, params = load_llama(folder, dtype="float32")
  return config, params, model, torch


def test_imported_llama_greedy_answers_are_transformers_generate(imported_llama):
  config, params, model, torch = imported_llama
  prompts = [[1, 5, 6, 7], [1, 50, 51, 52, 53, 54, 60], [1, 90]]
  batch, mask, width = _padded(prompts, config.tokens.pad_id)
  out = np.asarray(
      generate(config, params, batch, mask, gen_length=GEN, steps=GEN, block_length=GEN)
  )
  for row, prompt in enumerate(prompts):
    with torch.no_grad():
      hf = model.generate(
          torch.tensor([prompt]), max_new_tokens=GEN, do_sample=False, pad_token_id=0
      )[0, len(prompt) :].tolist()
    ours = out[row, width:].tolist()
    np.testing.assert_array_equal(ours[: len(hf)], hf)
    assert all(t == config.tokens.eos_id for t in ours[len(hf) :])


def test_imported_llama_log_likelihood_is_transformers(imported_llama):
  """log p(answer | prompt) of the imported Llama equals transformers' log-softmax chain rule
  (the appended mask row takes no probability)."""
  config, params, model, torch = imported_llama
  prompt, answer = [1, 5, 6, 7], [30, 31, 32, 33, 34, 35, 36, 37]
  with torch.no_grad():
    hf_logits = model(torch.tensor([prompt + answer])).logits[0].double()
  logp = torch.log_softmax(hf_logits, -1).numpy()
  want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))
  got = log_likelihood(config, params, prompt, answer, mc_num=1, batch_size=1)
  np.testing.assert_allclose(float(got.log_likelihood), want, rtol=0, atol=2e-4)


def test_an_existing_token_as_the_mask_stays_in_the_softmax(tmp_path_factory):
  """`from-hf --mask_id=5` takes a real token of the Llama as the mask: the ARM still predicts
  it, scores text holding it and generates as transformers does."""
  from llada_jax.interop.llama import load_llama  # pylint: disable=g-import-not-at-top

  folder, model, torch = _hf_llama(tmp_path_factory)
  config, params = load_llama(folder, mask_id=5, dtype="float32")
  prompt, answer = [1, 5, 6, 7], [30, 5, 32, 5]
  with torch.no_grad():
    hf_logits = model(torch.tensor([prompt + answer])).logits[0].double()
  logp = torch.log_softmax(hf_logits, -1).numpy()
  want = sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer))
  got = log_likelihood(config, params, prompt, answer, mc_num=1, batch_size=1)
  np.testing.assert_allclose(float(got.log_likelihood), want, rtol=0, atol=2e-4)
  with torch.no_grad():
    hf = model.generate(torch.tensor([prompt]), max_new_tokens=GEN, do_sample=False, pad_token_id=0)
  ours = generate(config, params, np.asarray([prompt]), gen_length=GEN, steps=GEN, block_length=GEN)
  hf = hf[0, len(prompt) :].tolist()
  np.testing.assert_array_equal(np.asarray(ours)[0, len(prompt) : len(prompt) + len(hf)], hf)
