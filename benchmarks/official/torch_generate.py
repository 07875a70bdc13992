"""Eager PyTorch baseline: LLaDA's reference reverse process on an HF-format LLaDA checkpoint.

Run by benchmarks/official_cpu.py with a Python that has torch (not a llada_jax dependency):

  python benchmarks/official/torch_generate.py --checkpoint=DIR --prompts=prompts.json \
      --gen_length=112 --steps=112 --block_length=16 --repeats=3 --out=torch.json

The model is the HF LLaDA architecture (modeling_llada: pre-norm blocks, rotate-half RoPE in
float32, repeat-interleaved GQA heads, SDPA without a mask, SwiGLU, untied head) and the loop is the
official `generate` algorithm (greedy, low-confidence remasking): per block, the masked count split
evenly over the block's steps; per step one full forward pass, softmax probabilities of the argmax
proposals, masked positions beyond the block at -inf, top-k per row committed. Each step runs op by
op, as the official code does; this is the baseline the compiled JAX sampler is measured against.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file


class LLaDA(torch.nn.Module):
  """The HF LLaDA forward pass from a safetensors state dict (no training, no cache)."""

  def __init__(self, config: dict, weights: dict[str, torch.Tensor]):
    super().__init__()
    self.c = config
    self.w = weights
    head_dim = config["d_model"] // config["n_heads"]
    self.inv_freq = 1.0 / (
        config["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    )

  def _norm(self, x: torch.Tensor, name: str) -> torch.Tensor:
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return self.w[name] * (x.float() * torch.rsqrt(variance + self.c["rms_norm_eps"])).to(x.dtype)

  def _rope(self, x: torch.Tensor) -> torch.Tensor:
    positions = torch.arange(x.shape[2], dtype=torch.float32)
    freqs = torch.outer(positions, self.inv_freq)
    angles = torch.cat([freqs, freqs], -1)
    first, second = x.float().chunk(2, -1)
    rotated = torch.cat([-second, first], -1)
    return (x.float() * angles.cos() + rotated * angles.sin()).to(x.dtype)

  def forward(self, tokens: torch.Tensor) -> torch.Tensor:
    c, w, p = self.c, self.w, "model.transformer."
    batch, length = tokens.shape
    heads, kv_heads = c["n_heads"], c["n_kv_heads"]
    head_dim = c["d_model"] // heads
    x = F.embedding(tokens, w[p + "wte.weight"])
    for i in range(c["n_layers"]):
      b = f"{p}blocks.{i}."
      h = self._norm(x, b + "attn_norm.weight")
      q = F.linear(h, w[b + "q_proj.weight"]).view(batch, length, heads, head_dim).transpose(1, 2)
      k = F.linear(h, w[b + "k_proj.weight"]).view(batch, length, kv_heads, head_dim)
      v = F.linear(h, w[b + "v_proj.weight"]).view(batch, length, kv_heads, head_dim)
      k, v = k.transpose(1, 2), v.transpose(1, 2)
      q, k = self._rope(q), self._rope(k)
      k = k.repeat_interleave(heads // kv_heads, dim=1)
      v = v.repeat_interleave(heads // kv_heads, dim=1)
      a = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
      x = x + F.linear(a.transpose(1, 2).reshape(batch, length, -1), w[b + "attn_out.weight"])
      h = self._norm(x, b + "ff_norm.weight")
      h = F.silu(F.linear(h, w[b + "ff_proj.weight"])) * F.linear(h, w[b + "up_proj.weight"])
      x = x + F.linear(h, w[b + "ff_out.weight"])
    x = self._norm(x, p + "ln_f.weight")
    return F.linear(x, w[p + "ff_out.weight"]).float()


def num_transfer_tokens(mask_index: torch.Tensor, steps: int) -> torch.Tensor:
  """The official schedule: the block's masked count split evenly, the first steps take the rest."""
  mask_num = mask_index.sum(dim=1, keepdim=True)
  out = torch.zeros(mask_num.size(0), steps, dtype=torch.int64) + mask_num // steps
  remainder = mask_num % steps
  for row in range(mask_num.size(0)):
    out[row, : remainder[row]] += 1
  return out


@torch.no_grad()
def generate(
    model: LLaDA, prompt: torch.Tensor, steps: int, gen_length: int, block_length: int, mask_id: int
) -> torch.Tensor:
  """Greedy low-confidence reverse process, step for step as the official generate."""
  x = torch.full((prompt.shape[0], prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
  x[:, : prompt.shape[1]] = prompt.clone()
  num_blocks = gen_length // block_length
  steps_per_block = steps // num_blocks
  for block in range(num_blocks):
    end = prompt.shape[1] + (block + 1) * block_length
    schedule = num_transfer_tokens(x[:, end - block_length : end] == mask_id, steps_per_block)
    for i in range(steps_per_block):
      mask_index = x == mask_id
      logits = model(x)
      x0 = torch.argmax(logits, dim=-1)
      probs = F.softmax(logits, dim=-1)
      x0_p = torch.squeeze(torch.gather(probs, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
      x0_p[:, end:] = -np.inf
      x0 = torch.where(mask_index, x0, x)
      confidence = torch.where(mask_index, x0_p, -np.inf)
      transfer = torch.zeros_like(x0, dtype=torch.bool)
      for row in range(confidence.shape[0]):
        _, selected = torch.topk(confidence[row], k=int(schedule[row, i]))
        transfer[row, selected] = True
      x[transfer] = x0[transfer]
  return x


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name in ("checkpoint", "prompts", "out"):
    parser.add_argument(f"--{name}", required=True)
  for name in ("gen_length", "steps", "block_length", "repeats"):
    parser.add_argument(f"--{name}", type=int, required=True)
  args = parser.parse_args()
  config = json.load(open(f"{args.checkpoint}/config.json", encoding="utf-8"))
  model = LLaDA(config, load_file(f"{args.checkpoint}/model.safetensors")).eval()
  results = {"threads": torch.get_num_threads(), "torch": torch.__version__, "runs": []}
  for prompt in json.load(open(args.prompts, encoding="utf-8")):
    prompt = torch.tensor(prompt, dtype=torch.long)
    run = lambda: generate(
        model,
        prompt,
        args.steps,
        args.gen_length,
        args.block_length,  # noqa: E731
        config["mask_token_id"],
    )
    out = run()  # warm-up, as the JAX side excludes compilation
    start = time.perf_counter()
    for _ in range(args.repeats):
      out = run()
    results["runs"].append(
        {"tokens": out.tolist(), "seconds": (time.perf_counter() - start) / args.repeats}
    )
  json.dump(results, open(args.out, "w", encoding="utf-8"))


if __name__ == "__main__":
  main()
