"""The Flax mask predictor (and, with causal=True, the autoregressive baseline)."""

from llada_jax.model.forward import apply_model, logits, network, positions_from_mask
from llada_jax.model.transformer import ModelConfig, Transformer

__all__ = [
    "ModelConfig",
    "Transformer",
    "apply_model",
    "logits",
    "network",
    "positions_from_mask",
]
