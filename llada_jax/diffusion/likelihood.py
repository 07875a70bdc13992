"""Monte-Carlo bound on log p(answer | prompt), LLaDA's lower-variance form.

For an answer of length L: draw l in {1..L}, mask exactly l answer positions chosen uniformly, and
score sum over masked CE * L / l; the estimate is minus the mean over samples. Within a mini-batch
of b samples l is stratified as in the official code: l_j = round(linspace(k, k + (b-1)L/b))_j,
wrapped into [1, L], with k uniform in [1, L]. Many (prompt, answer) pairs of different lengths are
scored at once (right-padded, padding hidden from attention): one forward pass holds the same
mini-batch index of every pair, so its batch is pairs x batch_size; all samples run inside one jit.
Pair i's key is fold_in(rng, i) and its mini-batch j's key fold_in(pair key, j); the masks are drawn
per position of the answer, so an estimate depends on (seed, pair index, the pair itself) only:
not on its neighbours in the call, the padded width, mc_num or the device count.

The other objectives score with their own likelihood (`score_pairs` picks it by objective): an
autoregressive model exactly, sum over answer tokens of log p(x_i | x_<i) (no samples; the prompt
must hold a token); a block
diffusion model with BD3-LM's NELBO (arXiv 2503.09573, Eq. 8): blocks aligned at the row's first
token as in training and sampling (the prompt's last block may hold the answer's first tokens),
each block's n_b answer tokens scored by the estimator above (l_b of them masked, weight
n_b / l_b) given the clean blocks before it and the prompt tokens in it, all blocks in one
two-stream pass.
B = 1 needs no sample: it is the exact autoregressive chain rule.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from llada_jax.config import objective_of
from llada_jax.diffusion import alignment
from llada_jax.diffusion.alignment import next_token_logits
from llada_jax.errors import ConfigError
from llada_jax.keys import item_keys
from llada_jax.model import ModelConfig, apply_model, network, positions_from_mask
from llada_jax.model.forward import head_logits, two_stream_hidden
from llada_jax.parallel.sharding import placement_context


class Bound(NamedTuple):
  """What an estimator of `bound_estimator` returns for N pairs: the estimate of
  log p(answer | prompt) [N] float32 nats, its standard error [N], and the MoE router statistics
  of its passes (`llada_jax.model.transformer.RouterStats`, the mean over the Monte-Carlo passes;
  {} for a dense model), which a post-training loss adds to its own
  (`llada_jax.diffusion.objectives.with_router_losses`)."""

  estimate: jax.Array
  stderr: jax.Array
  router: dict[str, jax.Array]


class Likelihood(NamedTuple):
  """Per pair: the estimate of log p(answer | prompt) (nats) and its standard error."""

  log_likelihood: np.ndarray
  stderr: np.ndarray


def stratified_lengths(
    key: jax.Array, answer_len: jax.Array, batch_size: int, one_timestep: bool = False
) -> jax.Array:
  """Numbers of masked answer tokens for one mini-batch: [batch_size] ints in [1, answer_len].

  one_timestep: all batch_size samples share one uniform count (VRPO's n_t = 1, its naive
  allocation of the budget; arXiv 2505.19223) instead of the stratified grid (n_t = batch_size)."""
  length = answer_len.astype(jnp.float32)
  k = jax.random.randint(key, (), 1, answer_len + 1).astype(jnp.float32)
  if one_timestep:
    return jnp.full((batch_size,), k, jnp.int32)
  grid = jnp.round(jnp.linspace(0.0, 1.0, batch_size) * (batch_size - 1) * length / batch_size + k)
  grid = grid.astype(jnp.int32)
  return (grid - 1) % answer_len + 1


def log_likelihood(
    config: ml_collections.ConfigDict,
    params: Any,
    prompt: Sequence[int] | Sequence[Sequence[int]],
    answer: Sequence[int] | Sequence[Sequence[int]],
    *,
    mc_num: int = 128,
    batch_size: int = 16,
    cfg_scale: float = 0.0,
    rng: jax.Array | None = None,
) -> Likelihood:
  """Estimates log p(answer | prompt) for one pair (flat id lists) or many (lists of lists).

  Args:
    config: the model's config (architecture and tokens.mask_id).
    params: mask predictor parameters.
    prompt, answer: token ids; every answer must be non-empty.
    mc_num: Monte-Carlo samples per pair (a multiple of batch_size, or fewer: then one pass of
      mc_num); 1 suffices for one-token answers.
    batch_size: samples per forward pass, stratified in l.
    cfg_scale: classifier-free guidance weight w (logits = u + (w+1)(c - u), u without the prompt).
    rng: PRNG key (default: from config.seed).

  Returns:
    Likelihood with arrays of shape [num_pairs] (scalars for a single pair).
  """
  single = len(prompt) == 0 or np.isscalar(prompt[0])
  prompts, answers = ([prompt], [answer]) if single else (list(prompt), list(answer))
  check_pairs(config, prompts, answers, mc_num, batch_size, cfg_scale)
  rng = jax.random.PRNGKey(config.seed) if rng is None else rng
  result = score_pairs(
      config,
      params,
      prompts,
      answers,
      item_keys(rng, len(prompts)),
      mc_num=mc_num,
      batch_size=batch_size,
      cfg_scale=cfg_scale,
  )
  if single:
    return Likelihood(result.log_likelihood[0], result.stderr[0])
  return result


def score_pairs(
    config: ml_collections.ConfigDict,
    params: Any,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    keys: jax.Array,
    *,
    mc_num: int,
    batch_size: int,
    cfg_scale: float = 0.0,
    sharding: jax.sharding.Sharding | None = None,
    width: int | None = None,
) -> Likelihood:
  """log_likelihood for a list of pairs with one PRNG key per pair (keys [N]).

  sharding, if given, places the pair axis of the inputs (e.g. over the devices of a mesh); the
  number of pairs must then divide evenly over it. width pads every row to that many tokens (one
  compiled program for pairs of different lengths); padding never changes a result. The pairs
  and options must have passed `check_pairs` (callers check a whole list once, not per call).
  """
  scorer = compiled_scorer(config, mc_num, batch_size, cfg_scale > 0)
  arrays = pack_rows(prompts, answers, width)
  arrays = (*arrays, keys)
  if sharding is not None:
    arrays = tuple(jax.device_put(a, sharding) for a in arrays)
  with placement_context(sharding):
    bound = jax.device_get(scorer(params, *arrays, jnp.float32(cfg_scale)))
  return Likelihood(np.asarray(bound.estimate), np.asarray(bound.stderr))


def compiled_scorer(
    config: ml_collections.ConfigDict,
    mc_num: int,
    batch_size: int,
    use_cfg: bool,
):
  """The jitted scorer of config's objective: score(params, tokens, valid, is_answer, keys [N],
  cfg_scale) -> `Bound` (without router statistics), for rows packed by `pack_rows` (prompt ++
  answer from index 0, right-padded). LLaDA's estimator (mdm), the exact chain rule (arm) or the
  block NELBO (block)."""
  return _jitted(bound_estimator(config, mc_num, batch_size, use_cfg))


@functools.lru_cache(maxsize=16)
def _jitted(estimator):
  # Scoring reads no router statistics: dropping them lets the compiler leave them out.
  return jax.jit(lambda *args: estimator(*args)._replace(router={}))


def bound_estimator(
    config: ml_collections.ConfigDict,
    mc_num: int,
    batch_size: int,
    use_cfg: bool = False,
    one_timestep: bool = False,
):
  """The traceable (not jitted, differentiable in params) estimator of config's objective that
  `compiled_scorer` compiles: estimate(params, tokens, valid, is_answer, keys [N], cfg_scale) ->
  `Bound` (estimate of log p(answer | prompt) [N] float32 nats, stderr [N], the router statistics
  of the passes) for rows packed by `pack_rows`.
  The same keys give the same masks for any params: two models scored with one key share their
  timesteps and masks (VRPO's antithetic sampling, arXiv 2505.19223). one_timestep: every sample
  of a mini-batch masks the same number of answer tokens (VRPO's naive n_t = 1; mdm and block)."""
  model_cfg = ModelConfig.from_config(config)
  mask_id, per_pass = config.tokens.mask_id, mc_batch_size(mc_num, batch_size)
  shifted = alignment.resolve(config) == "shifted"
  objective = objective_of(config)
  if objective.blocks:
    return _block_estimator(
        model_cfg,
        mask_id,
        mc_num,
        per_pass,
        use_cfg,
        config.diffusion.block_size,
        shifted,
        one_timestep,
    )
  if objective.causal:
    return _arm_estimator(model_cfg, alignment.excluded_mask_id(config))
  return _mdm_estimator(model_cfg, mask_id, mc_num, per_pass, use_cfg, shifted, one_timestep)


def mc_batch_size(mc_num: int, batch_size: int) -> int:
  """Samples per forward pass: batch_size, or mc_num when fewer samples are asked for."""
  return min(batch_size, mc_num)


def check_mc(mc_num: int, batch_size: int, prefix: str = "") -> None:
  """mc_num must be a positive multiple of mc_batch_size(mc_num, batch_size); ConfigError else."""
  if batch_size < 1:
    raise ConfigError(
        f"{prefix}mc_batch_size={batch_size} is not allowed: expected a positive "
        "number of samples per forward pass"
    )
  if mc_num < 1 or mc_num % mc_batch_size(mc_num, batch_size):
    raise ConfigError(
        f"{prefix}mc_num={mc_num} is not allowed: expected a positive multiple of "
        f"mc_batch_size={batch_size} (or fewer samples than it)"
    )


def check_pairs(
    config: ml_collections.ConfigDict,
    prompts: Sequence[Sequence[int]],
    answers: Sequence[Sequence[int]],
    mc_num: int,
    batch_size: int,
    cfg_scale: float,
) -> None:
  """Raises ConfigError with one line for any pair or option that cannot be scored."""
  if len(prompts) != len(answers):
    raise ConfigError(f"got {len(prompts)} prompts but {len(answers)} answers: expected pairs")
  check_mc(mc_num, batch_size)
  if cfg_scale < 0:
    raise ConfigError(f"cfg_scale={cfg_scale} is not allowed: expected a number >= 0")
  vocab = config.model.vocab_size
  causal = objective_of(config).causal
  if causal and cfg_scale > 0:
    raise ConfigError(
        f"cfg_scale={cfg_scale} is not allowed for an autoregressive model: expected 0 (its "
        "likelihood is exact and unguided)"
    )
  for p, a in zip(prompts, answers):
    if len(a) == 0:
      raise ConfigError("an answer is empty: expected at least one token to score")
    if causal and len(p) == 0:
      raise ConfigError(
          "an empty prompt is not allowed for an autoregressive model: expected at least one "
          "token before the answer (e.g. BOS or EOS) to predict its first token from"
      )
    if causal and config.tokens.mask_id in a and alignment.excluded_mask_id(config) is not None:
      raise ConfigError(
          f"answer token id {config.tokens.mask_id} (tokens.mask_id) is not allowed for an "
          "autoregressive model: it never predicts the mask token"
      )
    ids = np.asarray(list(p) + list(a))
    if ids.min() < 0 or ids.max() >= vocab:
      raise ConfigError(
          f"token id {int(ids.max() if ids.max() >= vocab else ids.min())} is not "
          f"allowed: expected ids in [0, model.vocab_size={vocab})"
      )
    if len(ids) > config.model.max_sequence_length:
      raise ConfigError(
          f"prompt + answer length {len(ids)} is not allowed: expected at most "
          f"model.max_sequence_length={config.model.max_sequence_length}"
      )


def pack_rows(prompts, answers, width=None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Right-pads prompt ++ answer rows; returns (tokens, valid, is_answer), each [N, T]."""
  width = max([len(p) + len(a) for p, a in zip(prompts, answers)] + [width or 0])
  tokens = np.zeros((len(prompts), width), np.int32)
  valid = np.zeros((len(prompts), width), bool)
  is_answer = np.zeros((len(prompts), width), bool)
  for row, (p, a) in enumerate(zip(prompts, answers)):
    tokens[row, : len(p) + len(a)] = list(p) + list(a)
    valid[row, : len(p) + len(a)] = True
    is_answer[row, len(p) : len(p) + len(a)] = True
  return tokens, valid, is_answer


@functools.lru_cache(maxsize=16)
def _mdm_estimator(
    model_cfg: ModelConfig,
    mask_id: int,
    mc_num: int,
    batch_size: int,
    use_cfg: bool,
    shifted: bool,
    one_timestep: bool,
):
  """LLaDA's estimator (built once per model and Monte-Carlo shape): estimate(params, tokens,
  valid, is_answer, keys, cfg_scale) -> (estimate [N], stderr [N]); shifted: each token read from
  its predecessor's logits (`alignment.shift`)."""
  model = network(model_cfg)
  num_batches = mc_num // batch_size

  def sample_masks(is_answer, key):
    """One stratified mini-batch of maskings of one pair: (masked [batch_size, T] bool, number of
    masked answer tokens [batch_size]). The draws are indexed by the position inside the answer,
    so they depend on the key and the answer's length only, not on the row's padded width T or
    the prompt's length."""
    answer_len = jnp.sum(is_answer)
    len_key, perm_key = jax.random.split(key)
    num_masked = stratified_lengths(len_key, answer_len, batch_size, one_timestep)
    uniform = jax.random.uniform(perm_key, (batch_size, model_cfg.max_sequence_length))
    in_answer = jnp.maximum(jnp.cumsum(is_answer) - 1, 0)
    order = jnp.where(is_answer, uniform[:, in_answer], jnp.inf)
    rank = jnp.argsort(jnp.argsort(order, axis=-1), axis=-1)
    return is_answer & (rank < num_masked[:, None]), num_masked

  def batch_losses(params, tokens, valid, is_answer, keys, cfg_scale):
    """(weighted masked CE of one mini-batch index for every pair [N, batch_size], the router
    statistics of its pass). The model sees the N x batch_size rows as one pair-major batch, so a
    split of the pairs over devices carries over to its rows unchanged."""
    masked, num_masked = jax.vmap(sample_masks)(is_answer, keys)  # [N, b, T], [N, b]
    width = tokens.shape[1]

    def rows(x):
      return jnp.broadcast_to(x[:, None], masked.shape).reshape(-1, width)

    noisy = jnp.where(masked, mask_id, tokens[:, None]).reshape(-1, width)
    prompt_free = None
    if use_cfg:
      prompt_free = jnp.where(rows(valid & ~is_answer), mask_id, noisy)
    logits, router = apply_model(
        model, params, noisy, rows(valid), prompt_free, cfg_scale, return_aux=True
    )
    if shifted:
      logits = alignment.shift(logits, positions_from_mask(rows(valid)))
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, rows(tokens))
    masked_ce = jnp.sum(jnp.where(masked, ce.reshape(masked.shape), 0.0), axis=-1)
    return masked_ce * jnp.sum(is_answer, axis=-1)[:, None] / num_masked, router

  return _monte_carlo(batch_losses, num_batches, batch_size)


def _monte_carlo(batch_losses, num_batches: int, batch_size: int):
  """The estimate over mini-batches: score(params, tokens, valid, is_answer, keys [N], cfg_scale)
  -> `Bound`, batch_losses giving (the weighted losses [N, batch_size], the router statistics) of
  one mini-batch index from one key per pair; the router statistics are the passes' mean."""

  def score(params, tokens, valid, is_answer, keys, cfg_scale):
    # The key of mini-batch j of a pair is fold_in(pair key, j): the same for any mc_num.
    keys = jax.vmap(lambda key: item_keys(key, num_batches))(keys)  # [N, batches]
    losses, router = jax.lax.map(  # [batches, N, batch_size]: a forward pass per mini-batch index
        lambda batch_keys: batch_losses(params, tokens, valid, is_answer, batch_keys, cfg_scale),
        jnp.swapaxes(keys, 0, 1),
    )
    losses = jnp.swapaxes(losses, 0, 1)
    batch_means = losses.mean(axis=-1)
    estimate = -batch_means.mean(axis=-1)
    if num_batches > 1:
      stderr = batch_means.std(axis=-1, ddof=1) / jnp.sqrt(num_batches)
    elif batch_size > 1:
      stderr = losses[:, 0].std(axis=-1, ddof=1) / jnp.sqrt(batch_size)
    else:
      stderr = jnp.full(estimate.shape, jnp.nan)
    return Bound(estimate, stderr, jax.tree.map(lambda a: a.mean(axis=0), router))

  return score


@functools.lru_cache(maxsize=16)
def _block_estimator(
    model_cfg: ModelConfig,
    mask_id: int,
    mc_num: int,
    batch_size: int,
    use_cfg: bool,
    block_size: int,
    shifted: bool,
    one_timestep: bool,
):
  """The NELBO estimator of a block diffusion model (see the module docstring), for rows
  packed by `pack_rows`: every row starts at index 0, so the blocks (`BlockCausal` from index 0) are
  aligned at its first token as in training; shifted: the shifted logit alignment
  (`two_stream_hidden`)."""
  num_batches = mc_num // batch_size

  def sample_masks(is_answer, key):
    """(masked [batch_size, T] bool, weight [batch_size, T] = n_b / l_b of each position's
    block): l_b of the n_b answer tokens of block b masked (the first block may end the prompt,
    whose tokens are never masked), l_b stratified over the mini-batch (its key folded with b),
    the tokens chosen by uniforms indexed by answer position."""
    width = is_answer.shape[0]
    in_answer = jnp.maximum(jnp.cumsum(is_answer) - 1, 0)
    block = jnp.arange(width) // block_size
    num_blocks = -(-width // block_size)
    sizes = jax.ops.segment_sum(is_answer.astype(jnp.int32), block, num_blocks)  # n_b
    before = jnp.cumsum(sizes) - sizes  # answer tokens in earlier blocks
    len_key, perm_key = jax.random.split(key)
    masked_counts = jax.vmap(  # [blocks, batch_size]
        lambda b, n: stratified_lengths(
            jax.random.fold_in(len_key, b), jnp.maximum(n, 1), batch_size, one_timestep
        )
    )(jnp.arange(num_blocks), sizes)
    uniform = jax.random.uniform(perm_key, (batch_size, model_cfg.max_sequence_length))
    order = jnp.where(is_answer, block + uniform[:, in_answer], jnp.inf)
    rank_in_block = jnp.argsort(jnp.argsort(order, axis=-1), axis=-1) - before[block]
    counts = masked_counts[block].T  # [batch_size, T]
    weight = sizes[block][None, :] / counts
    return is_answer & (rank_in_block < counts), weight

  def batch_losses(params, tokens, valid, is_answer, keys, cfg_scale):
    masked, weight = jax.vmap(sample_masks)(is_answer, keys)  # [N, b, T] each
    width = tokens.shape[1]

    def rows(x):
      return jnp.broadcast_to(x[:, None], masked.shape).reshape(-1, width)

    noisy = jnp.where(masked, mask_id, tokens[:, None]).reshape(-1, width)
    clean, row_valid = rows(tokens), rows(valid)
    positions = positions_from_mask(row_valid)

    def logits_of(noisy, clean):
      hidden, router = two_stream_hidden(
          model_cfg,
          params,
          noisy,
          clean,
          row_valid,
          positions,
          None,
          block_size=block_size,
          shifted=shifted,
          return_aux=True,
      )
      return head_logits(params, hidden, jnp.dtype(model_cfg.dtype)), router

    logits, router = logits_of(noisy, clean)
    if use_cfg:  # the unconditional rows: the prompt masked in both streams
      prompt = rows(valid & ~is_answer)
      free, free_router = logits_of(
          jnp.where(prompt, mask_id, noisy), jnp.where(prompt, mask_id, clean)
      )
      logits = free + (cfg_scale + 1.0) * (logits - free)
      router = jax.tree.map(lambda a, b: (a + b) / 2, router, free_router)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, clean).reshape(masked.shape)
    return jnp.sum(jnp.where(masked, ce * weight, 0.0), axis=-1), router

  score = _monte_carlo(batch_losses, num_batches, batch_size)
  if block_size > 1:
    return score

  def exact(*args):  # B = 1: every sample is the same chain rule, its standard error 0
    bound = score(*args)
    return bound._replace(stderr=jnp.zeros_like(bound.estimate))

  return exact


@functools.lru_cache(maxsize=16)
def _arm_estimator(model_cfg: ModelConfig, excluded: int | None):
  """The exact log-likelihood of an autoregressive model: score(params, tokens, valid,
  is_answer, keys, cfg_scale) -> `Bound` (sum over answer tokens of log p(x_i | x_<i) [N],
  stderr 0), the mask row `excluded` outside the softmax (`alignment.next_token_logits`)."""
  model = network(model_cfg)

  def score(params, tokens, valid, is_answer, keys, cfg_scale):
    del keys, cfg_scale
    logits, router = apply_model(model, params, tokens, valid, return_aux=True)
    logits = next_token_logits(logits[:, :-1], excluded)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:])
    total = -jnp.sum(jnp.where(is_answer[:, 1:], ce, 0.0), axis=-1)
    return Bound(total, jnp.zeros_like(total), router)

  return score
