"""Model FLOPs (docs/llada.md, "Model FLOPs and MFU") against a hand count, and the peak table."""

from types import SimpleNamespace

import pytest

from configs import llada_1b, llada_8b
from conftest import make_tiny_config
from llada_jax.training.flops import (
    matmul_parameters,
    model_flops_per_step,
    model_flops_per_token,
    non_embedding_parameters,
    peak_flops,
)


def test_tiny_model_flops_by_hand():
  config = make_tiny_config()  # d 64, 2 layers, 4 heads, 2 kv heads, mlp 128, vocab 320
  d, layers, vocab, seq = 64, 2, config.model.vocab_size, config.data.sequence_length
  head = 16
  per_layer = d * 4 * head + 2 * d * 2 * head + d * 4 * head + 3 * d * 128  # q, k+v, out, mlp
  assert matmul_parameters(config) == layers * per_layer + d * vocab
  assert model_flops_per_token(config) == 6 * (layers * per_layer + d * vocab) + 12 * 2 * seq * d
  assert model_flops_per_step(config) == model_flops_per_token(config) * 8 * seq


def test_llada_8b_matmul_parameters_are_the_official_count_less_the_embedding():
  config = llada_8b.get_config()
  embedding = config.model.vocab_size * config.model.d_model
  norms = config.model.n_layers * 2 * config.model.d_model + config.model.d_model
  assert matmul_parameters(config) == 8_015_581_184 - embedding - norms


@pytest.mark.parametrize(
    "kind,peak",
    [("NVIDIA H100 80GB HBM3", 989e12), ("TPU v5 lite", 197e12), ("TPU v4", 275e12), ("cpu", None)],
)
def test_peak_flops_by_device_kind(kind, peak):
  assert peak_flops(SimpleNamespace(device_kind=kind)) == peak


def test_non_embedding_parameters_of_llada_1b_match_the_paper():
  """Table 5 of the LLaDA paper: 1B has 0.97B non-embedding parameters (the N of 6 N D)."""
  assert round(non_embedding_parameters(llada_1b.get_config()) / 1e9, 2) == 0.97
