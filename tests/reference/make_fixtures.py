"""Writes tests/data/official/: tiny random folders built by the official LLaDA code (dense LLaDA,
LLaDA 2.x MoE, LLaDA-MoE) and what that code computes on them (logits, router choices, `generate`
outputs), so that the tests compare llada_jax with the official models without the official code
being part of this project.

Needs the official files in tests/reference/official/ (fetched, not committed: see the README
there), torch and transformers:

  .venv/bin/python tests/reference/make_fixtures.py [llada2_moe] [llada_moe] [llada] [illada]

Outputs, per folder under tests/data/official/<name>/: config.json and model.safetensors (the
official save_pretrained), expected.npz (tokens [B, L], logits [B, L, V] float32 of the
bidirectional forward, router_<i> [B*L, k] the experts of the i-th MoE layer), generate.json
(cases: prompt, the official generate's keyword arguments, its output).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from reference import official_llada as ol  # pylint: disable=wrong-import-position
from reference import official_moe as om  # pylint: disable=wrong-import-position

OUT = pathlib.Path(__file__).resolve().parents[1] / "data" / "official"
V = 128
MASK = V - 1


def _write_expected(path: pathlib.Path, tokens: np.ndarray) -> tuple[np.ndarray, list]:
  """expected.npz of the folder: the tokens, the official logits and every MoE layer's router
  choices on them; returns (logits, router choices)."""
  logits = om.official_logits(str(path), tokens)
  routers = om.official_router_choice(str(path), tokens)
  np.savez_compressed(
      path / "expected.npz",
      tokens=tokens,
      logits=logits.astype(np.float32),
      **{f"router_{i}": r for i, r in enumerate(routers)},
  )
  return logits, routers


def _llada2(name: str, **sizes) -> None:
  path = OUT / name
  path.mkdir(parents=True, exist_ok=True)
  om.build_llada2_moe_folder(str(path), vocab_size=V, **sizes)
  rng = np.random.RandomState(0)
  _write_expected(path, rng.randint(0, MASK, (3, 20)))
  settings = [
      dict(gen_length=16, block_length=4, steps=4, threshold=0.95),
      dict(gen_length=16, block_length=4, steps=2, threshold=0.95),
      dict(gen_length=16, block_length=8, steps=8, threshold=0.5),
      dict(gen_length=12, block_length=4, steps=4, threshold=0.0),
      dict(gen_length=16, block_length=8, steps=3, threshold=0.9, eos_early_stop=True),
      dict(gen_length=20, block_length=4, steps=4, threshold=1.0),
  ]
  prompts = [rng.randint(0, MASK - 1, (1, n)) for n in (3, 6, 9) for _ in settings]
  # EOS: the token the network answers most often (with an EOS it never writes), so that answers
  # do reach it; prompts hold none.
  first = [
      om.official_generate(
          str(path), p, mask_id=MASK, eos_id=MASK - 1, **settings[i % len(settings)]
      )
      for i, p in enumerate(prompts)
  ]
  eos = int(
      np.bincount(np.concatenate([o.ravel() for o in first]), minlength=V)[: MASK - 1].argmax()
  )
  cases = []
  for i, prompt in enumerate(prompts):
    prompt[prompt == eos] = (eos + 1) % (MASK - 1)
    kwargs = dict(settings[i % len(settings)], mask_id=MASK, eos_id=eos, temperature=0.0)
    out = om.official_generate(str(path), prompt, **kwargs)
    cases.append({"prompt": prompt[0].tolist(), "kwargs": kwargs, "output": out[0].tolist()})
  (path / "generate.json").write_text(json.dumps({"eos_id": eos, "mask_id": MASK, "cases": cases}))
  stops = sum(eos in c["output"] for c in cases)
  print(f"{name}: {len(cases)} generate cases, {stops} end at EOS {eos}")


def _llada_moe(name: str) -> None:
  """LLaDA-MoE (modeling_lladamoe.py): a dense first layer, two MoE layers with a shared expert,
  a non-zero expert bias (added to the softmax probabilities), QK-norm, partial rotary, GQA."""
  path = OUT / name
  path.mkdir(parents=True, exist_ok=True)
  om.build_llada_moe_folder(
      str(path),
      vocab_size=V,
      moe_layer_freq=[0, 1, 1],
      shared_expert_intermediate_size=32,
      moe_router_enable_expert_bias=True,
      partial_rotary_factor=0.5,
      seed=1,
  )
  logits, routers = _write_expected(path, np.random.RandomState(1).randint(0, MASK, (3, 20)))
  print(f"{name}: logits {logits.shape}, {len(routers)} MoE layers")


def _llada(name: str, **sizes) -> None:
  """Dense LLaDA (modeling_llada.py): "llada" as LLaDA-8B (MHA, untied head, mask 126336's place
  taken by MASK), "illada" as iLLaDA-8B (GQA, tied embeddings, mask id 5)."""
  path = OUT / name
  ol.build_llada_folder(str(path), vocab_size=V, **sizes)
  tokens = np.random.RandomState(2).randint(0, MASK, (3, 20))
  logits = ol.official_logits(str(path), tokens)
  np.savez_compressed(path / "expected.npz", tokens=tokens, logits=logits.astype(np.float32))
  print(f"{name}: logits {logits.shape}")


def main() -> None:
  os.makedirs(OUT, exist_ok=True)
  names = sys.argv[1:] or ["llada2_moe", "llada_moe", "llada", "illada"]
  if "llada" in names:
    _llada("llada", mask_token_id=MASK, eos_token_id=MASK - 1, seed=2)
  if "illada" in names:
    _llada(
        "illada", n_kv_heads=2, weight_tying=True, mask_token_id=5, eos_token_id=MASK - 1, seed=3
    )
  if "llada2_moe" in names:
    _llada2("llada2_moe")
  if "llada_moe" in names:
    _llada_moe("llada_moe")


if __name__ == "__main__":
  main()
