"""SALAD's diagnostics on a text corpus: misalignment M and forgetting F.

For each sentence of the corpus, the first `prefix_fraction` of its words is spoken (one
audio slot, from the `Speech` of the scorer: the TTS, or the oracle) and the rest is
written, after the tokenizer's BOS and without a chat frame (plain running text):

    student   <bos> [audio: "the small cat"] sleeps near the barn
    teacher   <bos> the small cat sleeps near the barn

    M = sum_t KL(P(w | text prefix) || P(w | speech prefix))   over the written tokens
        that follow the speech (the example's `kl_mask`), student LoRA on, teacher LoRA off
    F = sum_t KL(Q_base(w | text) || P_adapted(w | text))       over every next token of
        the written sentence: the same text, LoRA off vs on

both from `losses.chunked_misalignment` / `chunked_forgetting`. Reported per token (sum
over the corpus / scored tokens) and per sequence (mean of the per-sentence sums). With
the oracle speech (transcript embeddings at the audio positions) and a zero adapter both
are exactly 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from speechlm_jax.data import interleave
from speechlm_jax.data.examples import Segment, Text
from speechlm_jax.evaluation.scoring import SAMPLE_RATE, Scorer


def corpus_segments(scorer: Scorer, sentence: str, prefix_fraction: float) -> list[Segment]:
    """`<bos>`, the first words spoken, the rest written (see the module docstring)."""
    words = sentence.split()
    if not words:
        raise ValueError("an empty sentence has nothing to score")
    spoken = min(len(words), max(1, round(len(words) * prefix_fraction)))
    transcript = " ".join(words[:spoken])
    waveform = scorer.speech.waveform(transcript, None)
    audio = interleave.whole_utterance(
        waveform,
        transcript,
        None,
        lead_space=False,
        max_samples=scorer.max_audio_samples,
        split_long=True,
        sample_rate=SAMPLE_RATE,
    )
    rest = words[spoken:]
    return [Text(scorer.tokenizer.hf.bos_token or ""), *audio, *([Text(" " + " ".join(rest))] if rest else [])]


def _summary(sums: np.ndarray, tokens: np.ndarray) -> dict[str, float | int]:
    total = float(np.sum(tokens))
    return {
        "per_token": float(np.sum(sums) / total) if total else 0.0,
        "per_sequence": float(np.mean(sums)),
        "tokens": int(total),
    }


def run_diagnostics(scorer: Scorer, sentences: Sequence[str], *, prefix_fraction: float = 0.5) -> dict[str, Any]:
    """M and F over `sentences` (see the module docstring)."""
    if not 0.0 < prefix_fraction <= 1.0:
        raise ValueError(f"prefix_fraction must lie in (0, 1], got {prefix_fraction}")
    prepared = [scorer.prepare(corpus_segments(scorer, s, prefix_fraction)) for s in sentences]
    out = scorer.divergences(prepared)
    return {
        "misalignment": _summary(out["misalignment"], out["misalignment_tokens"]),
        "forgetting": _summary(out["forgetting"], out["forgetting_tokens"]),
        "sequences": len(sentences),
        "prefix_fraction": prefix_fraction,
    }
