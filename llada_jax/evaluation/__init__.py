"""Evaluation: the likelihood bound, multiple choice, GSM8K generation, and an lm-eval adapter."""
