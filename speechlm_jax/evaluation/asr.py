"""ASR: word error rate of the speech LLM's transcripts, with jiwer, after text normalisation.

The speech LLM is asked the `asr` task (a phrasing of `speechlm_jax.data.tasks.ASR`) about
each utterance of a paired corpus and decodes greedily; references and hypotheses are
normalised the same way (Unicode NFKC, lower case, punctuation removed except apostrophes
inside words, whitespace collapsed) so that the WER counts words, not casing or commas.
LibriSpeech's upper-case transcripts and an LLM's sentence-case answers then compare fairly.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Mapping, Sequence
from typing import Any

import jiwer

from speechlm_jax.data.tasks import get_task
from speechlm_jax.evaluation.items import Item, pick
from speechlm_jax.evaluation.scoring import Scorer

_PUNCTUATION = re.compile(r"[^\w\s']|(?<!\w)'|'(?!\w)")


def normalize_text(text: str) -> str:
    """Lower-cased words without punctuation, single-spaced ("Hello, World!" -> "hello world")."""
    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(_PUNCTUATION.sub(" ", text).split())


def word_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
    """Corpus WER of normalised hypotheses against normalised references (jiwer).

    References that normalise to nothing are left out (WER is undefined for them).
    Returns wer and the substitution / deletion / insertion / hit counts and reference words.
    """
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        raise ValueError("no non-empty reference to score")
    out = jiwer.process_words([r for r, _ in pairs], [h for _, h in pairs])
    words = out.substitutions + out.deletions + out.hits
    return {
        "wer": float(out.wer),
        "substitutions": float(out.substitutions),
        "deletions": float(out.deletions),
        "insertions": float(out.insertions),
        "hits": float(out.hits),
        "words": float(words),
        "utterances": float(len(pairs)),
    }


def character_error_rate(references: Sequence[str], hypotheses: Sequence[str]) -> float:
    """Corpus CER of the normalised texts (jiwer), references that normalise to nothing left out."""
    pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses, strict=True)]
    pairs = [(r, h) for r, h in pairs if r]
    if not pairs:
        raise ValueError("no non-empty reference to score")
    return float(jiwer.cer([r for r, _ in pairs], [h for _, h in pairs]))


def asr_items(records: Sequence[Mapping[str, Any]], *, prompt_split: str = "train", seed: int = 0) -> list[Item]:
    """Items asking the `asr` task about each speech record `{"id", "text", "audio"}`."""
    pool = get_task("asr").prompts(prompt_split)
    return [
        Item(
            id=str(r["id"]),
            task="asr",
            question=" ".join(str(r["text"]).split()),
            answer=str(r["text"]),
            audio=r.get("audio"),
            prompt=pick(pool, seed, str(r["id"])),
        )
        for r in records
    ]


def run_asr(scorer: Scorer, items: Sequence[Item], *, max_new_tokens: int) -> dict[str, Any]:
    """Transcribes every item's speech (student, LoRA on) and scores the WER against its answer."""
    hypotheses = scorer.generate_items(items, "speech", max_new_tokens=max_new_tokens)
    scores = word_error_rate([it.answer for it in items], hypotheses)
    examples = [{"id": it.id, "reference": it.answer, "hypothesis": h} for it, h in zip(items, hypotheses)]
    return {**scores, "examples": examples}
