"""Input pipelines. This is the only package that touches seqio / TensorFlow, and only on use:
importing `llada_jax.data` itself pulls in neither, so model, training step and sampler run on
images without TensorFlow."""
