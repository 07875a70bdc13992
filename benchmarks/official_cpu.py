"""The compiled exact sampler against the eager PyTorch reference on the same model and prompts.

  python benchmarks/official_cpu.py --workdir=runs/demo --torch_python=/path/to/python-with-torch

Exports the workdir's model as an HF LLaDA checkpoint (float32), runs llada_jax's exact sampler
(greedy, low-confidence) and benchmarks/official/torch_generate.py (the official generate algorithm,
eager PyTorch) on the same prompts, and prints tokens/s of each, the ratio and the fraction of
answer tokens on which the two agree (1.0 unless float32 rounding flips a near tie). Both sides
exclude their first run (compilation, warm-up) and use every core of the machine.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import app, flags

from llada_jax.interop.hf_checkpoint import save_hf
from llada_jax.sampling import generate
from llada_jax.data.codec import text_codec
from llada_jax.loading import load_model

_WORKDIR = flags.DEFINE_string("workdir", "runs/demo", "Trained workdir (make demo).")
_TORCH_PYTHON = flags.DEFINE_string(
    "torch_python", None, "A Python interpreter with torch.", required=True
)
_GEN_LENGTH = flags.DEFINE_integer("gen_length", 112, "Answer length.")
_STEPS = flags.DEFINE_integer("steps", 112, "Steps.")
_BLOCK = flags.DEFINE_integer("block_length", 16, "Block length.")
_BATCH = flags.DEFINE_list("batch", ["1", "8"], "Batch sizes.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per case.")
_SMALL = flags.DEFINE_bool("small", False, "CI-sized: gen 32, steps 32, batch 1, one repeat.")
_JSON = flags.DEFINE_string("json", None, "Also write the rows here.")

PROMPTS = ("ROMEO:\n", "First Citizen:\n", "KING HENRY:\n", "JULIET:\n")


def _prompts(codec, batch: int) -> list[list[int]]:
  """Byte prompts left-padded with their first token (no attention mask on either side)."""
  ids = [list(codec.encode(PROMPTS[i % len(PROMPTS)])) for i in range(batch)]
  width = max(len(i) for i in ids)
  return [[i[0]] * (width - len(i)) + i for i in ids]


def main(argv: list[str]) -> None:
  del argv
  if _SMALL.value:
    flags.FLAGS.gen_length, flags.FLAGS.steps, flags.FLAGS.repeats = 32, 32, 1
    flags.FLAGS.batch = ["1"]
  config, params = load_model(_WORKDIR.value)
  codec = text_codec(config)
  kwargs = dict(steps=_STEPS.value, gen_length=_GEN_LENGTH.value, block_length=_BLOCK.value)
  gen = _GEN_LENGTH.value
  batches = [_prompts(codec, int(b)) for b in _BATCH.value]
  with tempfile.TemporaryDirectory() as tmp:
    save_hf(config, params, tmp, dtype="float32")
    prompts_file, torch_file = pathlib.Path(tmp) / "prompts.json", pathlib.Path(tmp) / "t.json"
    prompts_file.write_text(json.dumps(batches))
    script = pathlib.Path(__file__).parent / "official" / "torch_generate.py"
    subprocess.run(
        [
            _TORCH_PYTHON.value,
            str(script),
            f"--checkpoint={tmp}",
            f"--prompts={prompts_file}",
            f"--out={torch_file}",
            f"--repeats={_REPEATS.value}",
            *(f"--{k}={v}" for k, v in kwargs.items()),
        ],
        check=True,
    )
    reference = json.loads(torch_file.read_text())
  print(
      f"{jax.devices()[0].device_kind}; torch {reference['torch']} with "
      f"{reference['threads']} threads; gen {gen}, steps {_STEPS.value}, block {_BLOCK.value}"
  )
  print("batch | llada_jax tokens/s | PyTorch tokens/s | ratio | answer tokens equal")
  rows = []
  for prompt, torch_run in zip(batches, reference["runs"]):
    prompt = np.asarray(prompt, np.int32)
    out = np.asarray(generate(config, params, prompt, **kwargs))
    start = time.perf_counter()
    for _ in range(_REPEATS.value):
      out = np.asarray(generate(config, params, prompt, **kwargs))
    seconds = (time.perf_counter() - start) / _REPEATS.value
    theirs = np.asarray(torch_run["tokens"])
    row = dict(
        batch=len(prompt),
        jax_tokens_per_s=len(prompt) * gen / seconds,
        torch_tokens_per_s=len(prompt) * gen / torch_run["seconds"],
        agreement=float(np.mean(out[:, -gen:] == theirs[:, -gen:])),
    )
    row["ratio"] = row["jax_tokens_per_s"] / row["torch_tokens_per_s"]
    rows.append(row)
    print(
        f"{row['batch']} | {row['jax_tokens_per_s']:.0f} | {row['torch_tokens_per_s']:.0f} | "
        f"{row['ratio']:.2f}x | {row['agreement']:.3f}",
        flush=True,
    )
  if _JSON.value:
    pathlib.Path(_JSON.value).write_text(
        json.dumps(dict(torch=reference["torch"], rows=rows), indent=1)
    )


if __name__ == "__main__":
  sys.exit(app.run(main))
