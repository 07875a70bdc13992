"""The LLaDA forward process and pre-training loss against hand-computed values and invariants."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llada_jax.diffusion.masking import (
    forward_process,
    mask_probability,
    random_length,
    sample_times,
)
from llada_jax.diffusion.objectives import (
    autoregressive_loss,
    diffusion_loss,
    pretraining_loss,
    sft_loss,
)

MASK = 259


def _logits(batch=2, length=6, vocab=8, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (batch, length, vocab))


def masked_diffusion_loss(logits, targets, masked, p_mask, num_tokens):
  """The library's loss of full-length rows (every position valid: num_tokens = B x L)."""
  assert num_tokens == targets.size
  batch = dict(
      targets=jnp.asarray(targets),
      masked=jnp.asarray(masked),
      p_mask=jnp.asarray(p_mask),
      valid=jnp.ones(targets.shape, bool),
  )
  return diffusion_loss(logits, batch)[0]


def _ce(logits, targets):
  logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return -np.take_along_axis(logp, np.asarray(targets)[..., None], axis=-1)[..., 0]


def test_every_token_masked_with_p_one_is_plain_mean_cross_entropy():
  logits = _logits()
  targets = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 8)
  loss = masked_diffusion_loss(logits, targets, jnp.ones((2, 6), bool), jnp.ones(2), 12)
  np.testing.assert_allclose(loss, _ce(logits, targets).mean(), rtol=1e-6)


def test_hand_computed_weighting_and_normalisation():
  logits = _logits()
  targets = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, 8)
  masked = np.zeros((2, 6), bool)
  masked[0, [1, 4]] = True
  masked[1, 2] = True
  p = np.array([0.25, 0.5], np.float32)
  ce = _ce(logits, targets)
  expected = (ce[0, 1] / 0.25 + ce[0, 4] / 0.25 + ce[1, 2] / 0.5) / (2 * 6)
  loss = masked_diffusion_loss(logits, targets, jnp.asarray(masked), jnp.asarray(p), 12)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_unmasked_positions_contribute_nothing():
  logits = _logits()
  targets = jnp.zeros((2, 6), jnp.int32)
  masked = jnp.zeros((2, 6), bool).at[:, :3].set(True)
  changed = logits.at[:, 3:].add(100.0 * jax.random.normal(jax.random.PRNGKey(5), (2, 3, 8)))
  a = masked_diffusion_loss(logits, targets, masked, jnp.full(2, 0.5), 12)
  b = masked_diffusion_loss(changed, targets, masked, jnp.full(2, 0.5), 12)
  np.testing.assert_allclose(a, b, rtol=1e-7)


def test_mask_probability_endpoints():
  np.testing.assert_allclose(mask_probability(jnp.array([0.0, 1.0]), 1e-3), [1e-3, 1.0])


def test_forward_process_masks_at_rate_p_and_only_valid_positions():
  tokens = jnp.full((4096, 64), 7, jnp.int32)
  noised = forward_process(jax.random.PRNGKey(0), tokens, mask_id=MASK, eps=1e-3)
  rate = np.asarray(noised.masked).mean(axis=1)
  assert np.abs(rate - np.asarray(noised.p_mask)).max() < 0.25
  assert abs(rate.mean() - 0.5) < 0.01  # E[p] = (1 - eps)/2 + eps
  assert np.all(np.asarray(noised.tokens)[np.asarray(noised.masked)] == MASK)
  assert np.all(np.asarray(noised.tokens)[~np.asarray(noised.masked)] == 7)
  valid = jnp.arange(64)[None] < 10
  cut = forward_process(jax.random.PRNGKey(0), tokens, mask_id=MASK, eps=1e-3, valid=valid)
  assert not np.asarray(cut.masked)[:, 10:].any()


def test_random_length_distribution():
  keys = jax.random.split(jax.random.PRNGKey(0), 2000)
  never = jax.vmap(lambda k: random_length(k, 16, 0.0))(keys)
  always = np.asarray(jax.vmap(lambda k: random_length(k, 16, 1.0))(keys))
  assert np.all(np.asarray(never) == 16)
  assert always.min() == 1 and always.max() == 16
  assert len(np.unique(always)) == 16
  sometimes = np.asarray(jax.vmap(lambda k: random_length(k, 16, 0.25))(keys))
  assert 0.15 < np.mean(sometimes != 16) < 0.3


