"""Text retention: does the adapted model still read? (the forgetting side of alignment)

The same items, as text, to the same weights twice: the base LLM (LoRA off, "text") and the
adapted model (LoRA on, "text_adapted"). Recipes that train LoRA on speech can change what
the LLM does with text; retention is the adapted model's text accuracy against the base's,
and `drop` = base - adapted (0 for a recipe that leaves text behaviour untouched, as a
projector-only recipe does by construction). SALAD's F (`diagnostics`) measures the same
change as a divergence of next-token distributions instead of accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from speechlm_jax.evaluation.gap import answer_items, summarise
from speechlm_jax.evaluation.items import Item
from speechlm_jax.evaluation.scoring import Scorer

CONDITIONS = ("text", "text_adapted")


def _with_drop(scores: dict[str, float]) -> dict[str, float]:
    scores["drop"] = scores["text"] - scores["text_adapted"]
    return scores


def run_retention(
    scorer: Scorer, items: Sequence[Item], *, max_new_tokens: int, normalize: bool = True
) -> dict[str, Any]:
    """Base vs adapted text accuracy per task and overall, with the drop, and the per-item answers."""
    records = answer_items(scorer, items, CONDITIONS, max_new_tokens=max_new_tokens, normalize=normalize)
    summary = summarise(records, CONDITIONS)
    _with_drop(summary["overall"])
    for scores in summary["tasks"].values():
        _with_drop(scores)
    return {**summary, "conditions": list(CONDITIONS), "items": records}
