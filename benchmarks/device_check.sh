#!/usr/bin/env bash
# Every accelerator measurement in one go (sized for < 8 minutes on one H100); writes JSON to $OUT
# (default: benchmarks/out). Run from the repository root:  bash benchmarks/device_check.sh
set -euo pipefail
out=${OUT:-benchmarks/out}
mkdir -p "$out"
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
py=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total --format=csv || true

# 1B training step at sequence 4096, bf16 compute: attention and remat choices (MFU target >= 50%).
for attention in xla cudnn; do
  timeout 240 "$py" benchmarks/train_step.py --config=llada_1b --sequence_length=4096 \
      --batch_size=4 --dtype=bfloat16 --remat=none,save_dots,full --steps=10 \
      --attention="$attention" --json="$out/train_step_1b_$attention.json" || echo "FAILED: $attention"
done

# 8B sampler (random bf16 weights: speed only), gen 256, steps 256: batch 1 and 32, exact and τ.
timeout 300 "$py" benchmarks/sampler.py --config=llada_8b --dtype=bfloat16 --gen_length=256 \
    --steps=256 --block_length=32 --batch=1,32 --thresholds=0.9 --repeats=1 \
    --json="$out/sampler_8b.json" || echo "FAILED: sampler"
