"""Scale-out fixtures: the trainer tests' tiny TTS corpus, tiny recipe configs and XLA cache, reused
from the root conftest (`tiny_corpus`, `tiny_config`, `compilation_cache`)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _persistent_xla_cache(compilation_cache: Path) -> Path:
    """Every scale-out test runs with the session's XLA cache, as the trainer tests do."""
    return compilation_cache
