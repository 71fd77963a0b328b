"""Trainer fixtures: the tiny TTS corpus (built once per session) and tiny recipe configs come from
the root conftest (`tiny_corpus`, `tiny_config`), shared with the scale-out tests.

Every trainer test compiles real steps; a persistent XLA compilation cache shared by the
session (and its subprocesses) lets runs of the same program skip compiling again.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def _persistent_xla_cache(compilation_cache: Path) -> Path:
    """Every trainer test runs with the session's XLA cache (the root conftest's `compilation_cache`)."""
    return compilation_cache


@pytest.fixture
def train_command(compilation_cache: Path):
    """`train_command(config_arg, workdir, *overrides) -> (argv, env)`: `speechlm-train` as a
    subprocess on one CPU device, quiet, with the session's XLA cache (`config_arg` is relative
    to configs/, e.g. "asr.py:tiny,data_dir=..."); run it from the repository root."""

    def make(config_arg: str, workdir: Path, *overrides: str) -> tuple[list[str], dict[str, str]]:
        # One device, with the suite's other XLA flags (its fast-compile ones, tests/conftest.py).
        flags = os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1")
        env = dict(os.environ, XLA_FLAGS=flags)
        argv = [
            sys.executable,
            "-m",
            "speechlm_jax.train.main",
            f"--config={REPO}/configs/{config_arg}",
            f"--workdir={workdir}",
            "--config.train.progress_bar=False",
            "--config.train.eval_every=0",
            "--config.train.fast_compile=True",
            f"--config.train.compilation_cache={compilation_cache}",
            *overrides,
        ]
        return argv, env

    return make
