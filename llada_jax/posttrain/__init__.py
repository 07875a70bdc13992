"""Post-training on the likelihood bound: preference optimisation (VRPO / ELBO-DPO)."""
