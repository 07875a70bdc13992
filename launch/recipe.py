"""The LLaDA 2.0 recipe end to end on the tiny model: every stage of configs/recipes/, the merge,
and the numbers of each stage (docs/recipe.md).

  python launch/recipe.py --root=runs/recipe            # about 9 minutes on two CPU cores
  python launch/recipe.py --root=/tmp/r --scale=toy     # seconds-scale (tests/test_recipe.py)

Stages, each a workdir ROOT/<stage> started from the one before (train.init_from):
  arm        the autoregressive model (objective arm) on Tiny Shakespeare bytes;
  block      block diffusion from it: block-size warm-up 1 -> 4 -> 16, an MDM phase at L, decay to
             4; noise on the mask embedding; document-level attention under packing;
  sft_nocap  SFT on reversal with complementary masking (the control of CAP);
  sft        the same with CAP;
  dpo        ELBO-DPO (VRPO) from sft on reversal preference pairs (ROOT/data: chosen the
             reversed word, rejected it with its first two letters swapped);
  merged     llada-merge of dpo's last two checkpoints.
A stage whose workdir already holds its last step is not trained again (rerunning resumes the
chain). Then each model from sft_nocap on answers the 40 held-out reversal prompts greedily with
confidence-threshold decoding at --tau: its accuracy, the tokens it commits per forward pass, and
the Monte-Carlo bound on log p(correct answer | prompt) (nats); for sft_nocap and sft also at
each saved step, so that CAP's tokens per step compare with its control's at equal likelihood. The
table goes to stdout, the numbers to ROOT/recipe.json and, as its last line, one JSON object.
"""

from __future__ import annotations

import importlib
import json
import pathlib
import sys
import time

from absl import flags, logging

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # configs/ and llada_jax/ without an installed package

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs.recipes import common  # noqa: E402
from llada_jax import checkpoint  # noqa: E402
from llada_jax.analysis.runs import read_records  # noqa: E402
from llada_jax.cli_support import entry_point  # noqa: E402
from llada_jax.config import validate  # noqa: E402
from llada_jax.data.codec import text_codec  # noqa: E402
from llada_jax.data.registry import reverse_words  # noqa: E402
from llada_jax.diffusion.likelihood import score_pairs  # noqa: E402
from llada_jax.errors import CheckpointError, ConfigError  # noqa: E402
from llada_jax.keys import item_keys  # noqa: E402
from llada_jax.loading import load_model, serving_abstract_params  # noqa: E402
from llada_jax.sampling.ending import end_answer  # noqa: E402
from llada_jax.sampling.generate import generate  # noqa: E402
from llada_jax.training.loop import train  # noqa: E402

_ROOT = flags.DEFINE_string("root", "runs/recipe", "Where the stages' workdirs and data go.")
_SCALE = flags.DEFINE_enum("scale", "cpu", list(common.SCALES), "cpu: docs/recipe.md; toy: tests.")
_TAU = flags.DEFINE_float(
    "tau", 0.9, "Confidence threshold of the measured decoding (0 < tau < 1)."
)
_MC = flags.DEFINE_integer("mc_num", 32, "Monte-Carlo samples of each answer's likelihood bound.")

# (workdir, config module, config argument suffix) in the order they train.
TRAINED = (
    ("arm", "arm", ""),
    ("block", "block", ""),
    ("sft_nocap", "sft", ",nocap"),
    ("sft", "sft", ""),
    ("dpo", "dpo", ""),
)
MEASURED = ("sft_nocap", "sft", "dpo", "merged")


def stage_config(root: pathlib.Path, scale: str, module: str, suffix: str):
  """The validated config of configs/recipes/<module>.py for ROOT and the scale."""
  config_module = importlib.import_module(f"configs.recipes.{module}")
  return validate(config_module.get_config(f"{root},{scale}{suffix}"))


def _swapped(answer: str) -> str:
  return answer[1] + answer[0] + answer[2:]


