"""The one config schema of llada_jax: defaults, validation and (de)serialisation.

Every config file in `configs/` starts from `default_config()` and changes values; `validate` is
called once, before anything is built, and raises `ConfigError` with a one-line message naming the
field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Mapping, Sequence

import ml_collections
import numpy as np

from llada_jax.errors import ConfigError

# Number of real token ids (ids a tokenizer can emit) for each vocabulary. The mask id and any
# padding of the embedding table must lie at or above this number. None: the vocabulary is the
# tokenizer.json named by data.tokenizer, whose special ids are checked when it is loaded:
# "llada_hf" the official LLaDA tokenizer (special tokens found by their text), "hf" any other
# model's, such as a converted Llama's (special ids from tokens.*; data/hf_tokenizer.py).
VOCABULARY_SIZES = {"byte": 259, "spm8k": 8000, "llada_hf": None, "hf": None}
# The vocabularies read from data.tokenizer (kept in the workdir as tokenizer.json).
TOKENIZER_VOCABULARIES = tuple(name for name, size in VOCABULARY_SIZES.items() if size is None)

DTYPES = ("float32", "bfloat16", "float16")
# The one list of each enumeration: the implementing modules key their tables by these names
# (model/attention.py KERNELS, model/transformer.py REMAT_POLICIES; tests/test_config.py checks it).
ATTENTION_KERNELS = ("xla", "jax_nn", "cudnn", "splash")
ATTENTION_IMPLEMENTATIONS = (
    "auto",
) + ATTENTION_KERNELS  # "auto": attention.resolve picks a kernel
REMAT_POLICIES = ("none", "minimal", "save_dots", "full")
ROUTERS = ("sigmoid_grouped", "softmax")  # model/routers.py ROUTERS
MOE_IMPLEMENTATIONS = ("ragged", "dense")  # model/moe.py IMPLEMENTATIONS
REMASKING = ("low_confidence", "random", "margin", "entropy")
CACHE_MODES = ("none", "prefix", "dual")


@dataclasses.dataclass(frozen=True)
class Objective:
  """What llada_jax needs to know of a training objective, beside its loss and forward process
  (`llada_jax.diffusion.objectives.LOSSES`, keyed by the same names).

  Attributes:
    causal: the network is causal and predicts the next token (model.causal must equal it): no
      mask token in its normaliser, no denoising steps or guidance when sampling, its
      likelihood is the exact chain rule.
    blocks: trained, sampled and scored in blocks of diffusion.block_size (block_size_schedule
      and the clipped mask ratio t_min, t_max apply); its training and scoring input is two streams.
    pipeline_masking: the forward process may run in the input pipeline (data.masking).
    measure: what its held-out loss is ("bound": a bound on the NLL; "NLL": exact).
    short_name, label, colour: its name in tables, its legend and line colour in plots.
  """

  causal: bool
  blocks: bool
  pipeline_masking: bool
  measure: str
  short_name: str
  label: str
  colour: str

  @property
  def streams(self) -> int:
    """Copies of each sequence one training or scoring forward pass runs ([x_t ; x_0] for
    blocks)."""
    return 2 if self.blocks else 1


# diffusion.objective -> its traits. "mdm": LLaDA; "arm": the autoregressive baseline; "block":
# block diffusion (BD3-LM). A new objective is an entry here and its loss in
# llada_jax.diffusion.objectives.LOSSES.
OBJECTIVES = {
    "mdm": Objective(
        causal=False,
        blocks=False,
        pipeline_masking=True,
        measure="bound",
        short_name="MDM",
        label="MDM (LLaDA) bound",
        colour="tab:blue",
    ),
    "arm": Objective(
        causal=True,
        blocks=False,
        pipeline_masking=False,
        measure="NLL",
        short_name="ARM",
        label="ARM NLL",
        colour="tab:red",
    ),
    "block": Objective(
        causal=False,
        blocks=True,
        pipeline_masking=False,
        measure="bound",
        short_name="Block",
        label="Block diffusion bound",
        colour="tab:green",
    ),
}
# posttrain.method: "" trains the objective's bound on data.task; "dpo": ELBO-DPO (VRPO);
# "grpo": diffu-GRPO (d1) on rewarded answers the policy samples.
POSTTRAIN_METHODS = ("", "dpo", "grpo")
# Which position's logits predict token i of a diffusion model (llada_jax.diffusion.alignment).
LOGIT_ALIGNMENTS = ("auto", "same", "shifted")
TIME_SAMPLING = ("uniform", "stratified")
PACKING = ("chunk", "pack")
MASKING = ("pipeline", "device")
NONFINITE_POLICIES = ("skip", "rollback")

# The device mesh's axes (parallel/mesh.py): data and fsdp split the batch, fsdp also the weights;
# expert splits the batch and the MoE layers' experts (expert parallelism); tensor splits heads and
# hidden widths.
MESH_AXES = ("data", "fsdp", "expert", "tensor")
# The mesh axes a batch is split over (data parallelism in the wide sense).
BATCH_AXES = ("data", "fsdp", "expert")
# MaxText-style logical axis rules: logical name -> mesh axis (or axes, or None = replicated).
LOGICAL_AXES = (
    "batch",
    "activation_batch",
    "activation_length",
    "activation_embed",
    "embed",
    "vocab",
    "heads",
    "kv_heads",
    "kv",
    "mlp",
    "exp",
    "layers",
    "norm",
)
DEFAULT_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("activation_batch", BATCH_AXES),
    ("activation_length", None),
    ("activation_embed", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("kv", None),
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("layers", None),
    ("norm", None),
)


def default_config() -> ml_collections.ConfigDict:
  """Returns the full schema with its default values (the ~1M-parameter CPU model of the demo)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict(
      dict(
          vocab_size=260,  # rows of the embedding / columns of the head (>= mask_id + 1)
          d_model=128,
          n_layers=4,
          n_heads=4,
          n_kv_heads=4,  # < n_heads gives grouped-query attention
          mlp_hidden_size=384,  # SwiGLU hidden width
          max_sequence_length=128,
          rope_theta=10000.0,
          rms_norm_eps=1e-5,
          causal=False,  # True gives the autoregressive (ARM) baseline from the same code
          dtype="float32",  # compute dtype
          param_dtype="float32",
          init_std=0.088,  # ~1/sqrt(d_model); LLaDA-8B uses 0.02 (~1/sqrt(4096))
          scan_layers=True,  # one compiled block scanned over layers (fast compiles at depth)
          remat="none",
          attention="xla",
          qk_norm=False,  # RMSNorm over head_dim on queries and keys before RoPE (LLaDA 2.x, MoE)
          rotary_dim=0,  # RoPE on the first rotary_dim dims of each head (0: all; LLaDA 2.x: 64)
          # The output head is the embedding transposed, one matrix trained for both (iLLaDA,
          # tied Llamas); False: a head of its own, ff_out (LLaDA 1.x and 2.x).
          tie_embeddings=False,
          # Mixture-of-Experts feed-forward (model/moe.py); num_experts=0: a dense model.
          moe=ml_collections.ConfigDict(
              dict(
                  num_experts=0,
                  experts_per_token=2,  # k of the router's top-k
                  expert_hidden_size=64,  # SwiGLU width of each routed expert
                  num_shared_experts=0,  # shared SwiGLU of width expert_hidden_size * this
                  first_k_dense_replace=0,  # the first layers keep mlp_hidden_size's dense SwiGLU
                  router="sigmoid_grouped",  # model/routers.py: "sigmoid_grouped" | "softmax"
                  n_group=1,  # group-limited routing: experts in n_group groups, keep topk_group
                  topk_group=1,
                  routed_scaling_factor=1.0,  # multiplies the routed experts' weights
                  norm_topk_prob=True,  # divide the k chosen weights by their sum
                  implementation="ragged",  # grouped matmuls; "dense": every expert (tests)
                  # expert parallelism: rows each shard sends each expert shard per exchange
                  # round, in units of a balanced load's share (t * k / ep); a busier pair takes
                  # more rounds, never drops a token. Memory and bytes per round are this x t * k.
                  exchange_capacity=2.0,
                  aux_loss_coef=0.0,  # load-balancing loss weight (LLaDA-MoE: 0.01)
                  z_loss_coef=0.0,  # router z-loss weight
                  # loss-free balancing (LLaDA 2.x, DeepSeek-V3): after each step expert_bias +=
                  # rate * sign(mean load - load); 0 keeps the bias fixed
                  bias_update_rate=0.0,
              )
          ),
      )
  )

  c.tokens = ml_collections.ConfigDict(
      dict(
          mask_id=259,  # reserved id above the real tokens of the vocabulary
          pad_id=0,
          eos_id=1,
          bos_id=-1,  # -1: the vocabulary has no such token
          eot_id=-1,  # end of turn (chat models)
      )
  )

  c.diffusion = ml_collections.ConfigDict(
      dict(
          objective="mdm",  # "mdm": LLaDA; "arm": next-token baseline; "block": BD3-LM
          eps=1e-3,  # p_mask = (1 - eps) * t + eps
          block_size=16,  # tokens per block of objective "block" (1: AR, sequence_length: MDM)
          # objective "block": "" or "STEP:SIZE,...", block size from each STEP on (LLaDA 2.0's
          # warm-up from small to large blocks, an MDM phase at L = data.sequence_length and the
          # decay, ending at block_size), e.g. "0:1,1000:4,2000:32,3000:L,8000:32"
          block_size_schedule="",
          t_min=0.0,  # t ~ U(t_min, t_max) in training: BD3-LM's clipped schedule (0, 1: exact)
          t_max=1.0,
          time_sampling="uniform",  # "stratified": t_i = (u + i/B) mod 1, lower variance
          random_length_prob=0.01,  # fraction of batches cut to a random length in [1, L]
          # mdm/block: token i read from the logits at i ("same", LLaDA) or at i - 1 ("shifted":
          # Dream, Fast-dLLM v2, MaxText; keeps what an AR model predicts). "auto": shifted when
          # train.init_from starts from an AR model, same otherwise (diffusion/alignment.py).
          logit_alignment="auto",
          # mdm/block training (LLaDA 2.0's post-training options; diffusion/objectives.py
          # diffusion_bound): score each row with its mask and with the complementary mask
          # (twice the FLOPs, lower variance, the same bound) ...
          complementary_masking=False,
          # ... and CAP: loss + cap_weight x the mean entropy of the correct predictions at masked
          # positions (sharper confidence: more tokens per step under threshold decoding).
          cap_weight=0.0,
      )
  )

  c.data = ml_collections.ConfigDict(
      dict(
          task="tinyshakespeare",  # a task or mixture of llada_jax.data.registry
          task_module="",  # python module imported first: it may register the user's tasks
          vocabulary="byte",  # "byte", "spm8k" (shipped SentencePiece), "llada_hf" or "hf"
          tokenizer="",  # tokenizer.json for vocabulary "llada_hf" (LLaDA's) or "hf" (any model's)
          sequence_length=128,
          batch_size=16,  # global batch, split over the data-parallel mesh axes
          packing="chunk",  # "chunk": cut the token stream (LLaDA); "pack": whole documents
          masking="pipeline",  # forward process in the input pipeline, or "device" (in the step)
          num_shards=-1,  # data shards (fix it for resumes on another host count); -1: one
          # per process that holds its own rows of the batch
          shuffle_buffer=10_000,
          prefetch=2,  # global batches prepared ahead of the step
          use_cached=False,  # read the task from seqio's offline cache (written by llada-cache)
          cache_dir="",  # a seqio cache directory (local or gs://) searched for it
      )
  )

  c.optimizer = ml_collections.ConfigDict(
      dict(
          peak_lr=3e-3,
          warmup_steps=50,  # linear warm-up 0 -> peak_lr
          lr_drop_step=0,  # > 0: the stable phase steps down to lr_after_drop at this step
          lr_after_drop=0.0,
          decay_fraction=0.2,  # last fraction of train.num_steps decays linearly to final_lr
          final_lr=1e-4,
          weight_decay=0.1,
          b1=0.9,
          b2=0.95,
          adam_eps=1e-8,
          grad_clip_norm=1.0,  # 0 disables clipping
      )
  )

  c.train = ml_collections.ConfigDict(
      dict(
          num_steps=1500,
          log_every=50,
          eval_every=250,
          eval_batches=8,
          nonfinite="rollback",  # NaN/inf loss or gradient: the update is always skipped; then
          # "skip" goes on, "rollback" restores the last checkpoint and
          rollback_lr_factor=0.25,  # multiplies the learning rate by this factor,
          max_rollbacks=3,  # at most this many times before stopping with an error
          inject_nan_at_step=-1,  # tests only: make the loss NaN at this step (while lr is uncut)
          grad_accum_steps=1,  # > 1: the batch's gradient as the mean over this many micro-batches
          loss_chunk=0,  # > 0: the output layer and loss run this many positions at a time
          # (no full [B, L, vocab] logits; LLaDA objectives only)
          profile_steps="",  # "a:b": jax.profiler trace of steps a+1..b in <workdir>/profile
          # A Llama/Mistral HF folder whose weights start a run without a checkpoint yet (AR
          # initialisation: model.* must be its sizes; its vocabulary, tokenizer, token ids and
          # vocab_size with the mask row are taken; ignored on resume). "": random init.
          init_from="",
          # With init_from: Gaussian noise added to the mask token's embedding row, its standard
          # deviation in units of the embedding table's (LLaDA 2.0: an AR model's embeddings of
          # tokens it never saw decay towards 0, which leaves the mask nearly invisible). 0: none.
          mask_embedding_noise=0.0,
      )
  )

  c.mesh = ml_collections.ConfigDict(
      dict(
          data=-1,  # -1 takes the devices the other axes leave
          fsdp=1,
          expert=1,  # expert parallelism: MoE experts (and the batch) split over this many
          tensor=1,
          dcn_data=1,  # multi-slice: how many slices each axis spans (divides its size;
          dcn_fsdp=1,  # only these factors cross the data-centre network)
          dcn_expert=1,
          dcn_tensor=1,
          axis_rules=DEFAULT_AXIS_RULES,
      )
  )

  c.checkpoint = ml_collections.ConfigDict(
      dict(
          save_every=250,
          keep=3,  # the newest checkpoints kept ...
          keep_every=0,  # ... plus every checkpoint at a multiple of this step (0: none)
          async_save=True,
      )
  )

  c.evaluation = ml_collections.ConfigDict(
      dict(
          tasks="",  # llada-evaluate tasks run every train.eval_every, e.g. "piqa"
          limit=200,  # items per task
          mc_num=32,  # Monte-Carlo samples per choice
          mc_batch_size=16,  # samples per forward pass (divides mc_num)
      )
  )

  # Post-training on the likelihood bound (llada_jax/posttrain; docs/post_training.md).
  c.posttrain = ml_collections.ConfigDict(
      dict(
          method="",  # "": pre-training / SFT on data.task; "dpo": ELBO-DPO (VRPO); "grpo": d1
          reference="",  # the frozen reference, a workdir or HF folder: the policy starts from it
          preferences="",  # JSONL of {prompt, chosen, rejected} (posttrain/preference.py)
          preferences_eval="",  # held-out pairs: eval/dpo/* at every train.eval_every
          beta=0.1,  # DPO's inverse temperature on the bound margins
          mc_num=8,  # VRPO's budget n: samples per bound, n timesteps with one mask each
          antithetic=True,  # the policy and the reference share timesteps and masks (VRPO)
          one_timestep=False,  # n_t = 1, VRPO's naive allocation (ablations)
          # diffu-GRPO: data.batch_size answer rows per step, group_size answers per prompt.
          prompts="",  # JSONL of {prompt, answer} (posttrain/source.py read_prompts)
          prompts_eval="",  # held-out prompts: eval/grpo/reward of greedy answers
          rewards="gsm8k",  # posttrain/rewards.py: "name" or "name:weight,name:weight"
          group_size=4,  # G answers per prompt
          clip_eps=0.2,  # the ratio's clipping
          kl_beta=0.04,  # weight of the KL to the reference (d1: 0.04)
          prompt_mask_prob=0.15,  # d1's random prompt masking in the log-probability pass
          # d1's mu: train steps per rollout batch, each with fresh prompt masks, the ratio taken
          # to the policy that sampled (kept in <workdir>/rollouts/ for an exact resume)
          inner_updates=1,
      )
  )

  # The reverse process (llada_jax.sampling.options.SamplerOptions takes its defaults from here).
  c.sampling = ml_collections.ConfigDict(
      dict(
          steps=112,
          gen_length=112,
          block_length=16,
          temperature=0.0,
          top_k=0,  # > 0: sample among the k most probable tokens only
          top_p=1.0,  # < 1: sample from the smallest set of tokens holding this probability
          cfg_scale=0.0,  # classifier-free guidance weight
          remasking="low_confidence",
          logits_eos_inf=False,  # never propose EOS
          confidence_eos_eot_inf=False,  # commit EOS/EoT proposals last
          parallel_threshold=0.0,  # > 0: confidence-threshold parallel decoding (approximate)
          cache="none",  # "prefix" or "dual" key/value cache (approximate)
          cache_refresh=0,  # > 0: also refresh the cache every N steps inside a block
          early_stop=False,  # stop once every row has committed EOS/EoT (block models always)
          float64=False,  # noise and probabilities in float64 (needs jax_enable_x64)
      )
  )
  return c


