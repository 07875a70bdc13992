"""HuggingFace interoperability: safetensors checkpoints of the official LLaDA models."""
