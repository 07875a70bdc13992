"""Post-training on the CPU: ELBO-DPO with VRPO and diffu-GRPO on the tiny model.

  python benchmarks/posttrain.py --quick [--workdir=DIR] [--json=FILE]

1. Reference: configs/tiny.py trained on Tiny Shakespeare (--ref_steps steps).
2. Preference pairs from the bundled corpus: prompt = `--prompt_bytes` bytes of text, chosen =
   the real next `--answer_bytes` bytes, rejected = the same bytes in another order (a fixed
   permutation per pair: the same letters, corrupted text). Training pairs from the train split,
   held-out pairs from the validation split.
3. DPO through llada-train's trainer (posttrain.method="dpo", the reference frozen beside it).
4. GRPO: configs/tiny.py fine-tuned briefly (--sft_steps) to reverse three letters ("abf>" ->
   "fba", SFT with EOS: the reverse_az_sft task, 17,176 training words over a-z, 400 held out;
   --sft_steps batches of 16 see under 13,000 of them, part-way to learning the rule); then
   diffu-GRPO (posttrain.method="grpo", reward "exact", 8 answers per prompt at temperature 1,
   8 prompts per step) on the training words, once per seed of --grpo_seeds.

The last line printed is one JSON object:
  dpo_margin_before / dpo_margin_after: the held-out mean of B(chosen) - B(rejected) (nats, the
    bound of `likelihood.bound_estimator`, mc_num samples, the same masks before and after) under
    the reference and under the DPO policy: how much more likely real text is than its corruption.
  vrpo_var_ratio: the variance over 32 seeds of the DPO loss estimate on a fixed batch of
    held-out pairs (policy after DPO against the reference), VRPO's estimator (n stratified
    timesteps, masks shared by policy and reference) over the naive one (one timestep, independent
    masks), both with n = mc_num samples per bound.
  grpo_reward_before / grpo_reward_after: the mean reward (exact reversal) of greedy answers to
    the 400 held-out words under the SFT model and under the GRPO policy (the mean over the GRPO
    runs of --grpo_seeds; grpo_reward_after_per_seed gives each).
Plus the settings and the wall time of each part (CPU).
"""

from __future__ import annotations

import json
import pathlib
import sys
import tempfile
import time
from typing import Any

from absl import app, flags

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

# pylint: disable=wrong-import-position
import jax  # noqa: E402
import numpy as np  # noqa: E402

from configs import tiny  # noqa: E402
from llada_jax.data.corpora import split_text  # noqa: E402
from llada_jax.data.registry import reverse_words  # noqa: E402
from llada_jax.diffusion.likelihood import bound_estimator  # noqa: E402
from llada_jax.loading import load_model  # noqa: E402
from llada_jax.posttrain.dpo import dpo_loss, pack_preferences  # noqa: E402
from llada_jax.posttrain.preference import read_preferences  # noqa: E402
from llada_jax.posttrain.source import PreferenceSource, RolloutSource  # noqa: E402
from llada_jax.training.loop import train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_bool("quick", False, "the CPU-minutes sizes (the defaults below are the full ones)")
flags.DEFINE_string("parts", "dpo,grpo", "which parts to run (the others' keys are null)")
flags.DEFINE_string("workdir", "", "where the runs go (default: a temporary folder)")
flags.DEFINE_string("json", "", "also write the result here")
flags.DEFINE_integer(
    "ref_steps", 1500, "training steps of the reference (--quick: 300)", lower_bound=1
)
flags.DEFINE_integer("dpo_steps", 200, "DPO steps (--quick: 60)", lower_bound=1)
flags.DEFINE_integer("pairs", 512, "training pairs (--quick: 256)", lower_bound=1)
flags.DEFINE_integer("held_out", 64, "held-out pairs", lower_bound=1)
flags.DEFINE_integer("prompt_bytes", 48, "prompt length in bytes", lower_bound=1)
flags.DEFINE_integer("answer_bytes", 16, "answer length in bytes", lower_bound=1)
flags.DEFINE_integer("mc_num", 8, "VRPO's budget n: samples per bound", lower_bound=1)
flags.DEFINE_float("beta", 0.5, "DPO's beta", lower_bound=0.0)
flags.DEFINE_integer("sft_steps", 800, "SFT steps on reversal before GRPO", lower_bound=1)
flags.DEFINE_integer("grpo_steps", 400, "GRPO steps (--quick: 200)", lower_bound=1)
flags.DEFINE_integer(
    "grpo_seeds", 2, "GRPO runs from the same SFT model, seeds 0, 1, ...", lower_bound=1
)
flags.DEFINE_integer("inner_updates", 1, "GRPO's mu: train steps per rollout batch", lower_bound=1)
flags.DEFINE_float("grpo_lr", 5e-4, "GRPO's peak learning rate", lower_bound=0.0)


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


