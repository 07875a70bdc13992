"""The Flax mask predictor (and, with causal=True, the autoregressive baseline)."""

from llada_jax.model.transformer import ModelConfig, Transformer

__all__ = ["ModelConfig", "Transformer"]
