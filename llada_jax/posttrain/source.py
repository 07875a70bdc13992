"""What llada-train trains on with posttrain.method="dpo": preference batches, the DPO loss with
the frozen reference, and the held-out preference metrics.

Order: the pairs of posttrain.preferences are visited in a fresh permutation each epoch, drawn
from (seed, epoch); step s takes positions s * B ... s * B + B - 1 (B = data.batch_size pairs) of
that endless sequence, so a run resumed at step s sees exactly the batches it would have seen,
and each process packs only its own rows of the batch (`pipeline.process_rows`).
"""

from __future__ import annotations

import functools
import io
import pathlib
from typing import Any, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from llada_jax.config import objective_of
from llada_jax.data.codec import text_codec
from llada_jax.data.pipeline import global_batch, local_rows, process_rows
from llada_jax.data.registry import read_jsonl_lines
from llada_jax.diffusion.likelihood import bound_estimator
from llada_jax.errors import ConfigError
from llada_jax.keys import Stream, item_keys
from llada_jax import storage
from llada_jax.lm import MaskedDiffusionLM
from llada_jax.parallel.sharding import axis_rules, placement_context
from llada_jax.posttrain.dpo import (
    PreferenceBatch,
    dpo_loss,
    dpo_objective,
    pack_preferences,
    preference_metrics,
)
from llada_jax.posttrain.grpo import (
    Rollouts,
    answer_mask,
    group_advantages,
    grpo_objective,
    policy_log_probs,
)
from llada_jax.posttrain.preference import PreferencePair, prompt_ids, read_preferences
from llada_jax.posttrain.reference import reference_params
from llada_jax.posttrain.rewards import parse_rewards, reward
from llada_jax.sampling.ending import end_answer, end_ids
from llada_jax.sampling.text import left_pad

Metrics = dict[str, jax.Array]


def epoch_order(seed: int, epoch: int, num_pairs: int) -> np.ndarray:
  """The permutation of the pair indices visited in `epoch`: a function of (seed, epoch) only."""
  return np.random.default_rng([seed, epoch]).permutation(num_pairs)


def step_indices(seed: int, step: int, batch_size: int, num_pairs: int) -> np.ndarray:
  """The pair indices of the batch of `step` [batch_size] (`epoch_order`)."""
  positions = step * batch_size + np.arange(batch_size)
  epochs = positions // num_pairs
  orders = {int(e): epoch_order(seed, int(e), num_pairs) for e in np.unique(epochs)}
  return np.asarray([orders[int(e)][p % num_pairs] for e, p in zip(epochs, positions)])