def validate(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Checks every field; raises ConfigError naming the first bad one. Returns the config."""
  _check_keys_and_types(config, default_config(), prefix="")
  m, d, data, tok = config.model, config.diffusion, config.data, config.tokens

  for name in (
      "vocab_size",
      "d_model",
      "n_layers",
      "n_heads",
      "n_kv_heads",
      "mlp_hidden_size",
      "max_sequence_length",
  ):
    _positive(f"model.{name}", m[name])
  if m.d_model % m.n_heads:
    _fail("model.d_model", m.d_model, f"a multiple of model.n_heads={m.n_heads}")
  if m.n_heads % m.n_kv_heads:
    _fail("model.n_kv_heads", m.n_kv_heads, f"a divisor of model.n_heads={m.n_heads}")
  if (m.d_model // m.n_heads) % 2:
    _fail("model.d_model", m.d_model, "d_model / n_heads even (RoPE rotates half the head dim)")
  _positive("model.rope_theta", m.rope_theta)
  _positive("model.rms_norm_eps", m.rms_norm_eps)
  _positive("model.init_std", m.init_std)
  _choice("model.dtype", m.dtype, DTYPES)
  _choice("model.param_dtype", m.param_dtype, DTYPES)
  _choice("model.remat", m.remat, REMAT_POLICIES)
  _choice("model.attention", m.attention, ATTENTION_IMPLEMENTATIONS)
  head_dim = m.d_model // m.n_heads
  if m.rotary_dim < 0 or m.rotary_dim % 2 or m.rotary_dim > head_dim:
    _fail("model.rotary_dim", m.rotary_dim, f"0 (all) or an even number <= head_dim={head_dim}")
  _check_moe(m)

  _choice("data.vocabulary", data.vocabulary, tuple(VOCABULARY_SIZES))
  if not data.task:
    _fail("data.task", data.task, "the name of a registered task or mixture")
  _choice("data.packing", data.packing, PACKING)
  _choice("data.masking", data.masking, MASKING)
  if data.num_shards != -1 and data.num_shards < 1:
    _fail("data.num_shards", data.num_shards, "a positive number of shards or -1 (one per process)")
  if data.num_shards > 0 and data.batch_size % data.num_shards:
    _fail("data.num_shards", data.num_shards, f"a divisor of data.batch_size={data.batch_size}")
  _non_negative("data.prefetch", data.prefetch)
  real_tokens = VOCABULARY_SIZES[data.vocabulary] or 0
  if not real_tokens <= tok.mask_id < m.vocab_size:
    _fail(
        "tokens.mask_id",
        tok.mask_id,
        f"an id outside the {data.vocabulary!r} vocabulary's real tokens and inside the model: "
        f"{real_tokens} <= mask_id < model.vocab_size={m.vocab_size}",
    )
  for name in ("pad_id", "eos_id"):
    if not 0 <= tok[name] < m.vocab_size:
      _fail(f"tokens.{name}", tok[name], f"an id in [0, model.vocab_size={m.vocab_size})")
  for name in ("bos_id", "eot_id"):
    if not -1 <= tok[name] < m.vocab_size:
      _fail(f"tokens.{name}", tok[name], f"-1 (none) or an id in [0, {m.vocab_size})")
  for name in ("pad_id", "eos_id", "bos_id", "eot_id"):
    if tok[name] == tok.mask_id:
      _fail(f"tokens.{name}", tok[name], f"an id different from tokens.mask_id={tok.mask_id}")
  _choice("diffusion.objective", d.objective, tuple(OBJECTIVES))
  objective = objective_of(config)
  if objective.causal != m.causal:
    _fail(
        "model.causal",
        m.causal,
        f"{objective.causal} with diffusion.objective="
        f"{d.objective!r} (the ARM baseline is the causal model, LLaDA the bidirectional one)",
    )
  _choice("diffusion.time_sampling", d.time_sampling, TIME_SAMPLING)
  _choice("diffusion.logit_alignment", d.logit_alignment, LOGIT_ALIGNMENTS)
  if objective.causal and d.logit_alignment == "shifted":
    _fail(
        "diffusion.logit_alignment",
        d.logit_alignment,
        f"auto or same with diffusion.objective={d.objective!r} (a causal model already "
        "predicts the next token at each position)",
    )
  if not 0.0 < d.eps < 1.0:
    _fail("diffusion.eps", d.eps, "0 < eps < 1")
  if not 0.0 <= d.random_length_prob <= 1.0:
    _fail("diffusion.random_length_prob", d.random_length_prob, "a probability in [0, 1]")
  if not 0.0 <= d.t_min < d.t_max <= 1.0:
    _fail("diffusion.t_min", (d.t_min, d.t_max), "0 <= t_min < t_max <= 1 (with t_max)")
  if d.block_size_schedule and not objective.blocks:
    _fail(
        "diffusion.block_size_schedule",
        d.block_size_schedule,
        f'"" (no schedule) unless diffusion.objective is {_objectives_with("blocks")}',
    )
  if (d.t_min, d.t_max) != (0.0, 1.0) and not objective.blocks:
    _fail(
        "diffusion.t_min",
        (d.t_min, d.t_max),
        f"the exact schedule t_min=0, t_max=1 unless diffusion.objective is "
        f"{_objectives_with('blocks')}",
    )
  _non_negative("diffusion.cap_weight", d.cap_weight)
  for name in ("complementary_masking", "cap_weight"):
    if d[name] and objective.causal:
      _fail(f"diffusion.{name}", d[name], f"off with diffusion.objective={d.objective!r} (no mask)")
  # Only a block model has blocks: an MDM's or ARM's block_size plays no part (nor is checked).
  for size in block_sizes(config) if objective.blocks else ():
    if not _is_int(size) or size < 1 or data.sequence_length % size:
      _fail(
          "diffusion.block_size" + ("_schedule" if d.block_size_schedule else ""),
          d.block_size_schedule or size,
          f"positive divisors of data.sequence_length={data.sequence_length}",
      )
  if block_size_schedule(config)[-1][1] != d.block_size:
    _fail(
        "diffusion.block_size_schedule",
        d.block_size_schedule,
        f"a schedule ending at diffusion.block_size={d.block_size} (the size the model is "
        "sampled and scored with)",
    )

  _positive("data.sequence_length", data.sequence_length)
  if data.sequence_length > m.max_sequence_length:
    _fail(
        "data.sequence_length",
        data.sequence_length,
        f"at most model.max_sequence_length={m.max_sequence_length}",
    )
  _positive("data.batch_size", data.batch_size)
  _positive("data.shuffle_buffer", data.shuffle_buffer)

  o = config.optimizer
  _positive("optimizer.peak_lr", o.peak_lr)
  for name in (
      "warmup_steps",
      "lr_drop_step",
      "lr_after_drop",
      "final_lr",
      "weight_decay",
      "adam_eps",
      "grad_clip_norm",
  ):
    _non_negative(f"optimizer.{name}", o[name])
  if not 0.0 <= o.decay_fraction <= 1.0:
    _fail("optimizer.decay_fraction", o.decay_fraction, "a fraction in [0, 1]")
  for name in ("b1", "b2"):
    if not 0.0 <= o[name] < 1.0:
      _fail(f"optimizer.{name}", o[name], "0 <= value < 1")

  for name in ("num_steps", "log_every", "eval_every", "eval_batches"):
    _positive(f"train.{name}", config.train[name])
  _choice("train.nonfinite", config.train.nonfinite, NONFINITE_POLICIES)
  if not 0.0 < config.train.rollback_lr_factor < 1.0:
    _fail("train.rollback_lr_factor", config.train.rollback_lr_factor, "0 < factor < 1")
  _non_negative("train.max_rollbacks", config.train.max_rollbacks)
  if config.train.inject_nan_at_step < -1:
    _fail("train.inject_nan_at_step", config.train.inject_nan_at_step, "-1 (off) or a step")
  _positive("train.grad_accum_steps", config.train.grad_accum_steps)
  if data.batch_size % config.train.grad_accum_steps:
    _fail(
        "train.grad_accum_steps",
        config.train.grad_accum_steps,
        f"a divisor of data.batch_size={data.batch_size}",
    )
  _non_negative("train.loss_chunk", config.train.loss_chunk)
  _non_negative("train.mask_embedding_noise", config.train.mask_embedding_noise)
  if config.train.mask_embedding_noise and not config.train.init_from:
    _fail(
        "train.mask_embedding_noise",
        config.train.mask_embedding_noise,
        '0 without train.init_from (it perturbs an AR model\'s mask row; "" starts at random)',
    )
  if config.train.loss_chunk and objective.causal:
    _fail(
        "train.loss_chunk", config.train.loss_chunk, f"0 with diffusion.objective={d.objective!r}"
    )
  if config.train.loss_chunk and data.sequence_length % config.train.loss_chunk:
    _fail(
        "train.loss_chunk",
        config.train.loss_chunk,
        f"0 or a divisor of data.sequence_length={data.sequence_length}",
    )
  if config.train.profile_steps:
    profile_range(config.train.profile_steps)
  if o.lr_drop_step > 0 >= o.lr_after_drop:
    _fail("optimizer.lr_after_drop", o.lr_after_drop, "a positive rate when lr_drop_step > 0")

  sizes = [config.mesh[a] for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size != -1 and size < 1:
      _fail(f"mesh.{axis}", size, "a positive size or -1 (the rest of the devices)")
  if sizes.count(-1) > 1:
    _fail("mesh", tuple(sizes), "at most one axis of size -1")
  for axis in (f"dcn_{a}" for a in MESH_AXES):
    _positive(f"mesh.{axis}", config.mesh[axis])
  for rule in config.mesh.axis_rules:
    name, axes = rule[0], rule[1]
    if name not in LOGICAL_AXES:
      _fail("mesh.axis_rules", name, f"a logical axis name of the model, one of {LOGICAL_AXES}")
    for axis in (axes if isinstance(axes, (list, tuple)) else [axes]):
      if axis is not None and axis not in MESH_AXES:
        _fail(f"mesh.axis_rules[{name!r}]", axis, f"None or mesh axes among {', '.join(MESH_AXES)}")

  _positive("checkpoint.save_every", config.checkpoint.save_every)
  _positive("checkpoint.keep", config.checkpoint.keep)
  _non_negative("checkpoint.keep_every", config.checkpoint.keep_every)

  ev = config.evaluation
  for name in ("limit", "mc_num", "mc_batch_size"):
    _positive(f"evaluation.{name}", ev[name])
  if ev.mc_num % min(ev.mc_batch_size, ev.mc_num):
    _fail(
        "evaluation.mc_num",
        ev.mc_num,
        f"a multiple of evaluation.mc_batch_size={ev.mc_batch_size} (or fewer samples than it)",
    )

  post = config.posttrain
  if post.method not in POSTTRAIN_METHODS:
    _fail("posttrain.method", post.method, "'' (pre-training or SFT on data.task), 'dpo' or 'grpo'")
  if post.beta <= 0:
    _fail("posttrain.beta", post.beta, "a positive number")
  _positive("posttrain.mc_num", post.mc_num)
  _positive("posttrain.group_size", post.group_size)
  _positive("posttrain.inner_updates", post.inner_updates)
  if not 0 < post.clip_eps < 1:
    _fail("posttrain.clip_eps", post.clip_eps, "a number in (0, 1)")
  if post.kl_beta < 0:
    _fail("posttrain.kl_beta", post.kl_beta, "a number >= 0")
  if not 0 <= post.prompt_mask_prob < 1:
    _fail("posttrain.prompt_mask_prob", post.prompt_mask_prob, "a probability in [0, 1)")
  needed = {"dpo": ("reference", "preferences"), "grpo": ("reference", "prompts")}
  for name in needed.get(post.method, ()):
    if not post[name]:
      _fail(f"posttrain.{name}", post[name], f"a path with posttrain.method={post.method!r}")

  check_sampling(config.sampling.to_dict(), prefix="sampling.")
  return config


def _check_moe(m: ml_collections.ConfigDict) -> None:
  """The model.moe section (only read when num_experts > 0)."""
  moe = m.moe
  _non_negative("model.moe.num_experts", moe.num_experts)
  if not moe.num_experts:
    return
  for name in ("experts_per_token", "expert_hidden_size", "n_group", "topk_group"):
    _positive(f"model.moe.{name}", moe[name])
  if moe.experts_per_token > moe.num_experts:
    _fail(
        "model.moe.experts_per_token",
        moe.experts_per_token,
        f"at most model.moe.num_experts={moe.num_experts}",
    )
  _non_negative("model.moe.num_shared_experts", moe.num_shared_experts)
  if not 0 <= moe.first_k_dense_replace <= m.n_layers:
    _fail(
        "model.moe.first_k_dense_replace",
        moe.first_k_dense_replace,
        f"a number of layers in [0, model.n_layers={m.n_layers}]",
    )
  _choice("model.moe.router", moe.router, ROUTERS)
  _choice("model.moe.implementation", moe.implementation, MOE_IMPLEMENTATIONS)
  if moe.num_experts % moe.n_group:
    _fail("model.moe.n_group", moe.n_group, f"a divisor of model.moe.num_experts={moe.num_experts}")
  if moe.n_group > 1:
    if moe.router != "sigmoid_grouped":
      _fail("model.moe.n_group", moe.n_group, f"1 for router {moe.router!r} (no group limit)")
    per_group = moe.num_experts // moe.n_group
    if per_group < 2:
      _fail("model.moe.n_group", moe.n_group, "at most num_experts / 2 (a group scores its best 2)")
    if not moe.topk_group <= moe.n_group or moe.topk_group * per_group < moe.experts_per_token:
      _fail(
          "model.moe.topk_group",
          moe.topk_group,
          f"at most n_group={moe.n_group} groups holding >= experts_per_token="
          f"{moe.experts_per_token} experts",
      )
  _positive("model.moe.routed_scaling_factor", moe.routed_scaling_factor)
  _positive("model.moe.exchange_capacity", moe.exchange_capacity)
  for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
    _non_negative(f"model.moe.{name}", moe[name])


def profile_range(text: str) -> tuple[int, int]:
  """(a, b) of train.profile_steps "a:b": the trace covers the steps after a up to b."""
  parts = text.split(":")
  if (
      len(parts) != 2
      or not all(p.strip().isdigit() for p in parts)
      or int(parts[0]) >= int(parts[1])
  ):
    _fail("train.profile_steps", text, '"a:b" with integers 0 <= a < b, e.g. "10:15"')
  return int(parts[0]), int(parts[1])


def block_size_schedule(config: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
  """((first step, block size), ...) of objective "block", sorted by step: parsed from
  diffusion.block_size_schedule "STEP:SIZE,..." (its first step 0; SIZE "L" is
  data.sequence_length: a whole-sequence, MDM phase), or ((0, block_size),). Any piecewise
  sequence: LLaDA 2.0's warm-up 1 -> 4 -> 32 -> 64 -> L, its long MDM phase and the decay back to
  32 is "0:1,a:4,b:32,c:64,d:L,e:32" with block_size 32.

  Raises:
    ConfigError: a schedule that is not comma-separated STEP:SIZE pairs of integers, with
      increasing steps starting at 0.
  """
  d = config.diffusion
  if not d.block_size_schedule:
    return ((0, d.block_size),)
  length = str(config.data.sequence_length)
  pairs = [[x.strip() for x in p.split(":")] for p in d.block_size_schedule.split(",")]
  pairs = [(p[0], length if p[1:] == ["L"] else p[-1]) for p in pairs if len(p) == 2]
  if len(pairs) != d.block_size_schedule.count(",") + 1 or not all(
      a.isdigit() and b.isdigit() for a, b in pairs
  ):
    pairs = []
  schedule = tuple((int(a), int(b)) for a, b in pairs)
  steps = [a for a, _ in schedule]
  if not schedule or steps[0] != 0 or steps != sorted(set(steps)):
    _fail(
        "diffusion.block_size_schedule",
        d.block_size_schedule,
        '"" or "STEP:SIZE,..." with increasing steps from 0 and SIZE a number or L (the '
        'sequence length), e.g. "0:1,1000:4,2000:32,3000:L,6000:32"',
    )
  return schedule


def block_sizes(config: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Every block size objective "block" trains with (`block_size_schedule`), each once."""
  return tuple(dict.fromkeys(b for _, b in block_size_schedule(config)))


def objective_of(config: ml_collections.ConfigDict) -> Objective:
  """The traits of config.diffusion.objective (validated: a key of OBJECTIVES)."""
  return OBJECTIVES[config.diffusion.objective]


def pipeline_masks(config: ml_collections.ConfigDict) -> bool:
  """Whether the input pipeline runs the forward process (data.masking="pipeline" for an
  objective whose forward process may run there): its batches then carry inputs, masked and
  p_mask."""
  return config.data.masking == "pipeline" and objective_of(config).pipeline_masking


def block_size_at(config: ml_collections.ConfigDict, step: int) -> int:
  """The training block size at `step` (0-based) under `block_size_schedule`."""
  return [b for a, b in block_size_schedule(config) if a <= step][-1]


def take_fields(
    config: ml_collections.ConfigDict, source: ml_collections.ConfigDict, keys: Sequence[str]
) -> tuple[ml_collections.ConfigDict, list[str]]:
  """(a copy of `config` with `source`'s values at `keys`, the keys whose value changed as
  "key=new (the config has old)"). A key is "section.field", or "section" for a whole section.
  Not validated: the caller validates the config it ends with."""
  out = ml_collections.ConfigDict(config.to_dict())
  changed = []
  for key in keys:
    section, _, field = key.partition(".")
    new = source[section][field] if field else source[section].to_dict()
    old = out[section][field] if field else out[section].to_dict()
    if new != old:
      changed.append(f"{key}={new!r} (the config has {old!r})")
    if field:
      out[section][field] = new
    else:
      out[section] = ml_collections.ConfigDict(new)
  return out, changed


def to_json(config: ml_collections.ConfigDict) -> str:
  """Serialises a config (stored beside every checkpoint)."""
  return config.to_json(indent=1, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Rebuilds and validates a config written by `to_json`."""
  try:
    values = json.loads(text)
  except json.JSONDecodeError as e:
    raise ConfigError(f"stored config is not valid JSON: {e}") from None
  config = default_config()
  _update(config, values, prefix="")
  if "logit_alignment" not in values.get("diffusion", {}):
    config.diffusion.logit_alignment = "same"  # stored before the option: LLaDA's alignment
  return validate(config)


def _update(config: ml_collections.ConfigDict, values: dict[str, Any], prefix: str) -> None:
  """Writes stored `values` over the defaults in `config`; ConfigError for an unknown key."""
  for key, value in values.items():
    if key not in config:
      raise ConfigError(f"unknown config key '{prefix}{key}'")
    if isinstance(config[key], ml_collections.ConfigDict):
      _update(config[key], value, prefix=f"{prefix}{key}.")
    elif isinstance(config[key], tuple):
      config[key] = _as_tuple(value)
    else:
      try:
        config[key] = value
      except TypeError:
        _fail(f"{prefix}{key}", value, f"a value of type {type(config[key]).__name__}")


def _as_tuple(value: Any) -> Any:
  if isinstance(value, list):
    return tuple(_as_tuple(v) for v in value)
  return value


def _check_keys_and_types(
    config: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str
) -> None:
  """ConfigError for a key the schema lacks or a value of another type than the default's."""
  for key in config.keys():
    if key not in schema:
      allowed = ", ".join(sorted(schema.keys()))
      raise ConfigError(f"unknown config key '{prefix}{key}' (known keys here: {allowed})")
  for key in schema.keys():
    name = f"{prefix}{key}"
    if key not in config:
      raise ConfigError(f"config is missing the key '{name}'")
    want, got = schema[key], config[key]
    if isinstance(want, ml_collections.ConfigDict):
      if not isinstance(got, ml_collections.ConfigDict):
        _fail(name, got, "a group of settings")
      _check_keys_and_types(got, want, prefix=f"{name}.")
    elif isinstance(want, bool):
      if not isinstance(got, bool):
        _fail(name, got, "True or False")
    elif isinstance(want, int):
      if isinstance(got, bool) or not isinstance(got, int):
        _fail(name, got, "an integer")
    elif isinstance(want, float):
      if isinstance(got, bool) or not isinstance(got, (int, float)):
        _fail(name, got, "a number")
    elif isinstance(want, str):
      if not isinstance(got, str):
        _fail(name, got, "a string")
    elif isinstance(want, tuple):
      if not isinstance(got, (tuple, list)):
        _fail(name, got, "a sequence")


def _fail(name: str, value: Any, allowed: str) -> None:
  raise ConfigError(f"{name}={value!r} is not allowed: expected {allowed}")


def _positive(name: str, value: float) -> None:
  if not value > 0:
    _fail(name, value, "a positive number")


def _non_negative(name: str, value: float) -> None:
  if not value >= 0:
    _fail(name, value, "a number >= 0")


def _objectives_with(trait: str) -> str:
  """'"block"' (or '"a" or "b"'): the objectives that have `trait`, for an error message."""
  return " or ".join(f'"{name}"' for name, o in OBJECTIVES.items() if getattr(o, trait))


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
  if value not in allowed:
    _fail(name, value, "one of " + ", ".join(allowed))


def _is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_flag(value: Any) -> bool:
  return isinstance(value, (bool, np.bool_)) or (_is_int(value) and value in (0, 1))


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


# Per sampler option: (test of one value, what is allowed); cross-option rules in check_sampling.
SAMPLING_RULES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "steps": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "gen_length": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "block_length": (lambda v: _is_int(v) and v > 0, "a positive integer"),
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: every token)"),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a probability in (0, 1] (1: every token)"),
    "cfg_scale": (lambda v: _is_number(v) and v >= 0, "a number >= 0"),
    "remasking": (lambda v: v in REMASKING, "one of " + ", ".join(REMASKING)),
    "logits_eos_inf": (_is_flag, "True or False"),
    "confidence_eos_eot_inf": (_is_flag, "True or False"),
    "parallel_threshold": (
        lambda v: _is_number(v) and (v == 0 or 0 < v <= 1),
        "0 (exact schedule) or a probability in (0, 1]",
    ),
    "cache": (lambda v: v in CACHE_MODES, "one of " + ", ".join(CACHE_MODES)),
    "cache_refresh": (
        lambda v: _is_int(v) and v >= 0,
        "an integer >= 0 (0 refreshes at block boundaries only)",
    ),
    "float64": (_is_flag, "True or False"),
    "early_stop": (_is_flag, "True or False"),
}


