"""The Flax mask predictor (and, with causal=True, the autoregressive baseline)."""

from llada_jax.model.forward import logits, positions_from_mask
from llada_jax.model.transformer import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer", "logits", "positions_from_mask"]
