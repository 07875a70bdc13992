"""Post-training on the CPU: ELBO-DPO with VRPO on the tiny model, and VRPO's variance reduction.

  python benchmarks/posttrain.py --quick [--workdir=DIR] [--json=FILE]

1. Reference: configs/tiny.py trained on Tiny Shakespeare (--ref_steps steps).
2. Preference pairs from the bundled corpus: prompt = `--prompt_bytes` bytes of text, chosen =
   the real next `--answer_bytes` bytes, rejected = the same bytes in another order (a fixed
   permutation per pair: the same letters, corrupted text). Training pairs from the train split,
   held-out pairs from the validation split.
3. DPO through llada-train's trainer (posttrain.method="dpo", the reference frozen beside it).

The last line printed is one JSON object:
  dpo_margin_before / dpo_margin_after: the held-out mean of B(chosen) - B(rejected) (nats, the
    bound of `likelihood.bound_estimator`, mc_num samples, the same masks before and after) under
    the reference and under the DPO policy: how much more likely real text is than its corruption.
  vrpo_var_ratio: the variance over 32 seeds of the DPO loss estimate on a fixed batch of
    held-out pairs (policy after DPO against the reference), VRPO's estimator (n stratified
    timesteps, masks shared by policy and reference) over the naive one (one timestep, independent
    masks), both with n = mc_num samples per bound.
  grpo_reward_before / grpo_reward_after: not measured yet (diffu-GRPO is not built): null.
Plus the settings and the wall time of each part (CPU).
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from llada_jax.data.corpora import split_text  # noqa: E402
from llada_jax.diffusion.likelihood import bound_estimator  # noqa: E402
from llada_jax.loading import load_model  # noqa: E402
from llada_jax.posttrain.dpo import dpo_loss, pack_preferences  # noqa: E402
from llada_jax.posttrain.preference import read_preferences  # noqa: E402
from llada_jax.posttrain.source import PreferenceSource  # noqa: E402
from llada_jax.training.loop import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "the CPU-minutes sizes (the defaults below are the full ones)")
flags.DEFINE_string("workdir", "", "where the runs go (default: a temporary folder)")
flags.DEFINE_string("json", "", "also write the result here")
flags.DEFINE_integer("ref_steps", 1500, "training steps of the reference (--quick: 300)")
flags.DEFINE_integer("dpo_steps", 200, "DPO steps (--quick: 60)")
flags.DEFINE_integer("pairs", 512, "training pairs (--quick: 256)")
flags.DEFINE_integer("held_out", 64, "held-out pairs")
flags.DEFINE_integer("prompt_bytes", 48, "prompt length in bytes")
flags.DEFINE_integer("answer_bytes", 16, "answer length in bytes")
flags.DEFINE_integer("mc_num", 8, "VRPO's budget n: samples per bound")
flags.DEFINE_float("beta", 0.5, "DPO's beta")


def corpus_pairs(split: str, count: int, seed: int) -> list[dict[str, str]]:
  """Pairs at random offsets of a Tiny Shakespeare split (see the module docstring)."""
  text = split_text("tinyshakespeare")[split]
  rng = np.random.default_rng(seed)
  p, a = FLAGS.prompt_bytes, FLAGS.answer_bytes
  out = []
  while len(out) < count:
    start = int(rng.integers(0, len(text) - p - a))
    prompt, answer = text[start : start + p], text[start + p : start + p + a]
    if not answer.isascii() or len(set(answer)) < 4:
      continue
    order = rng.permutation(a)
    while np.all(order == np.arange(a)):
      order = rng.permutation(a)
    rejected = "".join(answer[i] for i in order)
    if rejected != answer:
      out.append({"prompt": prompt, "chosen": answer, "rejected": rejected})
  return out


def _write_jsonl(path: pathlib.Path, rows: list[dict[str, str]]) -> str:
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.quick:
    FLAGS.ref_steps, FLAGS.dpo_steps, FLAGS.pairs = 300, 60, 256
  root = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="posttrain_"))
  root.mkdir(parents=True, exist_ok=True)
  timings = {}

  start = time.time()
  reference = str(root / "reference")
  config = tiny.get_config()
  config.train.update(dict(num_steps=FLAGS.ref_steps, eval_every=FLAGS.ref_steps))
  config.checkpoint.update(dict(save_every=FLAGS.ref_steps, async_save=False))
  train(config, reference)
  timings["reference_s"] = time.time() - start

  start = time.time()
  train_file = _write_jsonl(root / "train.jsonl", corpus_pairs("train", FLAGS.pairs, 0))
  eval_file = _write_jsonl(root / "eval.jsonl", corpus_pairs("validation", FLAGS.held_out, 1))
  dpo = tiny.get_config()
  dpo.data.batch_size = 8
  dpo.optimizer.update(dict(peak_lr=1e-4, warmup_steps=5, final_lr=1e-5, weight_decay=0.0))
  dpo.train.update(dict(num_steps=FLAGS.dpo_steps, eval_every=FLAGS.dpo_steps, log_every=10))
  dpo.checkpoint.update(dict(save_every=FLAGS.dpo_steps, async_save=False))
  dpo.posttrain.update(
      dict(
          method="dpo",
          reference=reference,
          preferences=train_file,
          preferences_eval=eval_file,
          beta=FLAGS.beta,
          mc_num=FLAGS.mc_num,
      )
  )
  policy_dir = str(root / "dpo")
  train(dpo, policy_dir)
  timings["dpo_s"] = time.time() - start

  start = time.time()
  run_config, policy = load_model(policy_dir)
  _, ref_params = load_model(reference)
  source = PreferenceSource(run_config, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  source.frozen = ref_params
  before = source.evaluate(ref_params)["dpo/bound_gap"]
  after = source.evaluate(policy)["dpo/bound_gap"]

  pairs = read_preferences(eval_file, run_config)[:8]
  vrpo = bound_estimator(run_config, FLAGS.mc_num, FLAGS.mc_num)
  naive = bound_estimator(run_config, FLAGS.mc_num, FLAGS.mc_num, one_timestep=True)

  @jax.jit
  def both(batch):
    return (
        dpo_loss(vrpo, policy, ref_params, batch, FLAGS.beta)[0],
        dpo_loss(naive, policy, ref_params, batch, FLAGS.beta, antithetic=False)[0],
    )

  draws = np.asarray([both(pack_preferences(pairs, range(len(pairs)), seed=s)) for s in range(32)])
  timings["measure_s"] = time.time() - start
  result = {
      "dpo_margin_before": before,
      "dpo_margin_after": after,
      "vrpo_var_ratio": float(draws[:, 0].var() / draws[:, 1].var()),
      "vrpo_loss_var": float(draws[:, 0].var()),
      "naive_loss_var": float(draws[:, 1].var()),
      "grpo_reward_before": None,
      "grpo_reward_after": None,
      "settings": {
          k: getattr(FLAGS, k)
          for k in (
              "quick",
              "ref_steps",
              "dpo_steps",
              "pairs",
              "held_out",
              "prompt_bytes",
              "answer_bytes",
              "mc_num",
              "beta",
          )
      },
      "timings_s": {k: round(v, 1) for k, v in timings.items()},
      "machine": "CPU",
  }
  if FLAGS.json:
    pathlib.Path(FLAGS.json).write_text(json.dumps(result, indent=1))
  print(json.dumps(result))


if __name__ == "__main__":
  app.run(main)