def test_length_cut_equals_truncation():
  """The static-shape cut (masking positions >= length) computes what truncating the batch would."""
  vocab, length = 16, 10
  table = jax.random.normal(jax.random.PRNGKey(3), (vocab + 1, vocab))

  def apply_fn(tokens, attention_mask):
    # A toy "model" whose output at i depends on every attended key, so leaks would show.
    emb = table[tokens]
    pooled = jnp.sum(jnp.where(attention_mask[..., None], emb, 0.0), axis=1, keepdims=True)
    return emb + 0.1 * pooled

  tokens = jax.random.randint(jax.random.PRNGKey(4), (3, length), 0, vocab)
  for seed in range(20):
    rng = jax.random.PRNGKey(seed)
    loss, metrics = pretraining_loss(
        apply_fn, tokens, rng, mask_id=vocab, eps=1e-3, random_length_prob=1.0
    )
    cut = int(metrics["length"])
    if 1 < cut < length:
      break
  # Recompute by truncating, with the same noise the loss drew.
  _, noise_key = jax.random.split(rng)
  valid = jnp.broadcast_to(jnp.arange(length) < cut, tokens.shape)
  noised = forward_process(noise_key, tokens, mask_id=vocab, eps=1e-3, valid=valid)
  logits = apply_fn(noised.tokens[:, :cut], jnp.ones((3, cut), bool))
  expected = masked_diffusion_loss(
      logits, tokens[:, :cut], noised.masked[:, :cut], noised.p_mask, 3 * cut
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_loss_is_an_unbiased_estimate_of_log_vocab_at_uniform_logits():
  """With constant logits every CE is log V, and E[sum_masked 1/p] / L = 1, so E[loss] = log V."""
  vocab = 8

  def apply_fn(tokens, attention_mask):
    del attention_mask
    return jnp.zeros(tokens.shape + (vocab,))

  tokens = jnp.zeros((256, 64), jnp.int32)
  losses = [
      pretraining_loss(
          apply_fn, tokens, jax.random.PRNGKey(i), mask_id=vocab, eps=1e-3, random_length_prob=0.0
      )[0]
      for i in range(8)
  ]
  assert abs(float(np.mean(losses)) - np.log(vocab)) / np.log(vocab) < 0.05


def test_stratified_times_cover_the_unit_interval_evenly():
  t = np.asarray(sample_times(jax.random.PRNGKey(0), 8, "stratified"))
  np.testing.assert_allclose(np.sort(np.diff(np.sort(t))), np.full(7, 1 / 8), atol=1e-6)
  many = np.concatenate(
      [np.asarray(sample_times(jax.random.PRNGKey(i), 4, "stratified")) for i in range(2000)]
  )
  assert abs(many.mean() - 0.5) < 0.01 and abs(np.mean(many < 0.25) - 0.25) < 0.02


def test_stratified_times_keep_the_expected_loss_and_lower_its_variance():
  """A toy predictor that is right when the left neighbour is visible, uniform otherwise: its loss
  falls with t, which is the variance that stratifying t removes."""
  vocab, length = 8, 32

  def apply_fn(noisy, attention_mask):
    del attention_mask
    left = jnp.roll(noisy, 1, axis=1)
    guess = jax.nn.one_hot((left + 1) % vocab, vocab) * 6.0
    return jnp.where((left == vocab)[..., None], 0.0, guess)

  tokens = jnp.broadcast_to(jnp.arange(length) % vocab, (8, length))

  def losses(method):
    return np.asarray(
        [
            pretraining_loss(
                apply_fn,
                tokens,
                jax.random.PRNGKey(i),
                mask_id=vocab,
                eps=1e-3,
                random_length_prob=0.0,
                time_sampling=method,
            )[0]
            for i in range(400)
        ]
    )

  uniform, stratified = losses("uniform"), losses("stratified")
  stderr = np.hypot(uniform.std(), stratified.std()) / np.sqrt(400)
  assert abs(uniform.mean() - stratified.mean()) < 4 * stderr
  assert stratified.var() < 0.8 * uniform.var()


def _sft_reference(logits, tokens, masked, p_mask, prompt_lengths):
  """The official SFT formula: sum over masked CE / p / answer_length, over the batch size."""
  ce = _ce(logits, tokens)
  answer_lengths = tokens.shape[1] - np.asarray(prompt_lengths)
  total = 0.0
  for b in range(tokens.shape[0]):
    for i in range(tokens.shape[1]):
      if masked[b, i]:
        total += ce[b, i] / p_mask[b] / answer_lengths[b]
  return total / tokens.shape[0]


def test_sft_loss_never_masks_the_prompt_and_matches_the_official_formula():
  vocab, length = 8, 10
  table = jax.random.normal(jax.random.PRNGKey(3), (vocab + 1, vocab))
  seen = []

  def apply_fn(tokens, attention_mask):
    del attention_mask
    seen.append(tokens)
    return table[tokens]

  tokens = jax.random.randint(jax.random.PRNGKey(1), (3, length), 0, vocab)
  prompt_lengths = jnp.array([2, 5, 9])
  rng = jax.random.PRNGKey(7)
  loss, _ = sft_loss(apply_fn, tokens, prompt_lengths, rng, mask_id=vocab, eps=1e-3)
  noisy = np.asarray(seen[0])
  for b, plen in enumerate(np.asarray(prompt_lengths)):
    np.testing.assert_array_equal(noisy[b, :plen], np.asarray(tokens)[b, :plen])
  is_response = np.arange(length)[None] >= np.asarray(prompt_lengths)[:, None]
  _, noise_key = jax.random.split(rng)
  noised = forward_process(
      noise_key, tokens, mask_id=vocab, eps=1e-3, valid=jnp.asarray(is_response)
  )
  expected = _sft_reference(
      table[noisy],
      np.asarray(tokens),
      np.asarray(noised.masked),
      np.asarray(noised.p_mask),
      prompt_lengths,
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_autoregressive_loss_is_next_token_cross_entropy_without_the_mask_column():
  vocab, mask_id = 8, 7
  table = jax.random.normal(jax.random.PRNGKey(3), (vocab, vocab))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, mask_id)
  loss, _ = autoregressive_loss(table[tokens], tokens, excluded=mask_id)
  ce = _ce(np.asarray(table)[np.asarray(tokens)][:, :-1, :mask_id], np.asarray(tokens)[:, 1:])
  np.testing.assert_allclose(loss, ce.mean(), rtol=1e-6)


def test_chunked_cross_entropy_equals_full_logits_in_value_and_gradient():
  from llada_jax.diffusion.objectives import chunked_cross_entropy  # pylint: disable=g-import-not-at-top

  keys = jax.random.split(jax.random.PRNGKey(0), 3)
  hidden = jax.random.normal(keys[0], (2, 12, 8))
  head = jax.random.normal(keys[1], (8, 50))
  targets = jax.random.randint(keys[2], (2, 12), 0, 50)

  def full(h, w):
    return optax.softmax_cross_entropy_with_integer_labels(h @ w, targets)

  np.testing.assert_allclose(
      chunked_cross_entropy(hidden, head, targets, 4).ce, full(hidden, head), rtol=1e-5
  )
  # CAP's terms by hand in NumPy: the entropy of softmax(h @ w) and whether its argmax is right.
  logits = np.asarray(hidden @ head, np.float64)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  terms = chunked_cross_entropy(hidden, head, targets, 4, confidence=True)
  np.testing.assert_allclose(terms.entropy, -(p * np.log(p)).sum(-1), rtol=1e-5)
  np.testing.assert_array_equal(terms.correct, logits.argmax(-1) == np.asarray(targets))
  weights = jnp.linspace(0.0, 1.0, 24).reshape(2, 12)
  grads = [
      jax.grad(lambda h, w, f=f: jnp.sum(f(h, w) * weights), argnums=(0, 1))(hidden, head)
      for f in (full, lambda h, w: chunked_cross_entropy(h, w, targets, 3).ce)
  ]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), *grads)


