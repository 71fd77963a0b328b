"""The text-vs-speech gap: every item asked as text (base LLM) and as speech (the speech LLM).

Multiple-choice items are scored by option log-likelihood: each option is the response to
the item's prompt, its tokens' log-probabilities are summed and, by default, divided by
its token count (length normalisation, so long options are not penalised for being long);
the highest-scoring option is the answer. Generative items are answered greedily and
scored by their metric against the reference:

    exact_match   normalised prediction == normalised answer (1 or 0)
    contains      the normalised answer occurs in the normalised prediction, word-aligned
    word_f1       SQuAD's bag-of-words F1 between prediction and answer

(normalised = `asr.normalize_text`: lower case, no punctuation, single spaces).

Reported per task and overall: the base LLM's text accuracy (the upper bound), the speech
LLM's speech accuracy, and the gap (text - speech). The same machinery answers the other
benchmarks under other conditions (`answer_items`, `summarise`).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from speechlm_jax.evaluation.asr import normalize_text
from speechlm_jax.evaluation.items import Item
from speechlm_jax.evaluation.scoring import Scorer


def score_answer(prediction: str, answer: str, metric: str) -> float:
    """The metric of a generated answer against the reference, in [0, 1]."""
    pred, ref = normalize_text(prediction), normalize_text(answer)
    if metric == "exact_match":
        return float(pred == ref)
    if metric == "contains":
        return float(f" {ref} " in f" {pred} ")
    if metric == "word_f1":
        common = Counter(pred.split()) & Counter(ref.split())
        overlap = sum(common.values())
        if not pred or not ref or overlap == 0:
            return float(pred == ref)
        precision, recall = overlap / len(pred.split()), overlap / len(ref.split())
        return 2 * precision * recall / (precision + recall)
    raise ValueError(f"unknown metric {metric!r}")


def answer_items(
    scorer: Scorer, items: Sequence[Item], conditions: Sequence[str], *, max_new_tokens: int, normalize: bool = True
) -> list[dict[str, Any]]:
    """Per item: its prediction and score under each condition (`<condition>`, `<condition>_correct`)."""
    records = [{"id": it.id, "task": it.task, "answer": it.answer} for it in items]
    choice = [k for k, it in enumerate(items) if it.multiple_choice]
    if choice:
        logliks = scorer.option_logliks([items[k] for k in choice], conditions)
        for condition, per_item in logliks.items():
            for k, options in zip(choice, per_item):
                scores = options[:, 0] / np.maximum(options[:, 1], 1.0) if normalize else options[:, 0]
                best = int(np.argmax(scores))
                records[k][condition] = items[k].choices[best]
                records[k][f"{condition}_correct"] = float(best == items[k].answer_index)
    generative = [k for k, it in enumerate(items) if not it.multiple_choice]
    if generative:
        asked = [items[k] for k in generative]
        for condition in conditions:
            answers = scorer.generate_items(asked, condition, max_new_tokens=max_new_tokens)
            for k, prediction in zip(generative, answers):
                records[k][condition] = prediction
                records[k][f"{condition}_correct"] = score_answer(prediction, items[k].answer, items[k].metric)
    return records


def _accuracies(records: Sequence[dict[str, Any]], conditions: Sequence[str]) -> dict[str, float | int]:
    out = {c: float(np.mean([r[f"{c}_correct"] for r in records])) for c in conditions}
    out["items"] = len(records)
    return out


def summarise(records: Sequence[dict[str, Any]], conditions: Sequence[str]) -> dict[str, Any]:
    """Mean score per condition overall (over items) and per task."""
    by_task: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    return {
        "overall": _accuracies(records, conditions),
        "tasks": {task: _accuracies(rs, conditions) for task, rs in sorted(by_task.items())},
    }


def _with_gap(scores: dict[str, float]) -> dict[str, float]:
    if "speech" in scores and "text" in scores:
        scores["gap"] = scores["text"] - scores["speech"]
    return scores


def run_gap(scorer: Scorer, items: Sequence[Item], *, max_new_tokens: int, normalize: bool = True) -> dict[str, Any]:
    """Text accuracy of the base LLM, speech accuracy of the speech LLM and their gap, per task and overall.

    A scorer holding a base LLM alone (no speech) reports the text accuracy only.
    """
    conditions = ("text", "speech") if scorer.has_speech else ("text",)
    records = answer_items(scorer, items, conditions, max_new_tokens=max_new_tokens, normalize=normalize)
    summary = summarise(records, conditions)
    _with_gap(summary["overall"])
    for scores in summary["tasks"].values():
        _with_gap(scores)
    return {**summary, "conditions": list(conditions), "items": records}
