"""The diffusion process of LLaDA: forward masking and the training objectives."""
