"""lm-evaluation-harness adapter: `--model llada_jax` scores and samples LLaDA checkpoints.

lm_eval (checked with 0.4.13) finds models only in its own registry, filled by its own model list
and by `register_model` at import time; it reads no plugin entry points. Importing this module
registers `llada_jax`, so run the harness through this module or its console script
`llada-lm-eval` (either takes every `lm_eval` argument; needs `pip install llada_jax[lm_eval]`):

  llada-lm-eval --model llada_jax --tasks arc_easy \\
      --model_args checkpoint=runs/demo,mc_num=128,batch_size=16

or, from Python, import this module and call
`lm_eval.simple_evaluate(model="llada_jax", model_args="checkpoint=runs/demo", tasks=[...])`.

Requests of a kind are answered together (scoring and sampling batch and shard internally). With
several hosts, run the same command on every host: each sees all requests, the work is split over
all hosts and every host gets every result. lm_eval is imported by this module only.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import zlib
from typing import Any, Sequence

import numpy as np
import tqdm
from lm_eval import utils
from lm_eval.api import registry
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM

from llada_jax.errors import ConfigError
from llada_jax.evaluation.generation import generate_answers
from llada_jax.evaluation.model import load_eval_model
from llada_jax.evaluation.multiple_choice import fit_pair
from llada_jax.evaluation.scoring import loglikelihoods
from llada_jax.sampling.ending import cut_text, end_ids
from llada_jax.config import check_sampling_fields, objective_of
from llada_jax.sampling.options import SamplerOptions

MODEL_NAME = "llada_jax"
ROLLING_UNSUPPORTED = (
    "loglikelihood_rolling is not available for a LLaDA (objective mdm) model: it has no "
    "left-to-right likelihood; use `llada-evaluate --tasks=elbo` for its bound, or an arm or "
    "block model"
)
# gen_kwargs the sampler understands; others (num_beams, ...) are ignored.
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k", "top_p")

log = logging.getLogger(__name__)


def request_id(request: Instance) -> int:
  """A 32-bit id that seeds a request's random draws: its task, document and choice index
  (lm_eval's Instance fields; its arguments when those are missing), so that a request scores the
  same whatever other requests, --limit or batch size share its run."""
  if request.doc_id is None:
    text = repr(request.args)
  else:
    text = f"{request.task_name}/{request.doc_id}/{request.idx}"
  return zlib.crc32(text.encode("utf-8"))


# lm-eval's optional chat-template methods (apply_chat_template, tokenizer_name) keep their base
# versions, which raise lm-eval's own "please implement" error for --apply_chat_template.
class LLaDAJaxLM(LM):  # pylint: disable=abstract-method
  """A training workdir or HF LLaDA folder as an lm_eval model (`--model llada_jax`).

  model_args: checkpoint (required), tokenizer (a tokenizer.json, for checkpoints without one),
  mc_num and batch_size (Monte-Carlo samples per continuation and per forward pass; batch_size
  is also the number of prompts per generation batch), cfg_scale (of scoring and generation,
  default 0), seed, check_greedy, and any other sampler option (`SamplerOptions`: steps,
  gen_length, block_length, temperature, remasking, logits_eos_inf, parallel_threshold, cache, ...;
  defaults: the checkpoint's config.sampling).

  Precedence for generation: model_args given explicitly win over a task's gen_kwargs; gen_kwargs
  fill what they leave unset; config.sampling fills the rest. A task's max_gen_toks sets
  gen_length unless model_args give one: it is rounded up to a multiple of block_length (a block
  longer than it becomes one block; an ARM takes it as it is) and the answer is cut back to
  max_gen_toks tokens, and steps keeps the steps-per-token ratio of the
  (steps, gen_length) of model_args or config.sampling, rounded up to whole steps per block and
  at most one step per token. do_sample=False means temperature 0; top_k and top_p truncate the
  proposals. Other gen_kwargs are ignored.
  """

  def __init__(
      self,
      checkpoint: str,
      tokenizer: str | None = None,
      mc_num: int = 128,
      batch_size: int = 16,
      cfg_scale: float = 0.0,
      seed: int = 0,
      check_greedy: bool = True,
      **sampler: Any,
  ) -> None:
    super().__init__()
    self.mc_num, self.batch_size = int(mc_num), int(batch_size)
    if self.batch_size < 1 or self.mc_num < 1 or self.mc_num % self.batch_size:
      raise ConfigError(
          f"mc_num={mc_num} is not allowed: expected a positive multiple of "
          f"batch_size={batch_size}"
      )
    self.cfg_scale, self.seed = float(cfg_scale), int(seed)
    self.check_greedy = _flag("check_greedy", check_greedy)
    defaults = SamplerOptions()
    self.sampler = {
        k: _flag(k, v) if isinstance(getattr(defaults, k, None), bool) else v
        for k, v in sampler.items()
    }  # the model_args' sampler options
    check_sampling_fields(self.sampler)  # before the model loads
    self.model = load_eval_model(str(checkpoint), None if tokenizer is None else str(tokenizer))
    self._warned: set[str] = set()

  @classmethod
  def create_from_arg_string(
      cls, arg_string: str, additional_config: dict | None = None
  ) -> LLaDAJaxLM:
    """From `key=value,...` model_args; see create_from_arg_obj for lm_eval's own options."""
    return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

  @classmethod
  def create_from_arg_obj(
      cls, arg_dict: dict[str, Any], additional_config: dict | None = None
  ) -> LLaDAJaxLM:
    """From a model_args dict. lm_eval's integer --batch_size applies when model_args set none
    (the CLI passes 1 by default); its device and max_batch_size are ignored (all local devices)."""
    args = dict(arg_dict)
    batch_size = (additional_config or {}).get("batch_size")
    if "batch_size" not in args and batch_size is not None and str(batch_size).isdigit():
      args["batch_size"] = int(batch_size)
    return cls(**args)

  def get_model_info(self) -> dict[str, Any]:
    """Recorded in lm_eval's results["config"]."""
    return {"checkpoint": self.model.path, "checkpoint_step": self.model.step}

  def loglikelihood(
      self, requests: list[Instance], disable_tqdm: bool = False
  ) -> list[tuple[float, bool]]:
    """(log p(continuation | context) estimate in nats, is_greedy) per (context, continuation).

    The estimate is the model's likelihood (`loglikelihoods`: LLaDA's Monte-Carlo bound with
    mc_num samples, one-token continuations exactly with one sample; an ARM's exact chain rule; a
    block model's NELBO). For one-token continuations is_greedy says whether greedy decoding
    (`_greedy_tokens`, one decode per distinct context) puts the continuation first; an EOS or
    EoT continuation counts when either comes first (the sampler reports only the stop). Longer
    continuations get False: checking them would take a greedy decode per request.
    check_greedy=False gives False always and saves those passes.
    An empty continuation gives (0.0, True). Contexts too long lose their oldest tokens.
    """
    pairs = [self._encode_pair(*request.args) for request in requests]
    scores = np.zeros(len(pairs))
    single = [i for i, (_, answer) in enumerate(pairs) if len(answer) == 1]
    longer = [i for i, (_, answer) in enumerate(pairs) if len(answer) > 1]
    contexts = list(dict.fromkeys(tuple(pairs[i][0]) for i in single)) if self.check_greedy else []
    with tqdm.tqdm(
        total=len(single) + len(longer) + len(contexts),
        disable=disable_tqdm,
        desc="llada_jax loglikelihood",
    ) as bar:
      for index, mc_num, batch_size in ((single, 1, 1), (longer, self.mc_num, self.batch_size)):
        if index:
          scores[index] = loglikelihoods(
              self.model,
              [pairs[i][0] for i in index],
              [pairs[i][1] for i in index],
              mc_num=mc_num,
              batch_size=batch_size,
              cfg_scale=self.cfg_scale,
              seed=self.seed,
              progress=bar.update,
              item_ids=[request_id(requests[i]) for i in index],
          ).log_likelihood
      greedy = dict(zip(contexts, self._greedy_tokens(contexts, bar.update))) if contexts else {}
    stops = set(end_ids(self.model.config.tokens))
    results = []
    for request, (context, answer), score in zip(requests, pairs, scores):
      if not answer:
        result = (0.0, True)
      elif len(answer) == 1 and self.check_greedy:
        filled = greedy[tuple(context)]
        result = (float(score), filled == answer or (not filled and answer[0] in stops))
      else:
        result = (float(score), False)
      self.cache_hook.add_partial("loglikelihood", request.args, result)
      results.append(result)
    return results

  def loglikelihood_rolling(
      self, requests: list[Instance], disable_tqdm: bool = False
  ) -> list[float]:
    """log p(text) (nats) of each request's whole text: lm-eval's rolling windows of at most
    model.max_sequence_length - 1 predicted tokens, the first after a prefix token (BOS, else
    EOS), each window's new tokens scored given the tokens before them and the scores summed.
    Exact for an autoregressive model; a lower bound (the block NELBO, Monte-Carlo) for a block
    diffusion model. Raises NotImplementedError for a LLaDA model, which has no left-to-right
    likelihood."""
    config = self.model.config
    objective = objective_of(config)
    if not (objective.causal or objective.blocks):  # no left-to-right factorisation
      raise NotImplementedError(ROLLING_UNSUPPORTED)
    prefix = self._prefix_token()
    windows, owners, ids = [], [], []
    for number, request in enumerate(requests):
      tokens = self.model.codec.encode(request.args[0])
      # Windows of at most max_sequence_length - 1 predicted tokens: context + continuation (the
      # scorer's input, the last token included) then fits the model.
      rolling = utils.get_rolling_token_windows(
          tokens, prefix, config.model.max_sequence_length - 1, 1
      )
      for j, window in enumerate(map(utils.make_disjoint_window, rolling)):
        windows.append(window)
        owners.append(number)
        ids.append((request_id(request) * 1_000_003 + j) % 2**31)
    with tqdm.tqdm(total=len(windows), disable=disable_tqdm, desc="llada_jax rolling") as bar:
      scores = (
          []
          if not windows
          else loglikelihoods(
              self.model,
              [w[0] for w in windows],
              [w[1] for w in windows],
              mc_num=self.mc_num,
              batch_size=self.batch_size,
              seed=self.seed,
              progress=bar.update,
              item_ids=ids,
          ).log_likelihood
      )
    totals = np.zeros(len(requests))  # an empty text has log-likelihood 0
    np.add.at(totals, np.asarray(owners, int), scores)
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", request.args, float(total))
    return [float(t) for t in totals]

  def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
    """Sampled text per (context, gen_kwargs), cut at the first `until` string (and EOS/EoT).

    Requests with the same sampler options are generated together; contexts too long for the
    model and gen_length lose their oldest tokens.
    """
    groups: dict[SamplerOptions, list[int]] = {}
    for number, request in enumerate(requests):
      groups.setdefault(self.sampler_options(request.args[1]), []).append(number)
    texts = [""] * len(requests)
    limit = self.model.config.model.max_sequence_length
    with tqdm.tqdm(
        total=len(requests), disable=disable_tqdm, desc="llada_jax generate_until"
    ) as bar:
      for options, numbers in groups.items():
        keep = limit - options.gen_length
        prompts = [self.model.codec.encode(requests[i].args[0])[-keep:] for i in numbers]
        answers = generate_answers(
            self.model,
            prompts,
            seed=self.seed,
            batch_size=self.batch_size,
            progress=bar.update,
            item_ids=[request_id(requests[i]) for i in numbers],
            **dataclasses.asdict(options),
        )
        for i, answer in zip(numbers, answers):
          answer = answer[: self._token_limit(requests[i].args[1])]
          texts[i] = cut_text(self.model.codec.decode(answer), stop_strings(requests[i].args[1]))
          self.cache_hook.add_partial("generate_until", requests[i].args, texts[i])
    return texts

  def _token_limit(self, gen_kwargs: dict[str, Any] | None) -> int | None:
    """The most answer tokens a request takes: its max_gen_toks (gen_length may be rounded up to
    whole blocks), unless model_args set gen_length; None: no limit."""
    max_gen_toks = (gen_kwargs or {}).get("max_gen_toks")
    return None if max_gen_toks is None or "gen_length" in self.sampler else int(max_gen_toks)

  def _prefix_token(self) -> int:
    """The token before a text that has no context (lm-eval's convention): BOS, else EOS."""
    tokens = self.model.config.tokens
    return tokens.bos_id if tokens.bos_id >= 0 else tokens.eos_id

  def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Ids of context and continuation as lm_eval splits them (trailing spaces of the context go
    to the continuation; the continuation is the tail of the joint encoding), cut to the model's
    length as multiple-choice tasks are (`fit_pair`)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
      context, continuation = context[:-spaces], context[-spaces:] + continuation
    encode = self.model.codec.encode
    context_ids = list(encode(context))
    answer = list(encode(context + continuation))[len(context_ids) :]
    if not context_ids and objective_of(self.model.config).causal:
      context_ids = [self._prefix_token()]  # a causal model predicts its first token from it
    context_ids, answer, _ = fit_pair(
        context_ids, answer, self.model.config.model.max_sequence_length
    )
    return context_ids, answer

  def _greedy_tokens(self, contexts: Sequence[Sequence[int]], progress: Any) -> list[list[int]]:
    """The first token greedy decoding puts after each context ([] for EOS or EoT), whatever
    config.sampling and the sampler model_args say: one reverse step over one masked token (a
    LLaDA model), the argmax of the next-token logits (an ARM), or a block model's first block
    decoded greedily one token a step (it has no smaller unit to generate)."""
    config = self.model.config
    length = config.diffusion.block_size if objective_of(config).blocks else 1
    greedy = SamplerOptions(
        steps=length,
        gen_length=length,
        block_length=length,
        temperature=0.0,
        cfg_scale=self.cfg_scale,
        remasking="low_confidence",
    )
    answers = generate_answers(
        self.model,
        contexts,
        seed=self.seed,
        batch_size=self.batch_size,
        progress=progress,
        **dataclasses.asdict(greedy),
    )
    return [answer[:1] for answer in answers]

  def sampler_options(self, gen_kwargs: dict[str, Any] | None) -> SamplerOptions:
    """The sampler options of a request's gen_kwargs (see the class docstring).

    Raises:
      ConfigError: max_gen_toks < 1, or options `SamplerOptions.validate` refuses.
    """
    gen_kwargs = dict(gen_kwargs or {})
    ignored = sorted(set(gen_kwargs) - set(GEN_KWARGS) - self._warned)
    if ignored:
      log.warning("llada_jax ignores gen_kwargs %s", ", ".join(ignored))
      self._warned.update(ignored)
    base = SamplerOptions.from_config(self.model.config).replace(
        cfg_scale=self.cfg_scale, **self.sampler
    )
    gen_length, block_length, steps = base.gen_length, base.block_length, base.steps
    max_gen_toks = gen_kwargs.get("max_gen_toks")
    if "gen_length" not in self.sampler and max_gen_toks is not None:
      gen_length = int(max_gen_toks)
      if gen_length < 1:
        raise ConfigError(f"max_gen_toks={max_gen_toks} is not allowed: expected a positive int")
      objective = objective_of(self.model.config)
      if objective.causal:  # one token a step: exactly max_gen_toks, no blocks to round to
        block_length = gen_length
      elif not objective.blocks:  # a block model's blocks are fixed
        block_length = min(block_length, gen_length)
      gen_length = -(-gen_length // block_length) * block_length
    if gen_length != base.gen_length:
      per_block = min(block_length, math.ceil(base.steps * block_length / base.gen_length))
      steps = gen_length // block_length * per_block
    temperature = base.temperature
    if "temperature" not in self.sampler:
      if gen_kwargs.get("do_sample") is False:
        temperature = 0.0
      elif gen_kwargs.get("temperature") is not None:
        temperature = float(gen_kwargs["temperature"])
    truncation = {
        name: cast(gen_kwargs[name])
        for name, cast in (("top_k", int), ("top_p", float))
        if name not in self.sampler and gen_kwargs.get(name) is not None
    }
    return base.replace(
        steps=steps,
        gen_length=gen_length,
        block_length=block_length,
        temperature=temperature,
        **truncation,
    ).validate(self.model.config)


def stop_strings(gen_kwargs: dict[str, Any] | None) -> list[str]:
  """The non-empty `until` strings of gen_kwargs (a string or a list)."""
  until = (gen_kwargs or {}).get("until") or []
  return [s for s in ([until] if isinstance(until, str) else until) if s]


def _flag(name: str, value: Any) -> bool:
  """A boolean model arg (lm_eval passes true/false as bools, quoted ones as strings)."""
  if isinstance(value, bool):
    return value
  if str(value).lower() in ("true", "1", "false", "0"):
    return str(value).lower() in ("true", "1")
  raise ConfigError(f"{name}={value!r} is not allowed: expected true or false")


def register() -> None:
  """Makes `llada_jax` name this adapter in lm_eval's model registry (idempotent)."""
  if MODEL_NAME not in registry.model_registry:
    registry.register_model(MODEL_NAME)(LLaDAJaxLM)


def main(argv: Sequence[str] | None = None) -> None:
  """Runs the lm_eval command line (argv: its arguments) with `llada_jax` registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=g-import-not-at-top

  sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
  cli_evaluate()


register()

if __name__ == "__main__":
  main()
