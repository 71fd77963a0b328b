"""Scale-out fixtures: the trainer tests' tiny TTS corpus, tiny recipe configs and XLA cache, reused."""

from tests.train.conftest import compilation_cache, tiny_config, tiny_corpus  # noqa: F401
