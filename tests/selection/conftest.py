"""A tiny stage-1 SALAD run (the real trainer on the tiny TTS corpus), shared by the CLI tests."""

from __future__ import annotations

from pathlib import Path

import jax
import pytest

from speechlm_jax.configs import salad
from speechlm_jax.toyworld.corpus import build_tiny_corpus
from speechlm_jax.train import trainer


@pytest.fixture(scope="session")
def stage1_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`configs/salad.py:tiny` trained for 2 steps, checkpointed at steps 1 and 2."""
    corpus = build_tiny_corpus(tmp_path_factory.mktemp("tiny_corpus"), train_sentences=8, heldout_sentences=2)
    config = salad.get_config(f"tiny,data_dir={corpus}")
    config.train.steps = 2
    config.checkpoint.every = 1
    config.train.progress_bar = False
    config.train.eval_every = 0
    # Not fast_compile: `speechlm-eval`'s loader rebuilds the random base without those XLA
    # options, and the base hash of its checkpoint must match.
    config.train.compilation_cache = str(tmp_path_factory.mktemp("xla_cache"))
    workdir = tmp_path_factory.mktemp("stage1")
    trainer.train(config, workdir, devices=jax.devices())
    return workdir
