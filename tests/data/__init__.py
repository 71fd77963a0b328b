"""Tests of speechlm_jax.data."""