class PreferenceSource:
  """Preference pairs for training (posttrain.preferences) and held-out evaluation
  (posttrain.preferences_eval, optional), read and checked when built.

  Raises:
    ConfigError: a preference file or line that is not allowed (`read_preferences`), or fewer
      training pairs than data.batch_size.
  """

  frozen = None  # the reference's parameters, once `place` has read them

  def __init__(self, config: ml_collections.ConfigDict, sharding: jax.sharding.Sharding):
    p = config.posttrain
    self.config, self.sharding = config, sharding
    self.pairs = read_preferences(p.preferences, config)
    self.held_out = (
        read_preferences(p.preferences_eval, config, "posttrain.preferences_eval")
        if p.preferences_eval
        else []
    )
    batch = config.data.batch_size
    if len(self.pairs) < batch:
      raise ConfigError(
          f"posttrain.preferences={p.preferences} holds {len(self.pairs)} pairs: expected at "
          f"least data.batch_size={batch}"
      )
    everything = self.pairs + self.held_out
    self.width = max(len(x.prompt) + max(len(x.chosen), len(x.rejected)) for x in everything)
    self.estimator = bound_estimator(config, p.mc_num, p.mc_num, one_timestep=p.one_timestep)
    self._objective = dpo_objective(config)

  def _batch(self, pairs: list[PreferencePair], indices: np.ndarray, step: int) -> PreferenceBatch:
    """The global batch of the pairs at `indices` of `pairs`, this process packing its rows."""
    rows = process_rows(self.sharding, len(indices))
    local = pack_preferences(
        [pairs[i] for i in indices[rows.start : rows.stop]],
        indices[rows.start : rows.stop],
        self.config.seed,
        step,
        self.width,
    )
    return PreferenceBatch(**global_batch(self.sharding, local._asdict(), len(indices)))

  def train_batches(self, start_step: int) -> Iterator[PreferenceBatch]:
    """Batches of steps start_step, start_step + 1, ... (see the module docstring)."""
    step = start_step
    while True:
      indices = step_indices(self.config.seed, step, self.config.data.batch_size, len(self.pairs))
      yield self._batch(self.pairs, indices, step)
      step += 1

  def place(self, param_shardings: Any) -> None:
    """Reads the reference's parameters, placed as the policy's."""
    self.frozen = reference_params(self.config, param_shardings)

  def prepare(self, item: PreferenceBatch, params: Any) -> PreferenceBatch:
    """The batch itself (it does not depend on the policy)."""
    del params
    return item

  def loss(
      self, params: Any, batch: PreferenceBatch, rng: jax.Array, block_size: int, frozen: Any
  ) -> tuple[jax.Array, Metrics]:
    """`dpo.dpo_objective`'s loss of the batch against the reference `frozen`."""
    return self._objective(params, batch, rng, block_size, frozen)

  @functools.cached_property
  def _held_out_batches(self) -> list[PreferenceBatch]:
    """The held-out pairs in batches of data.batch_size (the last one filled up by repeating
    pairs, which `evaluate` leaves out), at step 0's keys: the same masks at every evaluation."""
    batch, n = self.config.data.batch_size, len(self.held_out)
    return [
        self._batch(self.held_out, np.arange(start, start + batch) % n, 0)
        for start in range(0, n, batch)
    ]

  @functools.cached_property
  def _losses(self):
    p = self.config.posttrain

    def losses(params, ref, batch):
      value, terms = dpo_loss(
          self.estimator, params, ref, batch, p.beta, p.antithetic, reduction="none"
      )
      return value, terms._replace(router={})  # per pair only: the held-out bound's terms

    return jax.jit(losses)

  def evaluate(self, params: Any) -> dict[str, float]:
    """Held-out means over every pair of posttrain.preferences_eval: the DPO loss and
    `preference_metrics` ({} without held-out pairs)."""
    if not self.held_out:
      return {}
    # The pairs' values on every process (a batch's rows are spread over all of them).
    out = [
        multihost_utils.process_allgather(self._losses(params, self.frozen, b), tiled=True)
        for b in self._held_out_batches
    ]
    losses, terms = jax.tree.map(lambda *t: np.concatenate(t)[: len(self.held_out)], *out)
    scalars = preference_metrics(terms, self.config.posttrain.beta)
    return {"dpo/loss": float(losses.mean()), **{k: float(v) for k, v in scalars.items()}}


class PromptTask(NamedTuple):
  """One RL prompt: its ids and the reference answer the rewards compare with."""

  prompt: tuple[int, ...]
  reference: str


def read_prompts(
    path: str, config: ml_collections.ConfigDict, flag: str = "posttrain.prompts"
) -> list[PromptTask]:
  """The prompts of a JSONL file of {"prompt": text or chat messages, "answer": text} (`flag`
  names the setting that gave the path in errors).

  Raises:
    ConfigError: one line naming file:line: not a JSON object, no string "answer", a prompt that is
      neither text nor messages, or one longer than model.max_sequence_length less
      sampling.gen_length.
  """
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(
        f"{flag}={path} does not exist: expected a JSONL file of {{prompt, answer}} objects"
    )
  codec = text_codec(config)
  room = config.model.max_sequence_length - config.sampling.gen_length
  tasks = []
  for number, obj in read_jsonl_lines(file, ("answer",)):
    ids = prompt_ids(codec, obj.get("prompt"), f"{file}:{number}:")
    if not 0 < len(ids) <= room:
      raise ConfigError(
          f"{file}:{number}: a prompt of {len(ids)} tokens is not allowed: expected 1 to "
          f"model.max_sequence_length - sampling.gen_length = {room}"
      )
    tasks.append(PromptTask(tuple(ids), obj["answer"]))
  if not tasks:
    raise ConfigError(f"{path} holds no prompts: expected one JSON object per line")
  return tasks


