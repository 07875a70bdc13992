"""Checkpoint merging (LLaDA 2.0's recipe): the uniform mean of the parameters of several
checkpoints of one model, written as a new workdir and/or an HF folder.

  python -m llada_jax.merge --workdir=runs/a [--workdir=runs/b] --top_k=3 \
      --out_workdir=runs/merged [--out_hf=merged_hf --hf_dtype=bfloat16]
  python -m llada_jax.merge --workdir=runs/a --steps=4000,4500,5000 --out_hf=merged_hf

Which checkpoints (exactly one of):
  --top_k=N      the N saved checkpoints (over every --workdir) with the lowest validation value
                 `--metric` (default loss_bound: the trainer's held-out bound, nats/token) in the
                 `eval` records of each workdir's metrics.jsonl at their step. A saved step with no
                 such record (or a null one: a non-finite bound) is not a candidate; ties go to the
                 later step.
  --steps=A,B,.. these steps, in every --workdir (several workdirs: a soup of runs at one step).

What is written (at least one of):
  --out_workdir  a new workdir whose only checkpoint, at the largest merged step S, holds the mean
                 parameters in the stored dtype of the newest merged checkpoint (largest step; the
                 last --workdir among equal steps), that checkpoint's config, and a fresh train
                 state around them: a new optimizer state (`tx.init`: Adam moments 0, its count 0),
                 lr_scale 1, no rollbacks or skipped steps. `llada-sample`, `llada-evaluate` and
                 `llada-convert to-hf` read it; training it further (num_steps > S) draws the data
                 and noise of step S on, while the learning-rate schedule, counted by the fresh
                 optimizer state, starts again at its warm-up. `merge.json` beside the checkpoints
                 records the sources, their values and S.
  --out_hf       an HF folder written by the exporter of `llada-convert to-hf` (`save_hf`) from the
                 mean parameters, in --hf_dtype (default bfloat16), local disks only.
An output that exists and is not empty is refused before anything is read: nothing saved is lost.

The mean: each float parameter leaf is summed in float32 (float64 leaves in float64), checkpoint by
checkpoint and tensor by tensor, divided by the number of checkpoints and cast to the output dtype;
a leaf that is not floating point (none in today's models) is taken from the newest checkpoint.
Peak memory: the float32 sum (4 bytes a parameter) plus one checkpoint's parameters in its stored
dtype, on the mesh below; writing --out_workdir adds the fresh optimizer state (2 x the parameters)
once the sum is freed. Merging one checkpoint gives it back bit for bit.

Placement (--mesh): `stored` (default) restores onto every device with the shardings the trainer
uses for the newest checkpoint's config (its mesh section and logical axis rules:
`training.state.state_shardings`); `replicated` puts a whole copy on every device, as `llada-sample`
loads (use it when the stored mesh does not fit the devices at hand).

Checks, each one line (exit 2) before any tensor is read: neither or both of --top_k/--steps; an
existing non-empty output; a step a workdir does not hold (naming the steps it holds); fewer
candidates than --top_k (naming how many there are); checkpoints of different models (the first
differing setting: the parameter-shaping fields of `checkpoint.architecture_mismatch`
(PARAMETER_FIELDS and EXPERT_PARAMETER_FIELDS), then those of MERGE_FIELDS, then the stored
tree's leaves and shapes).

The flags are defined when the command runs (`run`), so that importing this module for `merge`
claims no flag names (--workdir, --steps, --top_k) that other commands define.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import ml_collections

from llada_jax import storage
from llada_jax.errors import CheckpointError, ConfigError

# What a checkpoint must share with the newest merged one beyond the parameter-shaping fields of
# `checkpoint` (the shapes): what the parameters compute with, and the token ids they were trained
# on.
MERGE_FIELDS = (
    "model.rope_theta",
    "model.rms_norm_eps",
    "model.causal",
    "model.rotary_dim",
    "model.moe.experts_per_token",
    "model.moe.router",
    "model.moe.n_group",
    "model.moe.topk_group",
    "model.moe.routed_scaling_factor",
    "model.moe.norm_topk_prob",
    "diffusion.objective",
    "data.vocabulary",
    "tokens.mask_id",
)
MESH_CHOICES = ("stored", "replicated")
MERGE_RECORD = "merge.json"  # in --out_workdir: what was merged


@dataclasses.dataclass(frozen=True)
class Source:
  """One merged checkpoint: a workdir, a saved step and its validation value (None: --steps
  picked it and metrics.jsonl has no value of the metric at that step)."""

  workdir: str
  step: int
  value: float | None


@dataclasses.dataclass(frozen=True)
class MergeResult:
  """What `merge` did: the sources in merge order (oldest first), the output step S (the largest
  merged step), the config stored with the output (the newest source's) and the mean parameters
  (a pytree of jax.Arrays of the stored shapes, in the newest source's param_dtype, placed as
  --mesh says)."""

  sources: tuple[Source, ...]
  step: int
  config: ml_collections.ConfigDict
  params: Any


def parse_steps(values: Sequence[str]) -> list[int]:
  """--steps as ints (order kept, duplicates dropped); ConfigError for an empty list or an entry
  that is not a non-negative integer."""
  steps: list[int] = []
  for value in values:
    try:
      step = int(str(value).strip())
    except ValueError:
      step = -1
    if step < 0:
      raise ConfigError(
          f"--steps={','.join(map(str, values))} is not allowed: {value!r} is not a step; "
          "expected non-negative integers such as --steps=100,200"
      )
    if step not in steps:
      steps.append(step)
  if not steps:
    raise ConfigError("--steps= is not allowed: expected at least one step")
  return steps


def check_request(
    workdirs: Sequence[str],
    top_k: int | None,
    steps: Sequence[int] | None,
    out_workdir: str | None,
    out_hf: str | None,
) -> None:
  """The checks that need nothing but the flags and the output paths, made before anything is
  read: at least one --workdir, exactly one of --top_k / --steps, a positive --top_k, at least one
  output, outputs that do not exist or are empty folders, a local --out_hf other than
  --out_workdir.

  Raises:
    ConfigError: one line naming the flag.
  """
  if not workdirs:
    raise ConfigError("--workdir is required: a training workdir (repeat it for several runs)")
  seen = set()
  for w in workdirs:
    if storage.path(w) in seen:
      raise ConfigError(f"--workdir={w} is given twice: expected each source workdir once")
    seen.add(storage.path(w))
  if (top_k is None) == (steps is None):
    given = "both" if top_k is not None else "neither"
    raise ConfigError(
        f"{given} of --top_k and --steps given: expected exactly one (--top_k=N: the N "
        "checkpoints with the lowest validation bound; --steps=A,B: these steps)"
    )
  if steps is not None:
    parse_steps([str(s) for s in steps])  # at least one step, none negative
  if top_k is not None and top_k < 1:
    raise ConfigError(f"--top_k={top_k} is not allowed: expected a positive number of checkpoints")
  if not out_workdir and not out_hf:
    raise ConfigError("no output: expected --out_workdir=NEW_WORKDIR and/or --out_hf=NEW_FOLDER")
  if out_hf and storage.is_remote(out_hf):
    raise ConfigError(
        f"--out_hf={out_hf} is not allowed: HF folders are written to a local disk; write "
        "--out_workdir and export it with llada-convert to-hf --out=URL"
    )
  if out_workdir and out_hf and storage.path(out_workdir) == storage.path(out_hf):
    raise ConfigError(
        f"--out_hf={out_hf} is not allowed: it is --out_workdir (its config.json would hide the "
        "checkpoints); expected another folder"
    )
  for flag, out in (("--out_workdir", out_workdir), ("--out_hf", out_hf)):
    if out:
      _check_new_output(flag, out)


def _check_new_output(flag: str, out: str) -> None:
  """ConfigError unless `out` is missing or an empty folder (so that nothing saved is replaced)."""
  path = storage.path(out)
  if not path.exists():
    return
  if not path.is_dir():
    raise ConfigError(f"{flag}={out} is not allowed: it is a file; expected a new or empty folder")
  names = sorted(p.name for p in path.iterdir())
  if names:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise ConfigError(
        f"{flag}={out} is not allowed: it exists and holds {shown}; expected a new or empty "
        "folder (a merge never writes over saved files)"
    )


def recorded_values(workdir: str, metric: str) -> dict[int, float]:
  """step -> the value of `metric` in the last `eval` record of that step in
  `<workdir>/metrics.jsonl` that holds it as a number ({} without the file). The trainer writes its
  held-out bound (`loss_bound`; `bits_per_byte` for byte vocabularies) and the results of eval
  hooks as separate eval records of one step, and a resumed or rolled-back run writes a step again:
  the last value written is the one of the parameters its checkpoint holds. A null (a non-finite
  value) counts as none. An unparsable last line (a run killed mid-write) is skipped.

  Raises:
    ConfigError: a line other than the last that is not a JSON record with split and step.
  """
  from llada_jax.analysis.runs import read_records  # pylint: disable=g-import-not-at-top

  path = storage.path(workdir) / "metrics.jsonl"
  if not path.exists():
    return {}
  values: dict[int, float] = {}
  for record in read_records(path):
    value = record.get(metric)
    if record["split"] == "eval" and isinstance(value, (int, float)) and math.isfinite(value):
      values[int(record["step"])] = float(value)
  return values


def select_sources(
    workdirs: Sequence[str],
    top_k: int | None = None,
    steps: Sequence[int] | None = None,
    metric: str = "loss_bound",
) -> list[Source]:
  """The checkpoints to merge, oldest first (by step, then by the order of `workdirs`).

  top_k: the top_k saved checkpoints over all workdirs with the lowest recorded `metric`
  (`recorded_values`), ties to the later step; steps: these steps of every workdir.

  Raises:
    CheckpointError: a workdir without checkpoints.
    ConfigError: a step a workdir does not hold (naming the steps it holds), fewer candidates
      than top_k (naming how many there are), both or neither of top_k and steps.
  """
  from llada_jax import checkpoint  # pylint: disable=g-import-not-at-top

  if (top_k is None) == (steps is None):
    raise ConfigError("expected exactly one of --top_k and --steps")
  saved = {w: checkpoint.saved_steps(w) for w in workdirs}
  if steps is not None:
    chosen = []
    for w in workdirs:
      missing = [s for s in steps if s not in saved[w]]
      if missing:
        raise ConfigError(
            f"--steps={','.join(map(str, steps))} is not allowed: --workdir={w} holds no "
            f"checkpoint at step {', '.join(map(str, missing))}; its saved steps are "
            f"{', '.join(map(str, saved[w]))}"
        )
      values = recorded_values(w, metric)
      chosen += [Source(w, s, values.get(s)) for s in steps]
  else:
    candidates = []
    for w in workdirs:
      values = recorded_values(w, metric)
      candidates += [Source(w, s, values[s]) for s in saved[w] if s in values]
    where = "; ".join(f"{w}: steps {', '.join(map(str, saved[w]))}" for w in workdirs)
    if not candidates:
      raise ConfigError(
          f"--top_k={top_k} is not allowed: no saved checkpoint has an eval record of {metric} "
          f"in metrics.jsonl (saved: {where}); expected --steps, or a run whose "
          "train.eval_every divides checkpoint.save_every"
      )
    if len(candidates) < top_k:
      raise ConfigError(
          f"--top_k={top_k} is not allowed: only {len(candidates)} saved checkpoint(s) have an "
          f"eval record of {metric} in metrics.jsonl (saved: {where}); expected --top_k at most "
          f"{len(candidates)}, or --steps"
      )
    chosen = sorted(candidates, key=lambda s: (s.value, -s.step))[:top_k]
  order = {w: i for i, w in enumerate(workdirs)}
  return sorted(chosen, key=lambda s: (s.step, order[s.workdir]))


def _field(config: ml_collections.ConfigDict, dotted: str) -> Any:
  node = config
  for part in dotted.split("."):
    node = node[part]
  return node


def check_same_model(sources: Sequence[Source]) -> ml_collections.ConfigDict:
  """The config of the newest source (the last), after checking that every other source's stored
  config has its parameter-shaping fields (`checkpoint.PARAMETER_FIELDS`, the fields of
  `checkpoint.architecture_mismatch`) and MERGE_FIELDS.

  Raises:
    CheckpointError: a config that cannot be read, or the first differing setting, in one line.
  """
  from llada_jax import checkpoint  # pylint: disable=g-import-not-at-top

  newest = sources[-1]
  reference = checkpoint.load_config(newest.workdir, newest.step)
  shaping = checkpoint.PARAMETER_FIELDS + checkpoint.EXPERT_PARAMETER_FIELDS
  fields = tuple(f"model.{name}" for name in shaping) + MERGE_FIELDS
  for source in sources[:-1]:
    config = checkpoint.load_config(source.workdir, source.step)
    for name in fields:
      if _field(config, name) != _field(reference, name):
        raise CheckpointError(
            f"checkpoint {source.step} of --workdir={source.workdir} has "
            f"{name}={_field(config, name)!r} but checkpoint {newest.step} of "
            f"--workdir={newest.workdir} has {_field(reference, name)!r}: only checkpoints of "
            "one model can be averaged"
        )
  return reference


def _mesh_config(config: ml_collections.ConfigDict, mesh: str) -> ml_collections.ConfigDict:
  """A copy of `config` whose mesh section lays the parameters out as --mesh says (`merge`
  checked the choice): the stored one, or replicated as `llada-sample` loads."""
  from llada_jax.loading import serving_config  # pylint: disable=g-import-not-at-top

  if mesh == "replicated":
    return serving_config(config)
  return ml_collections.ConfigDict(config.to_dict())


def abstract_state(config: ml_collections.ConfigDict, mesh: str = "stored") -> Any:
  """The train state of `config` as ShapeDtypeStructs carrying the shardings --mesh gives over all
  devices (`training.state.state_shardings`, the trainer's): params in model.param_dtype.

  Raises:
    ConfigError: a stored mesh that does not fit the devices at hand (as the trainer's message).
  """
  import jax  # pylint: disable=g-import-not-at-top

  from llada_jax.lm import MaskedDiffusionLM  # pylint: disable=g-import-not-at-top
  from llada_jax.parallel.mesh import make_mesh  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import state_shardings  # pylint: disable=g-import-not-at-top

  placed = _mesh_config(config, mesh)
  try:
    device_mesh = make_mesh(placed, jax.devices(), check_batch=False)
  except ConfigError as e:
    if mesh == "replicated":
      raise
    raise ConfigError(
        f"{e} (the stored config's mesh; --mesh=replicated fits any devices)"
    ) from None
  abstract, _ = state_shardings(
      placed, MaskedDiffusionLM(placed), make_optimizer(placed), device_mesh
  )
  return abstract


def _check_stored_trees(sources: Sequence[Source], abstract_params: Any) -> None:
  """CheckpointError unless every source stores the leaves and shapes of `abstract_params`
  (read from the tree metadata, no tensor)."""
  from llada_jax import checkpoint  # pylint: disable=g-import-not-at-top

  for source in sources:
    try:
      checkpoint._check_stored_tree(  # pylint: disable=protected-access
          source.workdir, source.step, {"params": abstract_params}
      )
    except checkpoint._Damaged as e:  # pylint: disable=protected-access
      raise CheckpointError(
          f"checkpoint {source.step} of --workdir={source.workdir} cannot be merged: {e}"
      ) from None


class RunningMean:
  """The uniform mean of parameter trees added one at a time, holding one accumulator.

  Float leaves are summed in float32 (float64 leaves in float64) by one jitted add per leaf, each
  sum leaf replaced as soon as its new value exists (and donated, so updated in place, where the
  backend supports donation: not the CPU); a non-float leaf keeps the last added tree's value (add
  the newest checkpoint last). Peak memory: the accumulator (4 bytes a float32 parameter), the
  tree being added (which the caller frees after `add`) and one more leaf of the sum.
  """

  def __init__(self) -> None:
    self._leaves: list[Any] | None = None
    self._treedef: Any = None
    self._count = 0

  @property
  def count(self) -> int:
    """How many trees were added."""
    return self._count

  def add(self, params: Any) -> None:
    """Adds one tree of jax.Arrays.

    Raises:
      ValueError: a tree of another structure than the first one added.
    """
    import jax  # pylint: disable=g-import-not-at-top

    leaves, treedef = jax.tree.flatten(params)
    if self._leaves is None:
      self._treedef, self._leaves = treedef, [_start(x) for x in leaves]
    else:
      if treedef != self._treedef:
        raise ValueError(f"RunningMean.add: tree {treedef} is not the first one's {self._treedef}")
      for i, x in enumerate(leaves):
        self._leaves[i] = _accumulate(self._leaves[i], x)
    self._count += 1

  def mean(self, like: Any) -> Any:
    """The mean of the added trees: each float leaf's sum / count cast to the dtype of the same
    leaf of `like` (a tree of arrays or ShapeDtypeStructs of the added structure), other leaves as
    kept. Ends the running sum (each sum leaf is released as its mean is made).

    Raises:
      ValueError: nothing was added.
    """
    import jax  # pylint: disable=g-import-not-at-top

    if self._leaves is None:
      raise ValueError("RunningMean.mean() before any add()")
    sums, self._leaves = self._leaves, None
    dtypes = [a.dtype for a in self._treedef.flatten_up_to(like)]
    out = []
    for i, dtype in enumerate(dtypes):
      out.append(_divide(sums[i], self._count, dtype))
      sums[i] = None
    return jax.tree.unflatten(self._treedef, out)


def _is_float(x: Any) -> bool:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return jnp.issubdtype(x.dtype, jnp.floating)


def _accumulator_dtype(dtype: Any) -> Any:
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def _jitted() -> dict[str, Any]:
  """The three jitted leaf programs, built once (jax imported on first use)."""
  if not _PROGRAMS:
    import jax  # pylint: disable=g-import-not-at-top

    # Donation where the backend supports it (not the CPU): the running sum is updated in place.
    donate = (0,) if jax.default_backend() != "cpu" else ()
    _PROGRAMS["start"] = jax.jit(lambda x: x.astype(_accumulator_dtype(x.dtype)))
    _PROGRAMS["add"] = jax.jit(lambda s, x: s + x.astype(s.dtype), donate_argnums=donate)
    _PROGRAMS["divide"] = jax.jit(
        lambda s, n, dtype: (s / n).astype(dtype),
        static_argnums=(1, 2),
        donate_argnums=donate,
    )
  return _PROGRAMS


_PROGRAMS: dict[str, Any] = {}


def _start(x: Any) -> Any:
  return _jitted()["start"](x) if _is_float(x) else x


def _accumulate(total: Any, x: Any) -> Any:
  return _jitted()["add"](total, x) if _is_float(x) else x


def _divide(total: Any, count: int, dtype: Any) -> Any:
  import numpy as np  # pylint: disable=g-import-not-at-top

  if not _is_float(total):
    return total
  return _jitted()["divide"](total, count, np.dtype(dtype))


def merge(
    workdirs: Sequence[str],
    *,
    top_k: int | None = None,
    steps: Sequence[int] | None = None,
    out_workdir: str | None = None,
    out_hf: str | None = None,
    metric: str = "loss_bound",
    mesh: str = "stored",
    hf_dtype: str = "bfloat16",
    hf_max_shard_size: str = "5GB",
) -> MergeResult:
  """Averages checkpoints of one model (module docstring) and writes the outputs.

  Order of work: `check_request` (flags, outputs), `select_sources`, `check_same_model`, the
  stored trees against the newest config's parameters, then the restores (one checkpoint at a
  time, oldest first, `checkpoint.load_params` into the --mesh shardings, each in its own stored
  param_dtype), the mean, --out_workdir, --out_hf.

  Returns:
    MergeResult: the sources, the output step, the stored config and the mean parameters.

  Raises:
    ConfigError: a bad flag, an existing non-empty output, a missing step, too few candidates,
      a stored mesh that does not fit the devices (--mesh=replicated does).
    CheckpointError: a workdir without checkpoints, a checkpoint that cannot be read, checkpoints
      of different models (naming the first differing setting), an HF export the format refuses.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top

  from llada_jax import checkpoint  # pylint: disable=g-import-not-at-top

  workdirs = list(workdirs)
  steps = None if steps is None else list(steps)
  check_request(workdirs, top_k, steps, out_workdir, out_hf)
  steps = None if steps is None else parse_steps([str(s) for s in steps])
  if mesh not in MESH_CHOICES:
    raise ConfigError(f"--mesh={mesh} is not allowed: expected one of {', '.join(MESH_CHOICES)}")
  sources = tuple(select_sources(workdirs, top_k, steps, metric))
  config = check_same_model(sources)
  abstract = abstract_state(config, mesh)
  _check_stored_trees(sources, abstract.params)
  for source in sources:
    shown = "no record" if source.value is None else f"{metric} {source.value:.6g}"
    logging.info("merging step %d of %s (%s)", source.step, source.workdir, shown)

  abstract_by_dtype = {config.model.param_dtype: abstract.params}
  running = RunningMean()
  for source in sources:
    dtype = checkpoint.load_config(source.workdir, source.step).model.param_dtype
    if dtype not in abstract_by_dtype:  # a run resumed with another param_dtype
      stored = ml_collections.ConfigDict(config.to_dict())
      stored.model.param_dtype = dtype
      abstract_by_dtype[dtype] = abstract_state(stored, mesh).params
    params = checkpoint.load_params(source.workdir, source.step, abstract_by_dtype[dtype])
    running.add(params)
    del params  # one checkpoint at a time: the sum and this one
  params = running.mean(abstract.params)
  step = max(s.step for s in sources)
  result = MergeResult(sources, step, config, params)
  from llada_jax.loading import stored_tokenizer  # pylint: disable=g-import-not-at-top

  tokenizer = stored_tokenizer(sources[-1].workdir, config)
  if out_workdir:
    _write_workdir(result, out_workdir, tokenizer, metric, mesh)
    logging.info(
        "wrote the mean of %d checkpoints as step %d of %s", len(sources), step, out_workdir
    )
  if out_hf and jax.process_index() == 0:
    from llada_jax.interop.hf_checkpoint import save_hf  # pylint: disable=g-import-not-at-top

    exported = ml_collections.ConfigDict(config.to_dict())
    exported.data.tokenizer = tokenizer or ""
    files = save_hf(exported, params, out_hf, max_shard_size=hf_max_shard_size, dtype=hf_dtype)
    logging.info("wrote %d safetensors file(s) to %s", len(files), out_hf)
  return result


def _write_workdir(
    result: MergeResult, out_workdir: str, tokenizer: str | None, metric: str, mesh: str
) -> None:
  """Saves result.params as step result.step of a new workdir with a fresh train state (module
  docstring), the source's tokenizer.json beside it and merge.json."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from llada_jax.checkpoint import Checkpointer  # pylint: disable=g-import-not-at-top
  from llada_jax.loading import TOKENIZER_FILE  # pylint: disable=g-import-not-at-top
  from llada_jax.training.optimizer import make_optimizer  # pylint: disable=g-import-not-at-top
  from llada_jax.training.state import TrainState  # pylint: disable=g-import-not-at-top

  config = ml_collections.ConfigDict(result.config.to_dict())
  root = storage.path(out_workdir)
  root.mkdir(parents=True, exist_ok=True)
  if tokenizer is not None:  # kept with the workdir, so that it decodes on any machine
    if jax.process_index() == 0:
      storage.copy_file(tokenizer, root / TOKENIZER_FILE)
    config.data.tokenizer = TOKENIZER_FILE
  tx = make_optimizer(config)
  shardings = jax.tree.map(lambda a: a.sharding, abstract_state(config, mesh))
  step = result.step
  state = jax.jit(
      lambda p: TrainState.fresh(p, tx.init(p)).replace(step=jnp.asarray(step, jnp.int32)),
      out_shardings=shardings,
  )(result.params)
  checkpointer = Checkpointer(out_workdir, config)
  checkpointer.save(step, state, force=True)
  checkpointer.wait()
  checkpointer.close()
  if jax.process_index() == 0:
    record = {
        "step": step,
        "metric": metric,
        "param_dtype": config.model.param_dtype,
        "sources": [dataclasses.asdict(s) for s in result.sources],
    }
    (root / MERGE_RECORD).write_text(json.dumps(record, indent=1) + "\n")


def _define_flags() -> dict[str, Any]:
  """Defines the command's flags (once per process) and returns their holders."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  return dict(
      workdir=flags.DEFINE_multi_string(
          "workdir", [], "Source training workdir; repeat it for several runs of one model."
      ),
      top_k=flags.DEFINE_integer(
          "top_k", None, "Merge the N saved checkpoints with the lowest recorded --metric."
      ),
      steps=flags.DEFINE_list("steps", None, "Merge these saved steps (of every --workdir)."),
      metric=flags.DEFINE_string(
          "metric",
          "loss_bound",
          "Eval value of metrics.jsonl that --top_k ranks by, lowest first.",
      ),
      out_workdir=flags.DEFINE_string(
          "out_workdir", None, "New workdir: the mean at the largest merged step."
      ),
      out_hf=flags.DEFINE_string("out_hf", None, "New HF folder of the mean (llada-convert's)."),
      hf_dtype=flags.DEFINE_enum(
          "hf_dtype", "bfloat16", ["bfloat16", "float32"], "Dtype of --out_hf's tensors."
      ),
      hf_max_shard_size=flags.DEFINE_string(
          "hf_max_shard_size", "5GB", "Largest safetensors file of --out_hf."
      ),
      mesh=flags.DEFINE_enum(
          "mesh",
          "stored",
          list(MESH_CHOICES),
          "stored: the trainer's shardings of the stored config; replicated: a copy per device.",
      ),
  )


def _merge_command(argv: list[str], holders: dict[str, Any]) -> None:
  """The `llada-merge` command: flags checked, then `merge`."""
  if len(argv) > 1:
    raise ConfigError(f"arguments {argv[1:]} are not allowed: expected flags only")
  values = {name: holder.value for name, holder in holders.items()}
  steps = None if values["steps"] is None else parse_steps(values["steps"])
  result = merge(
      values["workdir"],
      top_k=values["top_k"],
      steps=steps,
      out_workdir=values["out_workdir"],
      out_hf=values["out_hf"],
      metric=values["metric"],
      mesh=values["mesh"],
      hf_dtype=values["hf_dtype"],
      hf_max_shard_size=values["hf_max_shard_size"],
  )
  merged = ", ".join(f"{s.workdir}@{s.step}" for s in result.sources)
  print(f"merged {len(result.sources)} checkpoint(s) ({merged}) as step {result.step}", flush=True)


def run() -> None:
  """Console script `llada-merge`."""
  from llada_jax.cli_support import entry_point  # pylint: disable=g-import-not-at-top

  holders = _define_flags()
  entry_point(lambda argv: _merge_command(argv, holders))()


if __name__ == "__main__":
  run()
