"""Every task and mixture llada_jax can train on, and `register_text_task` for a user's own files.

A task here is vocabulary-free: a source of text (or of pre-tokenized ids) and a kind, "pretrain"
(documents become chunks or packed rows) or "sft" (a prompt and a response per example). The seqio
Task that tokenizes it is built on first use for a (vocabulary, packing) pair, named
`{task}.{vocabulary}.{packing}`, so one registration serves every vocabulary.

Built in: `tinyshakespeare`, `gutenberg` (bundled corpora, 90/10 train/validation split at a
paragraph break), `corpora` (the two mixed by their sizes in bytes), `gsm8k_sft` (GSM8K in the
LLaDA-Instruct chat format; train/test splits).

Any other name is looked up in seqio's own registries: a Task or Mixture a seqio/T5X user registered
(in data.task_module) is pre-training data whose `targets` its preprocessors tokenize; llada_jax
chunks or packs them after those preprocessors (`SeqioTaskLayout`).

The tasks built here stop seqio's offline cache (`seqio.CacheDatasetPlaceholder`) after
tokenization: `llada-cache` (Apache Beam) writes the tokenized documents, and
`data.use_cached=True` reads them back and lays them out (chunk/pack) as usual.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import math
import pathlib
import re
import sys
from typing import Any, Callable, Sequence

from llada_jax.config import block_sizes, objective_of
from llada_jax.data import corpora
from llada_jax.data.hf_tokenizer import ChatMessage, render_chat
from llada_jax.errors import ConfigError

SPLITS = ("train", "validation")
KINDS = ("pretrain", "sft")
SFT_DIR = pathlib.Path(__file__).parent / "sft"

# split -> list of records; a record is {"text": str} (pretrain) or {"prompt", "response"} (sft).
Reader = Callable[[str], list[dict[str, str]]]


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A registered task: how to read each split (records in memory, or the directories of
  pre-tokenized shards), and whether to add EOS after each record."""

  name: str
  kind: str
  reader: Reader | None
  append_eos: bool
  splits: tuple[str, ...] = SPLITS
  shard_dirs: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass(frozen=True)
class MixtureSpec:
  """Tasks sampled with the given rates (after each task is chunked or packed)."""

  name: str
  rates: tuple[tuple[str, float], ...]


_TASKS: dict[str, TaskSpec] = {}
_MIXTURES: dict[str, MixtureSpec] = {}


def registered_names() -> list[str]:
  return sorted([*_TASKS, *_MIXTURES])


def register_task(spec: TaskSpec) -> TaskSpec:
  """Adds (or replaces) a task; its seqio Tasks are built when first used."""
  if spec.kind not in KINDS:
    raise ConfigError(f"task kind {spec.kind!r} is not allowed: expected one of {KINDS}")
  if spec.name in _TASKS and "seqio" in sys.modules:  # drop the seqio Tasks of the old spec
    registry = sys.modules["seqio"].TaskRegistry
    for built in [n for n in registry.names() if n.startswith(f"{spec.name}.")]:
      registry.remove(built)
  _TASKS[spec.name] = spec
  return spec


def register_mixture(name: str, rates: dict[str, float]) -> MixtureSpec:
  """Adds a mixture of registered pre-training tasks, sampled in proportion to `rates`."""
  for task, rate in rates.items():
    if task not in _TASKS:
      raise ConfigError(
          f"mixture {name!r}: unknown task {task!r}; registered: {registered_names()}"
      )
    if rate <= 0:
      raise ConfigError(f"mixture {name!r}: rate {rate} of {task!r} is not allowed: expected > 0")
  _MIXTURES[name] = MixtureSpec(name, tuple(rates.items()))
  return _MIXTURES[name]


def lookup(name: str) -> TaskSpec | MixtureSpec | None:
  """The task or mixture registered here as `name`; None for other names (e.g. seqio's)."""
  return _TASKS.get(name) or _MIXTURES.get(name)


def task_kind(name: str) -> str:
  """The kind, "pretrain" or "sft", of a registered task or mixture (a seqio user's: "pretrain")."""
  if name in _MIXTURES:
    return task_kind(_MIXTURES[name].rates[0][0])
  if name not in _TASKS and _seqio_registered(name):
    return "pretrain"
  return _spec(name).kind


def _seqio_registered(name: str) -> bool:
  """Whether a seqio user registered `name` (seqio is only imported when a pipeline is built)."""
  seqio = sys.modules.get("seqio")
  return seqio is not None and (
      name in seqio.TaskRegistry.names() or name in seqio.MixtureRegistry.names()
  )


