"""llada_jax: Large Language Diffusion Models (LLaDA) in JAX."""

import os

# gs:// paths through gcsfs, not TensorFlow (llada_jax.storage says why); set before etils reads it.
os.environ.setdefault("EPATH_USE_TF", "false")
