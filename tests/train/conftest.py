"""Trainer fixtures: the tiny TTS corpus (built once per session) and tiny recipe configs come from
the root conftest (`tiny_corpus`, `tiny_config`), shared with the scale-out tests.

Every trainer test compiles real steps; a persistent XLA compilation cache shared by the
session (and its subprocesses) lets runs of the same program skip compiling again.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _persistent_xla_cache(compilation_cache: Path) -> Path:
    """Every trainer test runs with the session's XLA cache (the root conftest's `compilation_cache`)."""
    return compilation_cache
