"""Text corpora bundled with the package (each folder keeps its SOURCE.txt and licence)."""

from __future__ import annotations

import functools
import math
import pathlib

import numpy as np

CORPORA_DIR = pathlib.Path(__file__).parent / "corpora"
VALIDATION_FRACTION = 0.1
# Bundled corpus -> its text file (named as in the corpus's SOURCE.txt).
CORPUS_FILES = {"tinyshakespeare": "input.txt", "gutenberg": "corpus.txt"}


def corpus_path(name: str) -> pathlib.Path:
  """Path of a bundled corpus file, e.g. corpus_path('tinyshakespeare')."""
  return CORPORA_DIR / name / CORPUS_FILES[name]


@functools.lru_cache(maxsize=4)
def split_text(name: str) -> dict[str, str]:
  """{'train': first 90%, 'validation': last 10%}, cut at the paragraph break nearest 90%."""
  text = corpus_path(name).read_text(encoding="utf-8")
  cut = text.find("\n\n", int(len(text) * (1.0 - VALIDATION_FRACTION))) + 2
  return {"train": text[:cut], "validation": text[cut:]}


def unigram_entropy_bits(name: str, split: str = "train") -> float:
  """Entropy of the byte distribution of a corpus split, in bits per byte.

  A model that ignores context can do no better than this; the loss bound of a trained mask
  predictor must fall below it.
  """
  data = np.frombuffer(split_text(name)[split].encode("utf-8"), dtype=np.uint8)
  probs = np.bincount(data, minlength=256) / data.size
  probs = probs[probs > 0]
  return float(-(probs * np.log2(probs)).sum())


def bits_per_byte(loss_nats_per_token: float, tokens_per_byte: float = 1.0) -> float:
  """Converts a loss in nats per token into bits per byte of text."""
  return loss_nats_per_token * tokens_per_byte / math.log(2)