def _toy_apply(noisy, vocab=8):
  """Right when the left neighbour is visible, uniform otherwise (as above)."""
  left = jnp.roll(noisy, 1, axis=1)
  guess = jax.nn.one_hot((left + 1) % vocab, vocab) * 6.0
  return jnp.where((left == vocab)[..., None], 0.0, guess)


def test_complementary_masks_keep_the_bound_and_lower_its_variance():
  """A row and its complement score every maskable token once (the prompt never), each with
  its own 1/p; the pair's mean estimates the same bound as two independent masks (the same two
  passes) with less variance."""
  from llada_jax.diffusion.masking import noise_batch, with_complements  # pylint: disable=g-import-not-at-top
  from llada_jax.diffusion.objectives import unpacked_batch  # pylint: disable=g-import-not-at-top

  vocab, length, rows, draws = 8, 32, 4, 400
  tokens = jnp.broadcast_to(jnp.arange(length) % vocab, (rows, length))
  prompt = jnp.asarray([0, 5, 0, 9])
  clean = unpacked_batch(tokens, prompt_length=prompt)

  def noised(key):
    return noise_batch(key, clean, mask_id=vocab, eps=1e-3, random_length_prob=0.0)

  pair = with_complements(noised(jax.random.PRNGKey(0)), vocab)
  first, second = {k: v[0::2] for k, v in pair.items()}, {k: v[1::2] for k, v in pair.items()}
  after_prompt = np.arange(length)[None] >= np.asarray(prompt)[:, None]
  np.testing.assert_array_equal(first["masked"] ^ second["masked"], after_prompt)
  np.testing.assert_array_equal(second["inputs"], np.where(second["masked"], vocab, tokens))
  np.testing.assert_allclose(second["p_mask"], 1.0 - np.asarray(first["p_mask"]))

  def estimate(batch):
    return diffusion_loss(_toy_apply(batch["inputs"]), batch)[0]

  keys = jax.random.split(jax.random.PRNGKey(1), 2 * draws).reshape(draws, 2, -1)
  paired = np.asarray(jax.vmap(lambda k: estimate(with_complements(noised(k[0]), vocab)))(keys))
  independent = np.asarray(
      jax.vmap(lambda k: (estimate(noised(k[0])) + estimate(noised(k[1]))) / 2)(keys)
  )
  print(
      f"variance: complementary {paired.var():.4g}, two independent masks {independent.var():.4g}"
  )
  stderr = np.hypot(paired.std(), independent.std()) / np.sqrt(draws)
  assert abs(paired.mean() - independent.mean()) < 4 * stderr
  assert paired.var() < 0.8 * independent.var(), (paired.var(), independent.var())