def write_preferences(root: pathlib.Path) -> None:
  """ROOT/data/preferences{,_eval}.jsonl: per reversal record of the train (validation) split,
  chosen the reversed word, rejected it with its first two letters swapped (a near miss, the
  errors the SFT model makes; answers whose two are equal left out)."""
  data = root / "data"
  data.mkdir(parents=True, exist_ok=True)
  for split, name in (("train", "preferences.jsonl"), ("validation", "preferences_eval.jsonl")):
    lines = [
        json.dumps(
            {"prompt": r["prompt"], "chosen": r["response"], "rejected": _swapped(r["response"])}
        )
        for r in reverse_words(split)
        if r["response"] != _swapped(r["response"])
    ]
    (data / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def final_bound(workdir: pathlib.Path) -> dict[str, float]:
  """The last held-out loss_bound and bits_per_byte of a workdir's metrics.jsonl."""
  out = {}
  for record in read_records(workdir / "metrics.jsonl"):  # sorted by split, then step
    if record["split"] == "eval":
      out.update({k: record[k] for k in ("loss_bound", "bits_per_byte") if k in record})
  return out


def merge_last_two(root: pathlib.Path) -> None:
  """ROOT/merged: llada-merge of the last two saved checkpoints of ROOT/dpo (in a subprocess,
  the command line as a user types it)."""
  import subprocess  # pylint: disable=g-import-not-at-top

  steps = checkpoint.saved_steps(str(root / "dpo"))
  command = [
      sys.executable,
      "-m",
      "llada_jax.merge",
      f"--workdir={root / 'dpo'}",
      f"--steps={','.join(map(str, steps[-2:]))}",
      f"--out_workdir={root / 'merged'}",
  ]
  done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
  if done.returncode:
    raise ConfigError(f"llada-merge failed: {done.stderr.strip().splitlines()[-1]}")


def answer_numbers(
    workdir: pathlib.Path, tau: float, mc_num: int, step: int | None = None
) -> dict[str, float]:
  """On the held-out reversal prompts: exact-match accuracy of greedy threshold decoding at tau,
  the answer tokens it commits per forward pass, and the mean bound on log p(answer | prompt); of
  the newest checkpoint of workdir, or of `step`."""
  if step is None:
    config, params = load_model(str(workdir))
  else:
    config = checkpoint.load_config(workdir, step)
    params = checkpoint.load_params(workdir, step, serving_abstract_params(config))
  codec = text_codec(config)
  records = reverse_words("validation")
  prompts = np.asarray([codec.encode(r["prompt"]) for r in records], np.int32)
  keys = item_keys(jax.random.PRNGKey(0), len(records))
  out, passes = generate(
      config, params, prompts, rng=keys, parallel_threshold=tau, return_steps=True
  )
  answers = [
      end_answer(row, config.tokens, codec.decode)[1]
      for row in np.asarray(out)[:, prompts.shape[1] :].tolist()
  ]
  correct = [codec.encode(r["response"]) + [config.tokens.eos_id] for r in records]
  bound = score_pairs(
      config, params, prompts.tolist(), correct, keys, mc_num=mc_num, batch_size=mc_num
  )
  return {
      "accuracy": float(np.mean([a == r["response"] for a, r in zip(answers, records)])),
      "tokens_per_step": float(config.sampling.gen_length * len(records) / np.sum(passes)),
      "answer_log_likelihood": float(np.mean(bound.log_likelihood)),
  }


class StageStopped(ConfigError):
  """A stage's trainer returned before its last step (it was asked to stop and saved)."""


def _last_step(workdir: pathlib.Path) -> int | None:
  try:
    return checkpoint.latest_step(workdir)
  except CheckpointError:
    return None


def run_recipe(
    root: pathlib.Path, scale: str, tau: float, mc_num: int
) -> tuple[dict[str, dict], dict[str, float]]:
  """Trains the missing stages, merges, measures; returns ({stage: numbers}, {stage trained in
  this call: its wall-clock seconds})."""
  if not 0 < tau < 1:
    raise ConfigError(f"--tau={tau} is not allowed: expected a confidence threshold in (0, 1)")
  write_preferences(root)
  numbers, seconds = {}, {}
  for name, module, suffix in TRAINED:
    config = stage_config(root, scale, module, suffix)
    workdir = root / name
    if _last_step(workdir) != config.train.num_steps:
      logging.info("recipe: training %s (%d steps)", name, config.train.num_steps)
      start = time.perf_counter()
      train(config, workdir)
      seconds[name] = time.perf_counter() - start
      if _last_step(workdir) != config.train.num_steps:  # SIGTERM / Ctrl-C: saved, then returned
        raise StageStopped(
            f"stage {name} stopped before its last step {config.train.num_steps} (newest "
            f"checkpoint: {_last_step(workdir)}): rerun the same command to resume it"
        )
    numbers[name] = final_bound(workdir)
  if not (root / "merged" / "checkpoints").is_dir():
    merge_last_two(root)
  for name in MEASURED:
    numbers.setdefault(name, {}).update(answer_numbers(root / name, tau, mc_num))
  for name in ("sft_nocap", "sft"):  # CAP against its control at every saved step
    numbers[name]["by_step"] = {
        step: answer_numbers(root / name, tau, mc_num, step)
        for step in checkpoint.saved_steps(str(root / name))
    }
  return numbers, seconds


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise ConfigError(f"unexpected arguments {argv[1:]}: expected only --flags")
  root = pathlib.Path(_ROOT.value)
  numbers, seconds = run_recipe(root, _SCALE.value, _TAU.value, _MC.value)
  for name, values in numbers.items():
    print(f"{name:10s} " + "  ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "by_step"))
    for step, at in values.get("by_step", {}).items():
      print(f"  step {step:5d} " + "  ".join(f"{k} {v:.4g}" for k, v in at.items()))
  document = {
      "scale": _SCALE.value,
      "tau": _TAU.value,
      "device": jax.devices()[0].device_kind,
      "stages": numbers,
      "train_seconds": seconds,
  }
  (root / "recipe.json").write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
  print(json.dumps(document))


main = entry_point(_main)


if __name__ == "__main__":
  main()
