"""The cascade baseline: the run's own transcript of the speech, given as text to the base LLM.

SALAD's comparison ("speech LLMs underperform cascaded pipelines"): an ASR system writes the
spoken question down and the text LLM answers the transcript. Here the ASR system is the run's
own connector read out by greedy CTC through the LLM's head (`SpeechLM.ctc_transcript`), which
is what a CTC-aligned connector (`loss.name = "ctc"`) is trained to spell; the answer comes from
the base LLM (LoRA off), as the text condition of the gap does. Every item keeps its prompt and
its answer; only its question is replaced by the transcript:

    speech (TTS or recorded) -> encoder -> projector -> LLM head, best path -> transcript
      -> prompt + transcript -> base LLM -> answer, scored as the gap benchmark scores text

So for each item set the report has the speech LLM (speech), the base LLM on the true
transcript (text: the upper bound) and the cascade, which a speech LLM should beat.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speechlm_jax.evaluation.asr import character_error_rate, word_error_rate
from speechlm_jax.evaluation.gap import answer_items, summarise
from speechlm_jax.evaluation.items import Item
from speechlm_jax.evaluation.scoring import Scorer, TTSSpeech
from speechlm_jax.models.frontend import audio_token_count


@partial(jax.jit, static_argnames=("graphdef", "blank_id", "max_labels"))
def _transcribe(
    graphdef: nnx.GraphDef, state: nnx.State, audio: jax.Array, audio_lens: jax.Array, *, blank_id: int, max_labels: int
) -> jax.Array:
    return nnx.merge(graphdef, state).ctc_transcript(audio, audio_lens, blank_id=blank_id, max_labels=max_labels)


def transcribe(scorer: Scorer, waveforms: Sequence[np.ndarray], *, blank_id: int) -> list[str]:
    """The scorer's SpeechLM's greedy CTC transcript of each int16 waveform (16 kHz)."""
    if not scorer.has_speech:
        raise ValueError("the cascade needs a speech LLM (a --workdir), not a base LLM alone")
    out: list[str] = []
    for start in range(0, len(waveforms), scorer.batch_size):
        chunk = list(waveforms[start : start + scorer.batch_size])
        samples = -(-max(len(w) for w in chunk) // scorer.sample_multiple) * scorer.sample_multiple
        audio = np.zeros((scorer.batch_size, samples), np.int16)
        lens = np.zeros((scorer.batch_size,), np.int32)
        for i, w in enumerate(chunk):
            audio[i, : len(w)], lens[i] = w, len(w)
        ids = _transcribe(
            scorer._graphdef,
            scorer.state,
            jnp.asarray(audio),
            jnp.asarray(lens),
            blank_id=blank_id,
            max_labels=audio_token_count(samples, scorer.downsample),
        )
        for row in np.asarray(jax.device_get(ids))[: len(chunk)]:
            out.append(scorer.tokenizer.decode([int(t) for t in row if t >= 0]).strip())
    return out


def run_cascade(
    scorer: Scorer, items: Sequence[Item], *, blank_id: int, max_new_tokens: int, normalize: bool = True
) -> dict[str, Any]:
    """Per task and overall: the base LLM's accuracy on the run's own transcripts ("cascade"), with their WER."""
    spoken = [scorer.speech.waveform(" ".join(it.question.split()), it.audio) for it in items]
    transcripts = transcribe(scorer, spoken, blank_id=blank_id)
    cascaded = [dataclasses.replace(it, question=t) for it, t in zip(items, transcripts)]
    records = answer_items(scorer, cascaded, ("text",), max_new_tokens=max_new_tokens, normalize=normalize)
    for record, item, transcript in zip(records, items, transcripts):
        record["cascade"], record["cascade_correct"] = record.pop("text"), record.pop("text_correct")
        record["transcript"], record["reference"] = transcript, item.question
    summary = summarise(records, ("cascade",))
    summary["overall"]["wer"] = word_error_rate([it.question for it in items], transcripts)["wer"]
    return {**summary, "items": records}


def run_ctc_asr(scorer: Scorer, records: Sequence[dict[str, Any]], *, blank_id: int) -> dict[str, Any]:
    """WER and CER of the run's greedy CTC transcripts of recorded utterances `{"audio", "text"}`.

    The recordings are read as they are, whatever speech source the scorer was given for its
    items (an oracle's silent clips must not stand in for them)."""
    recorded = TTSSpeech()  # reads the file when there is one, as for items with recorded audio
    waveforms = [recorded.waveform(r["text"], r["audio"]) for r in records]
    transcripts = transcribe(scorer, waveforms, blank_id=blank_id)
    references = [r["text"] for r in records]
    wer = word_error_rate(references, transcripts)
    exact = float(np.mean([" ".join(t.split()) == " ".join(r.split()) for t, r in zip(transcripts, references)]))
    return {
        **wer,
        "cer": character_error_rate(references, transcripts),
        "exact": exact,
        "items": [{"reference": r, "transcript": t} for r, t in zip(references, transcripts)],
    }