def _spec(name: str) -> TaskSpec:
  if name not in _TASKS:
    raise ConfigError(
        f"data.task={name!r} is not a registered task or mixture (of llada_jax, or "
        f"of seqio's registries after data.task_module); registered: "
        f"{', '.join(registered_names())}"
    )
  return _TASKS[name]


def _check_split(spec: TaskSpec, split: str) -> None:
  if split not in spec.splits:
    raise ConfigError(f"task {spec.name!r} has no split {split!r}; it has {spec.splits}")


def _records_dataset(spec: TaskSpec, split: str, shuffle_files: bool, seed: int | None = None):
  """The source's records as a tf.data.Dataset (records stay in file order; shuffling is later)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  del shuffle_files, seed
  records = spec.reader(split)
  if not records:
    raise ConfigError(f"task {spec.name!r} split {split!r} holds no records")
  keys = records[0].keys()
  return tf.data.Dataset.from_tensor_slices({k: [r[k] for r in records] for k in keys})


def _tokenize(dataset, vocabulary, fields: Sequence[str], rename: dict[str, str]):
  """Encodes the string `fields` with `vocabulary` (int32), renaming them by `rename`."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  def encode(ex):
    return {rename.get(f, f): tf.cast(vocabulary.encode_tf(ex[f]), tf.int32) for f in fields}

  return dataset.map(encode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def layout_of(config: Any) -> str:
  """How config's documents become rows, as the registry names it (`preprocessors.layout`):
  data.packing "chunk" or "pack"; for a model trained in blocks under "pack", "pack<A>": each
  document starts at a multiple of A tokens, the least common multiple of its block sizes below
  data.sequence_length, so that a packed document's blocks are those it has alone (with its
  segment ids, LLaDA 2.0's document-level attention; docs/block.md)."""
  packing = config.data.packing
  if packing != "pack" or not objective_of(config).blocks:
    return packing
  sizes = [b for b in block_sizes(config) if b < config.data.sequence_length]
  align = math.lcm(*sizes) if sizes else 1
  return f"pack{align}" if align > 1 else packing


def seqio_provider(name: str, vocabulary_name: str, vocabulary, packing: str):
  """The seqio Task or Mixture for a registered name, built once per (vocabulary, layout):
  `packing` is a layout name (`layout_of`)."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from llada_jax.data import preprocessors  # pylint: disable=g-import-not-at-top

  full_name = f"{name}.{vocabulary_name}.{packing}"
  if full_name in seqio.MixtureRegistry.names():
    return seqio.MixtureRegistry.get(full_name)
  if full_name in seqio.TaskRegistry.names():
    return seqio.TaskRegistry.get(full_name)
  if name not in _TASKS and name not in _MIXTURES and _seqio_registered(name):
    return SeqioTaskLayout(seqio.get_mixture_or_task(name), vocabulary_name, vocabulary, packing)
  if name in _MIXTURES:
    tasks = [
        (seqio_provider(t, vocabulary_name, vocabulary, packing), rate)
        for t, rate in _MIXTURES[name].rates
    ]
    return seqio.MixtureRegistry.add(full_name, tasks)

  spec = _spec(name)
  eos = vocabulary.eos_id
  if spec.shard_dirs:
    return _pretokenized_task(full_name, spec, vocabulary_name, vocabulary, packing)
  # Everything before the placeholder is what `llada-cache` writes (tokenized records); the layout
  # after it depends on data.sequence_length and runs when the task is read, cached or not.
  if spec.kind == "sft":
    steps = [
        functools.partial(
            _tokenize, vocabulary=vocabulary, fields=("prompt", "response"), rename={}
        ),
        seqio.CacheDatasetPlaceholder(),
        lambda ds, sequence_length: preprocessors.sft_layout(ds, sequence_length["targets"], eos),
    ]
  else:
    layout = preprocessors.layout(packing)
    steps = [
        functools.partial(
            _tokenize, vocabulary=vocabulary, fields=("text",), rename={"text": "targets"}
        )
    ]
    if spec.append_eos:
      steps.append(functools.partial(preprocessors.append_eos, eos_id=eos))
    steps += [
        seqio.CacheDatasetPlaceholder(),
        lambda ds, sequence_length: layout(ds, sequence_length["targets"]),
    ]
  return seqio.TaskRegistry.add(
      full_name,
      source=seqio.FunctionDataSource(
          functools.partial(_records_dataset, spec), splits=spec.splits
      ),
      preprocessors=steps,
      output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
  )


class SeqioTaskLayout:
  """A seqio user's Task or Mixture, its examples' `targets` chunked or packed by llada_jax.

  Each task's dataset is read with the user's preprocessors (given data.sequence_length, without
  seqio's final trim, so a document keeps all its tokens unless a preprocessor cuts it), reduced
  to int32 `targets` with empty documents dropped, then laid out; a mixture samples its tasks'
  rows with their seqio rates (seeded like `seqio.Mixture`). Its `get_dataset` takes the
  arguments of `seqio.Task.get_dataset` that the pipeline passes; `tasks` holds the
  (seqio Task, rate) pairs.

  Raises:
    ConfigError: a task without a `targets` output feature, or whose vocabulary's size or EOS id
      differ from the configured vocabulary's (data.vocabulary, tokens.eos_id).
  """

  def __init__(self, provider, vocabulary_name: str, vocabulary, packing: str):
    import seqio  # pylint: disable=g-import-not-at-top

    self.name = provider.name
    if isinstance(provider, seqio.Mixture):
      self.tasks = [(task, provider.get_rate(task)) for task in provider.tasks]
    else:
      self.tasks = [(provider, 1.0)]
    self._packing = packing
    for task, _ in self.tasks:
      feature = task.output_features.get("targets")
      if feature is None:
        raise ConfigError(
            f"data.task={self.name!r} is not allowed: seqio task {task.name!r} has "
            f"no 'targets' output feature (it has {sorted(task.output_features)})"
        )
      theirs, ours = feature.vocabulary, vocabulary
      if (theirs.vocab_size, theirs.eos_id) != (ours.vocab_size, ours.eos_id):
        raise ConfigError(
            f"data.vocabulary={vocabulary_name!r} ({ours.vocab_size} ids, EOS {ours.eos_id}) is "
            f"not allowed for seqio task {task.name!r}: its 'targets' vocabulary has "
            f"{theirs.vocab_size} ids and EOS {theirs.eos_id}"
        )

  def get_dataset(
      self,
      sequence_length: dict[str, int],
      split: str,
      shuffle: bool,
      seed: int | None,
      shard_info,
      num_epochs: int | None,
      use_cached: bool = False,
  ):
    """Rows of sequence_length["targets"] tokens (plus segment ids and positions when packed)."""
    import tensorflow as tf  # pylint: disable=g-import-not-at-top

    from llada_jax.data import preprocessors  # pylint: disable=g-import-not-at-top

    layout = preprocessors.layout(self._packing)
    length = sequence_length["targets"]
    rows, rates = [], []
    for task, rate in self.tasks:
      if split not in task.splits:
        continue
      documents = task.get_dataset(
          sequence_length=sequence_length,
          split=split,
          use_cached=use_cached,
          shuffle=shuffle,
          seed=seed,
          shard_info=shard_info,
          num_epochs=num_epochs,
          trim_output_features=False,
      )
      documents = documents.map(
          lambda ex: {"targets": tf.cast(ex["targets"], tf.int32)},
          num_parallel_calls=tf.data.AUTOTUNE,
          deterministic=True,
      )
      rows.append(layout(documents.filter(lambda ex: tf.size(ex["targets"]) > 0), length))
      rates.append(rate)
    if not rows:
      raise ConfigError(f"data.task={self.name!r} has no split {split!r}")
    if len(rows) == 1:
      return rows[0]
    return tf.data.Dataset.sample_from_datasets(rows, rates, seed=seed, stop_on_empty_dataset=True)


def seqio_tasks(provider) -> list:
  """The seqio Tasks a provider of `seqio_provider` reads (a mixture's, or the task itself)."""
  import seqio  # pylint: disable=g-import-not-at-top

  if isinstance(provider, SeqioTaskLayout):
    return [task for task, _ in provider.tasks]
  return list(provider.tasks) if isinstance(provider, seqio.Mixture) else [provider]


def check_cached(provider, cache_dir: str) -> None:
  """Adds `cache_dir` (if any) to seqio's cache directories and checks that every task of the
  provider has a complete offline cache there or in a directory its task module added.

  Raises:
    ConfigError: a task that cannot be cached, or that no cache directory holds.
  """
  import seqio  # pylint: disable=g-import-not-at-top

  if cache_dir and cache_dir not in seqio.get_global_cache_dirs():
    seqio.add_global_cache_dirs([cache_dir])
  for task in seqio_tasks(provider):
    if not task.supports_caching:
      raise ConfigError(
          f"data.use_cached=True is not allowed for seqio task {task.name!r}: its "
          "preprocessors hold no seqio.CacheDatasetPlaceholder"
      )
    if not task.cache_dir:
      raise ConfigError(
          f"data.use_cached=True: seqio task {task.name!r} is not cached in "
          f"{seqio.get_global_cache_dirs()} (data.cache_dir={cache_dir!r}); write "
          f"it with llada-cache"
      )


def _pretokenized_task(
    full_name: str, spec: TaskSpec, vocabulary_name: str, vocabulary, packing: str
):
  """The seqio Task over llada-preprocess shards, refusing a vocabulary other than theirs."""
  import seqio  # pylint: disable=g-import-not-at-top
  import tensorflow as tf  # pylint: disable=g-import-not-at-top

  from llada_jax.data import pretokenized, preprocessors  # pylint: disable=g-import-not-at-top

  for _, directory in spec.shard_dirs:
    pretokenized.check_vocabulary(
        pretokenized.read_manifest(directory), vocabulary_name, vocabulary.vocab_size
    )
  layout = preprocessors.layout(packing)
  steps = [pretokenized.densify]
  if spec.append_eos:
    steps.append(functools.partial(preprocessors.append_eos, eos_id=vocabulary.eos_id))
  steps.append(lambda ds, sequence_length: layout(ds, sequence_length["targets"]))
  return seqio.TaskRegistry.add(
      full_name,
      source=pretokenized.pretokenized_source(dict(spec.shard_dirs)),
      preprocessors=steps,
      output_features={"targets": seqio.Feature(vocabulary, add_eos=False, dtype=tf.int32)},
  )


def register_pretokenized_task(
    name: str, train_dir: str, validation_dir: str = "", *, append_eos: bool = True
) -> TaskSpec:
  """Registers a pre-training task over `llada-preprocess` shards (local or gs:// directories).

  Shards store documents without EOS; `append_eos` (default) separates them with one. A host
  reads whole files, so write at least as many shards as data.num_shards.
  """
  dirs = (("train", train_dir),) + ((("validation", validation_dir),) if validation_dir else ())
  return register_task(
      TaskSpec(name, "pretrain", None, append_eos, tuple(s for s, _ in dirs), dirs)
  )


def count_too_long(name: str, split: str, vocabulary, length: int) -> tuple[int, int]:
  """(examples that do not fit, all examples) of an SFT task: prompt + response + one EOS must
  fit in `length` tokens."""
  spec = _spec(name)
  _check_split(spec, split)
  records = spec.reader(split)
  too_long = sum(
      len(vocabulary.encode(r["prompt"])) + len(vocabulary.encode(r["response"])) >= length
      for r in records
  )
  return too_long, len(records)


def _paragraphs(text: str) -> list[dict[str, str]]:
  """Splits text after each run of blank lines; the records concatenate to the text exactly."""
  return [{"text": p} for p in re.findall(r"(?s).+?(?:\n\n+|\Z)", text)]


def _read_corpus(name: str, split: str) -> list[dict[str, str]]:
  return _paragraphs(corpora.split_text(name)[split])


def _read_gsm8k(split: str) -> list[dict[str, str]]:
  """GSM8K as chat turns: the question as the user's message, the worked answer (calculator
  annotations <<...>> removed) ending in "#### N" and <|eot_id|> as the assistant's."""
  path = SFT_DIR / "gsm8k" / ("train.jsonl" if split == "train" else "test.jsonl")
  records = []
  for ex in read_jsonl_objects(path, ("question", "answer")):
    answer = re.sub(r"<<[^>]*>>", "", ex["answer"]).strip()
    records.append(
        {
            "prompt": render_chat([ChatMessage("user", ex["question"])]),
            "response": answer + "<|eot_id|>",
        }
    )
  return records


# Verifiable SFT tasks a tiny model learns in minutes on a CPU (docs/recipe.md, the post-training
# benchmark): every three-letter word over an alphabet reversed, "abf>" -> "fba"; the first words
# of a fixed permutation form the validation split. reverse_sft: the 216 words over a-f, 40 held
# out (memorisable: SFT sees every training word many times); reverse_az_sft: the 17,576 words over
# a-z, 400 held out (800 SFT steps of 16 see fewer records than there are training words, so what
# carries to held-out words is the rule, not memory).
REVERSE_TASKS = {
    "reverse_sft": ("abcdef", 40),
    "reverse_az_sft": ("abcdefghijklmnopqrstuvwxyz", 400),
}


def reverse_words(split: str, task: str = "reverse_sft") -> list[dict[str, str]]:
  """The records {prompt: "abf>", response: "fba"} of split ("train", "validation") of a
  REVERSE_TASKS task.

  Raises:
    KeyError: a task that is not in REVERSE_TASKS.
  """
  import numpy as np  # pylint: disable=g-import-not-at-top

  alphabet, held_out = REVERSE_TASKS[task]
  words = [a + b + c for a in alphabet for b in alphabet for c in alphabet]
  shuffled = [words[i] for i in np.random.default_rng(0).permutation(len(words))]
  chosen = shuffled[:held_out] if split == "validation" else shuffled[held_out:]
  return [{"prompt": f"{w}>", "response": w[::-1]} for w in chosen]


def _decode_utf8(path: pathlib.Path) -> str:
  data = path.read_bytes()
  try:
    return data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise ConfigError(
        f"{path}: undecodable byte at offset {e.start} (expected UTF-8 text)"
    ) from None


def read_jsonl_objects(path: pathlib.Path, fields: Sequence[str]) -> list[dict[str, str]]:
  """The objects of a JSONL file; a bad line names file:line and what is wrong with it."""
  return [obj for _, obj in read_jsonl_lines(path, fields)]


def read_jsonl_lines(path: pathlib.Path, fields: Sequence[str]) -> list[tuple[int, dict[str, Any]]]:
  """(line number, object) of each non-blank line of a JSONL file, each object with a string in
  every one of `fields`; ConfigError naming file:line and what is wrong with a bad line."""
  out = []
  for number, line in enumerate(_decode_utf8(path).split("\n"), start=1):
    if not line.strip():
      continue
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise ConfigError(f"{path}:{number}: not a JSON object ({e.msg})") from None
    missing = [f for f in fields if not isinstance(obj, dict) or not isinstance(obj.get(f), str)]
    if missing:
      raise ConfigError(f"{path}:{number}: no string field {missing[0]!r}")
    out.append((number, obj))
  return out


def _read_files(files: Sequence[pathlib.Path], text_field: str) -> list[dict[str, str]]:
  """Records of text files (one per paragraph) and JSONL files (one per line's text_field)."""
  records = []
  for path in files:
    if path.suffix == ".jsonl":
      records += [
          {"text": obj[text_field]}
          for obj in read_jsonl_objects(path, (text_field,))
          if obj[text_field]
      ]
    else:
      records += _paragraphs(_decode_utf8(path))
  return records


def register_text_task(
    name: str,
    files: Sequence[str | pathlib.Path],
    validation_files: Sequence[str | pathlib.Path] = (),
    *,
    text_field: str = "text",
    append_eos: bool | None = None,
) -> TaskSpec:
  """Registers a pre-training task over the user's .txt and .jsonl files, usable as data.task.

  .txt files are read as paragraphs (blank-line separated, all characters kept); in .jsonl files
  every line is an object whose `text_field` is one document. `append_eos` (default: True when
  every file is JSONL) puts EOS after each record, i.e. treats records as separate documents.
  The "validation" split reads `validation_files`. Files are read when the task is first used;
  for corpora beyond memory, pre-tokenize them with `llada-preprocess`.
  """
  paths = {
      "train": [pathlib.Path(f) for f in files],
      "validation": [pathlib.Path(f) for f in validation_files],
  }
  if not paths["train"]:
    raise ConfigError(f"register_text_task({name!r}): no files given")
  for path in paths["train"] + paths["validation"]:
    if not path.is_file():
      raise ConfigError(f"register_text_task({name!r}): {path} is not a file")
  if append_eos is None:
    append_eos = all(p.suffix == ".jsonl" for p in paths["train"])
  splits = tuple(s for s in SPLITS if paths[s])
  return register_task(
      TaskSpec(
          name, "pretrain", lambda split: _read_files(paths[split], text_field), append_eos, splits
      )
  )


for _corpus in corpora.CORPUS_FILES:
  register_task(TaskSpec(_corpus, "pretrain", functools.partial(_read_corpus, _corpus), False))
register_task(TaskSpec("gsm8k_sft", "sft", _read_gsm8k, False))
for _task in REVERSE_TASKS:
  register_task(TaskSpec(_task, "sft", functools.partial(reverse_words, task=_task), True))
register_mixture(
    "corpora", {c: float(corpora.corpus_path(c).stat().st_size) for c in corpora.CORPUS_FILES}
)


def import_task_module(module: str) -> None:
  """Imports data.task_module (where users register their tasks), if one is named.

  Raises:
    ConfigError: the module cannot be imported (one line with the import error).
  """
  if not module:
    return
  try:
    importlib.import_module(module)
  except ImportError as e:
    raise ConfigError(f"data.task_module={module!r} cannot be imported: {e}") from None