def _update_keys(keys: np.ndarray, inner: int) -> np.ndarray:
  """The prompt-mask keys [rows, 2] of update `inner` of a rollout batch whose rows' keys are
  `keys` (posttrain.inner_updates > 1)."""
  return np.asarray(jax.vmap(lambda k: jax.random.fold_in(k, inner))(keys))


class RolloutSource:
  """diffu-GRPO (posttrain.method="grpo"): each step samples posttrain.group_size answers for
  each of data.batch_size / group_size prompts of posttrain.prompts with the policy (the compiled
  sampler, config.sampling), rewards them (posttrain.rewards) and trains on d1's loss against the
  frozen reference. The answers of row (prompt i, sample g) at step s are drawn with the key
  fold_in(fold_in(fold_in(fold_in(seed key, ROLLOUT), s), i), g), from the parameters of step s,
  so a run resumed at step s regenerates exactly what it lost.

  posttrain.inner_updates = mu > 1 (d1's mu): the rollouts of step s (a multiple of mu) serve
  steps s .. s + mu - 1, update j masking the prompts afresh (row key folded with j) and taking
  the ratio to the sampling policy's log-probabilities under the same masks, computed at step s
  for all mu masks. They are written to <workdir>/rollouts/ (each process its rows) before step s
  trains, so a run resumed inside the group reads them back: bitwise the uninterrupted run.
  With mu = 1 the sampling policy is the policy, the ratio is 1 and clipping stays inactive.
  Held-out: the mean reward of greedy answers to posttrain.prompts_eval.

  In a multi-process job the rollouts are sampled on the whole mesh, the rows split as the
  train step's batch: each process rewards the rows it holds (whole groups, so the advantages
  are its own) and the held-out rewards are gathered.

  Raises:
    ConfigError: a bad prompt file or reward spec, a batch that is not whole groups (on every
      process), or an autoregressive model.
  """

  frozen = None

  def __init__(
      self,
      config: ml_collections.ConfigDict,
      sharding: jax.sharding.Sharding,
      workdir: storage.PathLike | None = None,
  ):
    p = config.posttrain
    if objective_of(config).causal:  # the one-pass estimates mask the answer
      raise ConfigError(
          f"posttrain.method='grpo' is not allowed with diffusion.objective="
          f"{config.diffusion.objective!r}: expected a masked diffusion model (mdm: d1's "
          "one-pass estimate; block: the block-level one-pass)"
      )
    if config.data.batch_size % p.group_size:
      raise ConfigError(
          f"data.batch_size={config.data.batch_size} is not allowed with posttrain.method='grpo':"
          f" expected a multiple of posttrain.group_size={p.group_size} (answer rows per step)"
      )
    self.rows = process_rows(sharding, config.data.batch_size)
    if self.rows.start % p.group_size or len(self.rows) % p.group_size:
      raise ConfigError(
          f"posttrain.group_size={p.group_size} is not allowed with data.batch_size="
          f"{config.data.batch_size} over {jax.process_count()} processes: this process holds "
          f"rows {self.rows.start}..{self.rows.stop - 1}, which must be whole groups"
      )
    self.config, self.sharding = config, sharding
    self.inner = p.inner_updates
    self.saved = None if workdir is None else storage.path(workdir) / "rollouts"
    self._group: tuple[int, Rollouts] | None = None  # (first step, this process's rows)
    self.model = MaskedDiffusionLM(config)  # the rollouts' sampler
    self.spec = parse_rewards(p.rewards)
    self.prompts = read_prompts(p.prompts, config)
    self.held_out = (
        read_prompts(p.prompts_eval, config, "posttrain.prompts_eval") if p.prompts_eval else []
    )
    self.width = max(len(t.prompt) for t in self.prompts + self.held_out)
    self.codec = text_codec(config)
    self.num_prompts = config.data.batch_size // p.group_size
    if len(self.prompts) < self.num_prompts:
      raise ConfigError(
          f"posttrain.prompts={p.prompts} holds {len(self.prompts)} prompts: expected at least "
          f"data.batch_size / posttrain.group_size = {self.num_prompts}"
      )

  def place(self, param_shardings: Any) -> None:
    """Reads the reference's parameters, placed as the policy's."""
    self.frozen = reference_params(self.config, param_shardings)

  def train_batches(self, start_step: int) -> Iterator[tuple[int, np.ndarray]]:
    """(step, prompt indices [num_prompts] of its rollout batch) of steps start_step, ...:
    `prepare` samples them (or reuses them inside a group of posttrain.inner_updates steps)."""
    step = start_step
    while True:
      group = step // self.inner
      yield step, step_indices(self.config.seed, group, self.num_prompts, len(self.prompts))
      step += 1

  def _padded(self, tasks: list[PromptTask]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts [N, width] and their masks."""
    return left_pad([t.prompt for t in tasks], self.config.tokens.pad_id, self.width)

  def _placed(self, rows: Rollouts) -> Rollouts:
    """This process's rows as the global batch of data.batch_size rows (absent fields stay
    None)."""
    fields = {k: v for k, v in rows._asdict().items() if v is not None}
    return Rollouts(**global_batch(self.sharding, fields, self.config.data.batch_size))

  def _answers(
      self, params: Any, tokens: np.ndarray, valid: np.ndarray, keys: Any, **overrides: Any
  ) -> np.ndarray:
    """This process's sampled rows [rows, width + gen_length] (config.sampling, with
    `overrides`) of its left-padded prompts tokens, valid [rows, width]; keys [data.batch_size, 2],
    the same on every process. Sampled on the whole mesh, the rows split as the train batch."""
    n = self.config.data.batch_size
    placed = global_batch(self.sharding, {"tokens": tokens, "valid": valid}, n)
    out = self.model.generate(params, placed["tokens"], placed["valid"], rng=keys, **overrides)
    return local_rows(out, self.rows)

  def _rewards(self, rows: np.ndarray, tasks: list[PromptTask]) -> np.ndarray:
    """The reward of each row's answer, its text cut where every command cuts it."""
    tokens, decode = self.config.tokens, self.codec.decode
    return np.asarray(
        [
            reward(
                self.spec, end_answer(row[self.width :].tolist(), tokens, decode)[1], t.reference
            )
            for row, t in zip(rows, tasks)
        ],
        np.float32,
    )

  def prepare(self, item: tuple[int, np.ndarray], params: Any) -> Rollouts:
    """The batch of one step: the rollouts of its group of posttrain.inner_updates steps
    (sampled at the group's first step, else kept or read back), with this update's prompt-mask
    keys (the rows' keys folded with its index in the group) and, with inner_updates > 1, the
    sampling policy's log-probabilities under them."""
    step, indices = item
    first, inner = step - step % self.inner, step % self.inner
    if self._group is None or self._group[0] != first:
      if inner == 0:
        self._group = (first, self._sample(first, indices, params))
        if self.inner > 1:
          self._save(first, self._group[1])
      else:
        self._group = (first, self._load(first, step))
    rows = self._group[1]
    if self.inner > 1:
      rows = rows._replace(
          mask_keys=_update_keys(rows.mask_keys, inner), old_logp=rows.old_logp[inner]
      )
    return self._placed(rows)

  def _sample(self, step: int, indices: np.ndarray, params: Any) -> Rollouts:
    """This process's rows of the rollouts of `step`: samples, rewards, group advantages, the
    rows' prompt-mask keys and, with inner_updates > 1, old_logp [inner_updates, rows, T]."""
    g = self.config.posttrain.group_size
    tasks = [self.prompts[i] for i in indices for _ in range(g)]
    root = jax.random.fold_in(
        jax.random.fold_in(jax.random.PRNGKey(self.config.seed), Stream.ROLLOUT), step
    )
    prompt_keys = item_keys(root, indices)
    keys = np.asarray(jax.vmap(lambda k: item_keys(k, g))(prompt_keys).reshape(-1, 2))
    mine = [tasks[i] for i in self.rows]  # this process's rows: whole groups
    tokens, valid = self._padded(mine)
    rows = self._answers(params, tokens, valid, keys)
    rewards = self._rewards(rows, mine)
    advantages = np.asarray(group_advantages(jnp.asarray(rewards.reshape(-1, g)))).reshape(-1)
    full_valid = np.concatenate([valid, np.ones((len(mine), rows.shape[1] - self.width), bool)], 1)
    is_answer = np.asarray(
        answer_mask(jnp.asarray(rows), self.width, jnp.asarray(end_ids(self.config.tokens)))
    )
    mask_keys = np.asarray(
        jax.vmap(lambda k: jax.random.fold_in(k, 1 << 20))(keys[self.rows.start : self.rows.stop])
    )
    local = Rollouts(rows, full_valid, is_answer, advantages, mask_keys, rewards)
    if self.inner == 1:
      return local
    return local._replace(old_logp=self._old_log_probs(params, local))

  def _old_log_probs(self, params: Any, local: Rollouts) -> np.ndarray:
    """The sampling policy's log-probabilities of this process's rows under each update's prompt
    masks, [inner_updates, rows, T] float32 (`grpo.policy_log_probs`, on the whole mesh)."""
    batch, n = self._placed(local), self.config.data.batch_size
    out = []
    for inner in range(self.inner):
      keys = {"mask_keys": _update_keys(local.mask_keys, inner)}
      batch = batch._replace(**global_batch(self.sharding, keys, n))
      with placement_context(self.sharding, axis_rules(self.config)):
        out.append(local_rows(self._policy_log_probs(params, batch), self.rows))
    return np.stack(out)

  @functools.cached_property
  def _policy_log_probs(self) -> Any:
    logp = policy_log_probs(self.config, self.width)
    return jax.jit(lambda params, batch: logp(params, batch)[0])

  def _file(self, first: int) -> Any:
    return self.saved / f"group_{first:010d}.process_{jax.process_index()}.npz"

  def _save(self, first: int, rows: Rollouts) -> None:
    """Writes this process's rows of the group starting at `first`, then removes older groups."""
    if self.saved is None:
      raise ValueError("posttrain.inner_updates > 1 keeps its rollouts in a workdir: give one")
    self.saved.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(buffer, **rows._asdict())
    self._file(first).write_bytes(buffer.getvalue())
    for old in self.saved.glob(f"group_*.process_{jax.process_index()}.npz"):
      if old.name != self._file(first).name:
        old.unlink()

  def _load(self, first: int, step: int) -> Rollouts:
    """This process's rows of the group starting at `first`, as `_save` wrote them."""
    file = self._file(first)
    if not file.exists():
      raise ConfigError(
          f"{file} does not exist: resuming at step {step} needs the rollouts of steps "
          f"{first}..{first + self.inner - 1} (posttrain.inner_updates={self.inner}), written "
          f"when step {first} sampled them; resume from a checkpoint at a multiple of "
          f"{self.inner}"
      )
    with np.load(io.BytesIO(file.read_bytes())) as stored:
      rows = Rollouts(**{name: stored[name] for name in Rollouts._fields})
    if len(rows.tokens) != len(self.rows):
      raise ConfigError(
          f"{file} holds {len(rows.tokens)} rollout rows: expected this process's "
          f"{len(self.rows)}; resume inside a group of posttrain.inner_updates={self.inner} "
          "steps with the process count that sampled it, or from a checkpoint at a multiple of "
          f"{self.inner}"
      )
    return rows

  def loss(
      self, params: Any, batch: Rollouts, rng: jax.Array, block_size: int, frozen: Any
  ) -> tuple[jax.Array, Metrics]:
    """d1's loss of the rollouts against the reference `frozen` (`grpo.grpo_objective`)."""
    return grpo_objective(self.config, self.width)(params, batch, rng, block_size, frozen)

  def evaluate(self, params: Any) -> dict[str, float]:
    """The mean reward of greedy answers to the held-out prompts ({} without them)."""
    if not self.held_out:
      return {}
    # Whole batches of data.batch_size rows, the last filled up by repeating prompts (left out of
    # the mean), so they split over the processes as the train step's batch.
    batch, n = self.config.data.batch_size, len(self.held_out)
    total = 0.0
    for start in range(0, n, batch):
      tasks = [self.held_out[i % n] for i in range(start, start + batch)]
      keys = np.asarray(
          item_keys(jax.random.PRNGKey(self.config.seed), np.arange(start, start + batch))
      )
      mine = [tasks[i] for i in self.rows]
      rows = self._answers(params, *self._padded(mine), keys, temperature=0.0)
      counted = np.arange(start, start + batch)[self.rows.start : self.rows.stop] < n
      total += float(np.sum(self._rewards(rows, mine) * counted))
    if jax.process_count() > 1:
      total = float(np.sum(multihost_utils.process_allgather(np.float64(total))))
    return {"grpo/reward": total / n}