def _post_training(steps: int, batch_size: int, peak_lr: float, **posttrain: Any) -> Any:
  """configs/tiny.py for a post-training run: `steps` steps of `batch_size` rows, warm-up 5 steps
  to peak_lr then cosine to a tenth of it, no weight decay, logged every 10 steps, evaluated and
  saved at the end; posttrain.* from `posttrain`."""
  c = tiny.get_config()
  c.data.batch_size = batch_size
  c.optimizer.update(dict(peak_lr=peak_lr, warmup_steps=5, final_lr=peak_lr / 10, weight_decay=0.0))
  c.train.update(dict(num_steps=steps, eval_every=steps, log_every=10))
  c.checkpoint.update(dict(save_every=steps, async_save=False))
  c.posttrain.update(posttrain)
  return c


def grpo_part(root: pathlib.Path, timings: dict[str, float]) -> tuple[float, list[float]]:
  """SFT on reversal, then GRPO once per seed (see the module docstring): (held-out reward
  before, [after, per seed])."""
  task = "reverse_az_sft"
  records = {split: reverse_words(split, task) for split in ("train", "validation")}

  start = time.time()
  sft_dir = str(root / "sft")
  sft = tiny.get_config()
  sft.data.update(dict(task=task, sequence_length=16, batch_size=16))
  sft.train.update(dict(num_steps=FLAGS.sft_steps, eval_every=FLAGS.sft_steps))
  sft.checkpoint.update(dict(save_every=FLAGS.sft_steps, async_save=False))
  train(sft, sft_dir)
  timings["sft_s"] = time.time() - start

  def prompts(name: str, rows: list[dict[str, str]]) -> str:
    return _write_jsonl(
        root / name, [{"prompt": r["prompt"], "answer": r["response"]} for r in rows]
    )

  train_prompts = prompts("prompts.jsonl", records["train"])
  eval_prompts = prompts("prompts_eval.jsonl", records["validation"])
  rl_dirs = []
  for seed in range(FLAGS.grpo_seeds):
    start = time.time()
    rl = _post_training(
        FLAGS.grpo_steps,
        64,
        FLAGS.grpo_lr,
        method="grpo",
        reference=sft_dir,
        prompts=train_prompts,
        prompts_eval=eval_prompts,
        rewards="exact",
        group_size=8,
        inner_updates=FLAGS.inner_updates,
    )
    rl.seed = seed
    rl.sampling.update(dict(gen_length=4, steps=4, block_length=4, temperature=1.0))
    rl_dirs.append(str(root / f"grpo_seed{seed}"))
    train(rl, rl_dirs[-1])
    timings[f"grpo_seed{seed}_s"] = time.time() - start

  run_config, _ = load_model(rl_dirs[0])  # the held-out prompts and rewards of every run
  source = RolloutSource(run_config, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  before = source.evaluate(load_model(sft_dir)[1])["grpo/reward"]
  return before, [source.evaluate(load_model(d)[1])["grpo/reward"] for d in rl_dirs]


def dpo_part(root: pathlib.Path, timings: dict[str, float]) -> dict[str, float]:
  """Reference, preference pairs, DPO and the variance measurement (see the module docstring)."""
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
  dpo = _post_training(
      FLAGS.dpo_steps,
      8,
      1e-4,
      method="dpo",
      reference=reference,
      preferences=train_file,
      preferences_eval=eval_file,
      beta=FLAGS.beta,
      mc_num=FLAGS.mc_num,
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
  return {
      "dpo_margin_before": before,
      "dpo_margin_after": after,
      "vrpo_var_ratio": float(draws[:, 0].var() / draws[:, 1].var()),
      "vrpo_loss_var": float(draws[:, 0].var()),
      "naive_loss_var": float(draws[:, 1].var()),
  }


def main(argv: list[str]) -> None:
  del argv
  if FLAGS.quick:  # the --quick sizes of the flags not given on the command line
    quick = dict(ref_steps=300, dpo_steps=60, pairs=256, grpo_steps=200)
    for name, value in quick.items():
      if not FLAGS[name].present:
        setattr(FLAGS, name, value)
  parts = set(FLAGS.parts.split(","))
  if not parts or parts - {"dpo", "grpo"}:
    raise app.UsageError(f"--parts={FLAGS.parts} is not allowed: expected dpo, grpo or dpo,grpo")
  root = pathlib.Path(FLAGS.workdir or tempfile.mkdtemp(prefix="posttrain_"))
  root.mkdir(parents=True, exist_ok=True)
  timings: dict[str, float] = {}
  measured = dict.fromkeys(
      ("dpo_margin_before", "dpo_margin_after", "vrpo_var_ratio", "vrpo_loss_var", "naive_loss_var")
  )
  if "dpo" in parts:
    measured.update(dpo_part(root, timings))
  grpo_before, grpo_after = None, []
  if "grpo" in parts:
    grpo_before, grpo_after = grpo_part(root, timings)
  result = {
      **measured,
      "grpo_reward_before": grpo_before,
      "grpo_reward_after": float(np.mean(grpo_after)) if grpo_after else None,
      "grpo_reward_after_per_seed": grpo_after or None,
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
              "sft_steps",
              "grpo_steps",
              "grpo_seeds",
              "inner_updates",
              "grpo_lr",
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
