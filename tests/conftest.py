"""Test configuration: every test process sees 8 simulated CPU devices.

The flag must be set before jax is first imported, so it lives here and not in
a fixture. Single-device tests simply use `jax.devices()[0]`.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Fixtures shared by several test folders. Tests never import one another (nor helper
# modules): what they share lives here, or in their folder's conftest.py. The imports of
# the package stay inside the fixtures, so a run of one folder loads only what it uses.

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

# -- The trainer's tiny TTS corpus, tiny recipe configs and XLA cache (train/, scale/) ------


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from speechlm_jax.toyworld.corpus import build_tiny_corpus

    return build_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"), train_sentences=12, heldout_sentences=4)


@pytest.fixture(scope="session")
def compilation_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A persistent XLA cache for the trainer tests: the same program compiles once per session.

    The train/ and scale/ conftests turn it on for every test of theirs.
    """
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
    from speechlm_jax.configs import asr, mtbi, salad, vtb

    recipes = {"asr": asr, "mtbi": mtbi, "salad": salad, "vtb": vtb}

    def make(recipe: str, **train: object):
        config = recipes[recipe].get_config(f"tiny,data_dir={tiny_corpus}")
        config.train.progress_bar = False
        config.train.eval_every = 0
        config.train.fast_compile = True
        config.train.compilation_cache = str(compilation_cache)
        for key, value in train.items():
            config.train[key] = value
        return config

    return make