def check_sampling_fields(values: Mapping[str, Any], prefix: str = "") -> None:
  """Checks each given sampler option on its own (a command line checks the options it was given
  before the checkpoint that fills the others is loaded; check_sampling checks all together).

  Raises:
    ConfigError: an unknown name, or the first value its option does not allow.
  """
  check_sampling_names(values, prefix)
  for name, value in values.items():
    test, allowed = SAMPLING_RULES[name]
    if not test(value):
      _fail(f"{prefix}{name}", value, allowed)


def check_sampling_names(values: Mapping[str, Any], prefix: str = "") -> None:
  """Raises ConfigError for a name that is not a sampler option."""
  unknown = sorted(set(values) - set(SAMPLING_RULES))
  if unknown:
    raise ConfigError(
        f"unknown sampler option {prefix}{unknown[0]!r}: expected one of "
        f"{', '.join(SAMPLING_RULES)}"
    )


def check_sampling(values: Mapping[str, Any], prefix: str = "") -> None:
  """Checks sampler options (config.sampling, `SamplerOptions` as a dict, or just the ones a command
  line was given): each value, then every rule between them whose options are all present (blocks
  divide gen_length, steps split over blocks, threshold decoding needs low_confidence), so a
  command line refuses what it can before a checkpoint fills in the rest. Model-dependent checks
  live in SamplerOptions.validate.

  Raises:
    ConfigError: one line naming the first bad option, its value and what is allowed.
  """
  check_sampling_fields(values, prefix)
  gen_length, block_length, steps = (values.get(k) for k in ("gen_length", "block_length", "steps"))
  if gen_length is not None and block_length is not None and gen_length % block_length:
    _fail(f"{prefix}block_length", block_length, f"a divisor of gen_length={gen_length}")
  if steps is not None and gen_length is not None and steps > gen_length:
    _fail(f"{prefix}steps", steps, f"at most gen_length={gen_length} (one token per step at least)")
  if None not in (steps, gen_length, block_length) and steps % (gen_length // block_length):
    _fail(
        f"{prefix}steps",
        steps,
        f"a multiple of the number of blocks gen_length/block_length={gen_length // block_length}",
    )
  if values.get("parallel_threshold", 0) > 0 and values.get("remasking", "low_confidence") != (
      "low_confidence"
  ):
    raise ConfigError(
        f"{prefix}remasking={values['remasking']!r} is not allowed with "
        "parallel_threshold: expected low_confidence (the threshold is on the "
        "proposal's probability)"
    )