def _log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_cap_and_complementary_masking_in_the_training_loss_by_hand(tiny_config):
  """The model's training loss against NumPy: CAP adds λ x the mean entropy of the correct
  predictions at masked positions (the metric loss stays the bound, a per-sequence bound has no
  CAP); complementary masking averages the row's bound and its complement's."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  from llada_jax.config import validate  # pylint: disable=g-import-not-at-top
  from llada_jax.diffusion.masking import noise_batch  # pylint: disable=g-import-not-at-top
  from llada_jax.diffusion.objectives import unpacked_batch  # pylint: disable=g-import-not-at-top
  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top

  mask_id, key = tiny_config.tokens.mask_id, jax.random.PRNGKey(3)
  lm = MaskedDiffusionLM(tiny_config)
  params = nn.meta.unbox(lm.init(key))
  tokens = np.asarray(jax.random.randint(key, (4, 32), 0, 250))
  batch = noise_batch(
      key, unpacked_batch(jnp.asarray(tokens)), mask_id=mask_id, eps=1e-3, random_length_prob=0.0
  )
  features = (batch["valid"], batch["positions"], batch["segment_ids"])

  def log_p(inputs):
    return _log_softmax(lm.apply(params, inputs, *features))

  masked, p = np.asarray(batch["masked"]), np.asarray(batch["p_mask"])[:, None]
  logp = log_p(batch["inputs"])
  # Half of the masked positions made correct: the target is the prediction there (a masked
  # target is not among the inputs, so the logits stay the same).
  targets = np.where(masked & (np.arange(32) % 2 == 0), logp.argmax(-1), tokens)
  batch["targets"] = jnp.asarray(targets)
  ce = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  bound = np.sum(np.where(masked, ce / p, 0.0)) / targets.size
  correct = masked & (logp.argmax(-1) == targets)
  entropy = -(np.exp(logp) * logp).sum(-1)[correct].mean()
  assert correct.sum() >= 8

  def loss(reduction="mean", exact=False, **diffusion):
    config = ml_collections.ConfigDict(tiny_config.to_dict())
    config.diffusion.update(diffusion)
    lm = MaskedDiffusionLM(validate(config))
    return lm.loss(params, batch, key, reduction=reduction, exact=exact)

  total, metrics = loss(cap_weight=0.5)
  np.testing.assert_allclose(total, bound + 0.5 * entropy, rtol=1e-5)
  np.testing.assert_allclose(metrics["loss"], bound, rtol=1e-5)
  np.testing.assert_allclose(metrics["cap/entropy"], entropy, rtol=1e-5)
  np.testing.assert_allclose(loss(cap_weight=0.5, exact=True)[0], bound, rtol=1e-5)  # validation
  per_row = np.sum(np.where(masked, ce / p, 0.0), -1) / 32
  np.testing.assert_allclose(loss("sequence", cap_weight=0.5)[0], per_row, rtol=1e-5)

  others = ~masked
  comp_logp = log_p(jnp.where(others, mask_id, jnp.asarray(targets)))
  comp_ce = -np.take_along_axis(comp_logp, targets[..., None], -1)[..., 0]
  comp = np.sum(np.where(others, comp_ce / (1 - p), 0.0)) / targets.size
  np.testing.assert_allclose(loss(complementary_masking=True)[0], (bound + comp) / 2, rtol=1e-5)
  np.testing.assert_allclose(loss(complementary_masking=True, exact=True)[0], bound, rtol=1e-5)
