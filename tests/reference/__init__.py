"""Test-side references: official PyTorch models run on tiny random weights."""
