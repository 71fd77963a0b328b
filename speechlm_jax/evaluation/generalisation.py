"""Prompt and task generalisation (MTBI's benchmark): do speech skills transfer beyond training?

Three item sets, each asked as text (base LLM) and as speech (the speech LLM), scored like
the gap benchmark:

    seen_tasks/train_prompts      tasks the speech recipe trained on, phrasings it saw
    seen_tasks/heldout_prompts    the same tasks, phrasings it never saw (prompt generalisation)
    heldout_tasks                 tasks no speech recipe ever saw (task generalisation), in
                                  their train phrasings, so only the task is new

Items are generative, built by `items.task_items` from tasks with computable answers (the
toy world's fourteen, four held out) about held-out sentences, with a seeded phrasing per
(task, sentence).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from speechlm_jax.data.tasks import get_task
from speechlm_jax.evaluation.gap import run_gap
from speechlm_jax.evaluation.items import Item, task_items
from speechlm_jax.evaluation.scoring import Scorer

SPLITS = ("seen_tasks/train_prompts", "seen_tasks/heldout_prompts", "heldout_tasks")


def generalisation_items(
    seen_tasks: Sequence[str], heldout_tasks: Sequence[str], sentences: Sequence[str], *, seed: int = 0
) -> dict[str, list[Item]]:
    """The three item sets of the benchmark (see the module docstring), every task on every sentence."""

    def items(tasks: Sequence[str], prompt_split: str) -> list[Item]:
        return [
            it for name in tasks for it in task_items(get_task(name), sentences, prompt_split=prompt_split, seed=seed)
        ]

    return {
        SPLITS[0]: items(seen_tasks, "train"),
        SPLITS[1]: items(seen_tasks, "heldout"),
        SPLITS[2]: items(heldout_tasks, "train"),
    }


def run_generalisation(scorer: Scorer, sets: dict[str, list[Item]], *, max_new_tokens: int) -> dict[str, Any]:
    """Per split of `generalisation_items`: the gap benchmark's summary (text, speech, gap per task
    and overall) and items."""
    return {split: run_gap(scorer, items, max_new_tokens=max_new_tokens) for split, items in sets.items() if items}
