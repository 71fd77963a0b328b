"""Trainer fixtures: the tiny TTS corpus (built once per session) and tiny recipe configs.

Every trainer test compiles real steps; a persistent XLA compilation cache shared by the
session (and its subprocesses) lets runs of the same program skip compiling again.
"""

from __future__ import annotations

from pathlib import Path

import jax
import ml_collections
import pytest

from speechlm_jax.configs import asr, mtbi, salad, vtb
from speechlm_jax.toyworld.corpus import build_tiny_corpus

RECIPES = {"asr": asr, "mtbi": mtbi, "salad": salad, "vtb": vtb}


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"), train_sentences=12, heldout_sentences=4)


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persistent XLA cache for the trainer tests: the same program compiles once per session."""
    path = tmp_path_factory.mktemp("xla_cache")
    previous = jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield path
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


@pytest.fixture
def tiny_config(tiny_corpus: Path, compilation_cache: Path):
    """`tiny_config(recipe, **train)`: the recipe's `:tiny` variant, quiet, with the shared XLA cache."""

    def make(recipe: str, **train: object) -> ml_collections.ConfigDict:
        config = RECIPES[recipe].get_config(f"tiny,data_dir={tiny_corpus}")
        config.train.progress_bar = False
        config.train.eval_every = 0
        config.train.fast_compile = True
        config.train.compilation_cache = str(compilation_cache)
        for key, value in train.items():
            config.train[key] = value
        return config

    return make
