"""Which sampler settings give the demo model's best text (the settings `make demo` prints with).

  python benchmarks/demo_samples.py --workdir=runs/demo [--seeds=4]

Scores each setting by two numbers computed against the bundled Tiny Shakespeare text (an
independent judge, not the model): the share of generated words that are words of the corpus
(real-word rate), and the share of distinct word bigrams (a sampler that repeats one frequent word
scores low). Prints a table, best first by real-word rate x distinct bigrams.
"""

from __future__ import annotations

import os
import re
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402  pylint: disable=wrong-import-position

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "The trained demo workdir.")
_SEEDS = flags.DEFINE_integer("seeds", 4, "Samples per prompt and setting.")
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 112, "Answer bytes.")

PROMPTS = ("ROMEO:", "First Citizen:", "KING HENRY:", "JULIET:", "MENENIUS:")
WORD = re.compile(r"[a-z']+")
# name -> sampler options (steps = gen_length: one byte committed per step)
SETTINGS = {
    "random remasking, T=1, one block": dict(remasking="random", temperature=1.0, block_length=112),
    "random remasking, T=0.8, one block": dict(
        remasking="random", temperature=0.8, block_length=112
    ),
    "random remasking, T=0.8, blocks of 16": dict(
        remasking="random", temperature=0.8, block_length=16
    ),
    "low confidence, T=0, blocks of 16": dict(
        remasking="low_confidence", temperature=0.0, block_length=16
    ),
    "low confidence, T=0.5, blocks of 16": dict(
        remasking="low_confidence", temperature=0.5, block_length=16
    ),
    "low confidence, T=0.8, blocks of 16": dict(
        remasking="low_confidence", temperature=0.8, block_length=16
    ),
    "low confidence, T=0.8, blocks of 8": dict(
        remasking="low_confidence", temperature=0.8, block_length=8
    ),
    "low confidence, T=0.8, blocks of 4": dict(
        remasking="low_confidence", temperature=0.8, block_length=4
    ),
    "low confidence, T=1, blocks of 8": dict(
        remasking="low_confidence", temperature=1.0, block_length=8
    ),
    "low confidence, T=0.8, one block": dict(
        remasking="low_confidence", temperature=0.8, block_length=112
    ),
    "margin, T=0.8, blocks of 16": dict(remasking="margin", temperature=0.8, block_length=16),
}


def corpus_words() -> set[str]:
  from llada_jax.data.corpora import split_text  # pylint: disable=g-import-not-at-top

  return set(WORD.findall(split_text("tinyshakespeare")["train"].lower()))


def score(texts: list[str], vocabulary: set[str]) -> tuple[float, float]:
  """(real-word rate, distinct word bigrams) over all texts."""
  words = [w for t in texts for w in WORD.findall(t.lower())]
  real = sum(w in vocabulary for w in words) / max(len(words), 1)
  bigrams = [
      tuple(p) for t in texts for p in zip(WORD.findall(t.lower()), WORD.findall(t.lower())[1:])
  ]
  return real, len(set(bigrams)) / max(len(bigrams), 1)


def main(argv: list[str]) -> None:
  del argv
  from llada_jax.loading import load_model  # pylint: disable=g-import-not-at-top
  from llada_jax.sampling.text import sample  # pylint: disable=g-import-not-at-top

  config, params = load_model(_WORKDIR.value)
  vocabulary = corpus_words()
  rows = []
  for name, options in SETTINGS.items():
    start = time.perf_counter()
    texts = []
    for seed in range(_SEEDS.value):
      texts += sample(
          config,
          params,
          texts=list(PROMPTS),
          seed=seed,
          gen_length=_GEN_LENGTH.value,
          steps=_GEN_LENGTH.value,
          **options,
      )["text"]
    real, distinct = score(texts, vocabulary)
    rows.append((real * distinct, real, distinct, name, texts[0], time.perf_counter() - start))
  print("| setting | real-word rate | distinct bigrams | product | seconds |")
  print("|---|---|---|---|---|")
  for product, real, distinct, name, _, seconds in sorted(rows, reverse=True):
    print(f"| {name} | {real:.3f} | {distinct:.3f} | {product:.3f} | {seconds:.0f} |")
  best = max(rows)
  print(f"\nbest: {best[3]}\n{PROMPTS[0]}{best[4]}")


if __name__ == "__main__":
  app.run(main)
