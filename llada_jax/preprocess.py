"""Pre-tokenize text corpora into TFRecord shards plus a manifest, for `pretokenized_source`.

  python -m llada_jax.preprocess --input=a.txt,b.jsonl --output_dir=DIR [--vocabulary=byte] \
      [--num_shards=8 --num_workers=2 --text_field=text --errors=raise]

.txt files give one document per paragraph (blank-line separated, every character kept); in .jsonl
files each line is an object whose --text_field is one document. --vocabulary is a data.vocabulary
name ("byte", "spm8k") or the path of any model's tokenizer.json: LLaDA's gives vocabulary
"llada_hf", another's (a Llama folder's) "hf", its BOS/EOS read from the folder's config files.
--input and --output_dir may be gs:// URLs. Every shard must get a document: fewer documents than
--num_shards is refused.
"""

from __future__ import annotations

import time

from absl import flags

from llada_jax.cli_support import entry_point
from llada_jax.data.pretokenized import ERROR_MODES, VocabularySpec, write_shards
from llada_jax.errors import ConfigError

_INPUT = flags.DEFINE_list("input", None, "Comma-separated .txt and .jsonl input files.")
_OUTPUT_DIR = flags.DEFINE_string("output_dir", None, "Where the shards and manifest.json go.")
_VOCABULARY = flags.DEFINE_string(
    "vocabulary",
    "byte",
    "byte, spm8k, or the path of any model's tokenizer.json (LLaDA's: vocabulary llada_hf; "
    "another's: hf, its BOS/EOS read from the config files beside it).",
)
_NUM_SHARDS = flags.DEFINE_integer("num_shards", 8, "Number of TFRecord shards written.")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 2, "Tokenizer processes.")
_TEXT_FIELD = flags.DEFINE_string("text_field", "text", "Field holding the text in .jsonl lines.")
_ERRORS = flags.DEFINE_enum(
    "errors",
    "raise",
    list(ERROR_MODES),
    "raise: a bad document is an error; skip: skip and count it.",
)


def _vocabulary_spec(value: str) -> VocabularySpec:
  if value in ("byte", "spm8k"):
    return VocabularySpec(value)
  return VocabularySpec.of_tokenizer(value)


def _preprocess(argv: list[str]) -> None:
  """The `llada-preprocess` command: tokenizes the inputs into TFRecord shards and a manifest."""
  if len(argv) > 1:
    raise ConfigError(
        f"arguments {argv[1:]} are not allowed: pass the files as " "--input=a.txt,b.jsonl"
    )
  if not _INPUT.value or not _OUTPUT_DIR.value:
    raise ConfigError(
        "--input and --output_dir are required, e.g. --input=corpus.txt --output_dir=data/corpus"
    )
  start = time.perf_counter()
  manifest = write_shards(
      _INPUT.value,
      _OUTPUT_DIR.value,
      _vocabulary_spec(_VOCABULARY.value),
      num_shards=_NUM_SHARDS.value,
      text_field=_TEXT_FIELD.value,
      num_workers=_NUM_WORKERS.value,
      errors=_ERRORS.value,
  )
  seconds = time.perf_counter() - start
  skipped = ", ".join(f"{count:,} {reason}" for reason, count in manifest["skipped"].items())
  print(
      f"wrote {manifest['num_shards']} shards to {_OUTPUT_DIR.value}: "
      f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens "
      f"({manifest['vocabulary']}) in {seconds:.1f} s, {manifest['tokens'] / seconds:,.0f} "
      f"tokens/s; skipped: {skipped}",
      flush=True,
  )


run = entry_point(_preprocess)  # console script `llada-preprocess`


if __name__ == "__main__":
  run()
