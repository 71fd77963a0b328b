"""Conversion between HF checkpoints and speechlm_jax models (safetensors, no torch at run time)."""
