"""The reverse process: compiled sampling from a trained mask predictor."""

from llada_jax.sampling.generate import generate

__all__ = ["generate"]
