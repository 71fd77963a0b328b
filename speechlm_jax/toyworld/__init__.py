"""The embedded toy world that `make demo` and the tests build on.

No pretrained speech encoder or LLM can be fetched here, so the demo grows its own small
world. This package is its text half: a vocabulary of a few hundred pronounceable English
words (`vocab`), a seeded sentence generator with disjoint train / held-out splits
(`sentences`), and fourteen text tasks with computable answers, four of them held out of
every speech-alignment recipe (`tasks`). The speech half synthesises these sentences with
espeak-ng (`speechlm_jax.data.tts`).

Sentences are drawn with `speechlm_jax.toyworld.sentences.sentences(split, n, seed)`;
the package does not re-export that function, whose name is its module's.
"""

from speechlm_jax.toyworld.tasks import (
    HELDOUT_TASKS,
    SEEN_TASKS,
    TOY_TASKS,
    all_words,
    register_toy_tasks,
)

__all__ = [
    "HELDOUT_TASKS",
    "SEEN_TASKS",
    "TOY_TASKS",
    "all_words",
    "register_toy_tasks",
]
