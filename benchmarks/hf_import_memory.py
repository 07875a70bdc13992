"""Peak host memory of importing a synthetic HF LLaDA checkpoint (default ~1.9 GB in bfloat16).

  python benchmarks/hf_import_memory.py [--layers=16 --d_model=2048 --mlp=5632 --vocab=32000]

Writes the checkpoint (3 shards) in a child process, then imports it with `load_hf` in a fresh child
and prints that child's peak RSS next to the checkpoint size and the largest tensor: streaming
means peak ~ baseline + parameters + a couple of tensors, not twice the checkpoint.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile

from absl import app, flags

_LAYERS = flags.DEFINE_integer("layers", 16, "Transformer blocks.")
_D_MODEL = flags.DEFINE_integer("d_model", 2048, "Model width.")
_MLP = flags.DEFINE_integer("mlp", 5632, "SwiGLU hidden width.")
_VOCAB = flags.DEFINE_integer("vocab", 32000, "Vocabulary size.")

WRITE = """
import json, pathlib, sys
import ml_dtypes, numpy as np
from llada_jax.interop import safetensors_io
from llada_jax.interop.hf_config import config_to_hf
from llada_jax.config import default_config
out, layers, d, f, v = pathlib.Path(sys.argv[1]), *map(int, sys.argv[2:6])
c = default_config()
c.model.update(dict(d_model=d, n_layers=layers, n_heads=d // 128, n_kv_heads=d // 128,
                    mlp_hidden_size=f, vocab_size=v, max_sequence_length=4096))
c.tokens.update(dict(mask_id=v - 1, eos_id=1, pad_id=1))
(out / "config.json").write_text(json.dumps(config_to_hf(c)))
P = "model.transformer."
shapes = {P + "wte.weight": (v, d), P + "ln_f.weight": (d,), P + "ff_out.weight": (v, d)}
for i in range(layers):
  b = f"{P}blocks.{i}."
  shapes.update({b + n: s for n, s in [("attn_norm.weight", (d,)), ("ff_norm.weight", (d,)),
      ("q_proj.weight", (d, d)), ("k_proj.weight", (d, d)), ("v_proj.weight", (d, d)),
      ("attn_out.weight", (d, d)), ("ff_proj.weight", (f, d)), ("up_proj.weight", (f, d)),
      ("ff_out.weight", (d, f))]})
names = sorted(shapes); weight_map = {}; total = 0
for k in range(3):
  part = names[k::3]; file = f"model-{k + 1:05d}-of-00003.safetensors"
  tensors = {n: np.full(shapes[n], 0.01, ml_dtypes.bfloat16) for n in part}
  total += sum(t.nbytes for t in tensors.values())
  safetensors_io.write_file(out / file, tensors); weight_map.update({n: file for n in part}); del tensors
(out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
print(total, max(int(np.prod(s)) * 2 for s in shapes.values()))
"""

READ = """
import resource, sys, time
from llada_jax.interop.hf_checkpoint import load_hf
import jax
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.time()
config, params = load_hf(sys.argv[1])
seconds = time.time() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(base * 1024, peak * 1024, sum(x.nbytes for x in jax.tree.leaves(params)), seconds)
"""


def main(argv: list[str]) -> None:
  del argv
  with tempfile.TemporaryDirectory() as tmp:
    args = [str(a) for a in (tmp, _LAYERS.value, _D_MODEL.value, _MLP.value, _VOCAB.value)]
    size, largest = map(
        int,
        subprocess.run(
            [sys.executable, "-c", WRITE, *args], check=True, capture_output=True, text=True
        ).stdout.split(),
    )
    reader = subprocess.run(
        [sys.executable, "-c", READ, tmp], check=True, capture_output=True, text=True
    )
    baseline, peak, params_bytes, seconds = reader.stdout.split()
  baseline, peak = int(baseline), int(peak)
  gb = 1e9
  print(
      json.dumps(
          {
              "checkpoint_gb": size / gb,
              "largest_tensor_gb": largest / gb,
              "params_gb": int(params_bytes) / gb,
              "import_seconds": float(seconds),
              "baseline_rss_gb": baseline / gb,
              "peak_rss_gb": peak / gb,
              "peak_minus_baseline_over_checkpoint": (peak - baseline) / size,
          }
      )
  )


if __name__ == "__main__":
  app.run(main)
