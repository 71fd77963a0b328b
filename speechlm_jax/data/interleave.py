"""Speech-text interleaving from word timings (MTBI, SALAD, VoiceTextBlender mixed-modal).

An utterance's content becomes a list of word spans, each either spoken (an `Audio`
segment cut from the waveform by its words' timings, with a small margin) or written (a
`Text` segment). Word order is kept: spans tile the word sequence left to right, and the
teacher twin reads every span's words, so it reads the whole transcript.

- `sample_spans`: MTBI/SALAD interleaving. The words are cut into spans of random length
  in `[min_span, max_span]`; each span is spoken with probability `ratio` (so about that
  fraction of the words is speech); neighbouring spans of the same kind merge; at most
  `max_audio_spans` spoken spans (the audio slots), and at least one.
- `single_audio_span`: VoiceTextBlender's mixed-modal instruction: one spoken span.
- `whole_utterance`: all words spoken, as one slot cut nowhere.

A spoken span longer than `max_samples` is either refused or split into several
consecutive slots at word boundaries (the midpoint of the gap between two words); without
word timings the clip is cut into equal pieces and the transcript goes with the last one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from speechlm_jax.data.examples import Audio, ExampleError, Segment, Text


@dataclasses.dataclass(frozen=True)
class Span:
    """Words `[start, end)` of the content, spoken or written."""

    start: int
    end: int
    audio: bool


@dataclasses.dataclass(frozen=True)
class Words:
    """An utterance's words as written in its transcript, with their times in seconds."""

    text: tuple[str, ...]
    start: np.ndarray
    end: np.ndarray

    def __len__(self) -> int:
        return len(self.text)


def record_words(record: dict[str, Any]) -> Words | None:
    """The record's word timings, or None without them.

    The transcript's own spelling (case, punctuation) is kept when it has as many
    whitespace-separated words as there are timed words; otherwise the timed words are used.
    """
    timed = record.get("words")
    if not timed:
        return None
    written = record.get("text", "").split()
    text = tuple(written) if len(written) == len(timed) else tuple(str(w["w"]) for w in timed)
    start = np.asarray([float(w["start"]) for w in timed])
    end = np.asarray([float(w["end"]) for w in timed])
    if np.any(end < start) or np.any(np.diff(start) < 0):
        return None
    return Words(text, start, end)


def _merge(spans: list[Span]) -> list[Span]:
    merged: list[Span] = []
    for span in spans:
        if merged and merged[-1].audio == span.audio:
            merged[-1] = Span(merged[-1].start, span.end, span.audio)
        else:
            merged.append(span)
    return merged


def sample_spans(
    num_words: int, rng: np.random.Generator, *, ratio: float, min_span: int, max_span: int, max_audio_spans: int
) -> list[Span]:
    """Random spoken/written spans tiling `num_words` words (see the module docstring)."""
    if num_words < 1:
        raise ExampleError("empty_text")
    spans = []
    i = 0
    while i < num_words:
        length = int(rng.integers(min_span, max_span + 1))
        spans.append(Span(i, min(num_words, i + length), bool(rng.random() < ratio)))
        i += length
    if not any(s.audio for s in spans):
        k = int(rng.integers(len(spans)))
        spans[k] = dataclasses.replace(spans[k], audio=True)
    spans = _merge(spans)
    spoken = [k for k, s in enumerate(spans) if s.audio]
    if len(spoken) > max_audio_spans:
        keep = set(rng.choice(spoken, size=max_audio_spans, replace=False).tolist())
        spans = _merge([dataclasses.replace(s, audio=k in keep) if s.audio else s for k, s in enumerate(spans)])
    return spans


def single_audio_span(num_words: int, rng: np.random.Generator, *, min_span: int, max_span: int) -> list[Span]:
    """One spoken span of random length at a random place; the rest written."""
    if num_words < 1:
        raise ExampleError("empty_text")
    length = min(num_words, int(rng.integers(min_span, max_span + 1)))
    start = int(rng.integers(0, num_words - length + 1))
    spans = [Span(0, start, False), Span(start, start + length, True), Span(start + length, num_words, False)]
    return [s for s in spans if s.end > s.start]


def _join(words: Sequence[str], space: bool) -> str:
    return (" " if space else "") + " ".join(words)


def _split_timed(
    waveform: np.ndarray,
    words: Words,
    span: Span,
    lo: int,
    hi: int,
    max_samples: int,
    sample_rate: int,
    lead_space: bool,
) -> list[Audio]:
    """Cuts samples `[lo, hi)` holding words `span` into slots of at most `max_samples`."""
    # cut[i]: the sample where a slot may end before word i (gap midpoint), for i in the span.
    cuts = {
        i: min(hi, max(lo, int(round((words.end[i - 1] + words.start[i]) / 2 * sample_rate))))
        for i in range(span.start + 1, span.end)
    }
    cuts[span.end] = hi
    pieces = []
    first, piece_lo = span.start, lo
    while first < span.end:
        last = first + 1
        while last < span.end and cuts[last + 1] - piece_lo <= max_samples:
            last += 1
        if cuts[last] - piece_lo > max_samples:
            raise ExampleError("too_long", "a single word is longer than the largest audio bucket")
        space = lead_space or first > 0
        text = _join(words.text[first:last], space)
        pieces.append(Audio(waveform[piece_lo : cuts[last]], text))
        first, piece_lo = last, cuts[last]
    return pieces


def _split_untimed(waveform: np.ndarray, transcript: str, max_samples: int) -> list[Audio]:
    count = math.ceil(len(waveform) / max_samples)
    size = math.ceil(len(waveform) / count)
    clips = [waveform[i * size : (i + 1) * size] for i in range(count)]
    return [Audio(clip, transcript if i == count - 1 else "") for i, clip in enumerate(clips)]


def whole_utterance(
    waveform: np.ndarray,
    transcript: str,
    words: Words | None,
    *,
    lead_space: bool,
    max_samples: int,
    split_long: bool,
    sample_rate: int,
) -> list[Segment]:
    """The whole utterance spoken: one slot, or several when it is too long and may be split."""
    if len(waveform) <= max_samples:
        return [Audio(waveform, _join(transcript.split(), lead_space))]
    if not split_long:
        raise ExampleError("too_long", f"{len(waveform)} samples > {max_samples}")
    if words is None:
        return _split_untimed(waveform, _join(transcript.split(), lead_space), max_samples)
    span = Span(0, len(words), True)
    return _split_timed(waveform, words, span, 0, len(waveform), max_samples, sample_rate, lead_space)


def content_segments(
    waveform: np.ndarray,
    words: Words,
    spans: Sequence[Span],
    *,
    lead_space: bool,
    max_samples: int,
    split_long: bool,
    sample_rate: int,
    margin_s: float,
    min_samples: int = 1,
) -> list[Segment]:
    """Interleaved content: spoken spans cut from `waveform` by word timings, the rest text.

    A spoken span whose clip is shorter than `min_samples` (too short for one audio
    token) stays text.
    """
    segments: list[Segment] = []
    margin = margin_s * sample_rate
    for span in spans:
        space = lead_space or span.start > 0
        lo = max(0, int(round(words.start[span.start] * sample_rate - margin)))
        hi = min(len(waveform), int(round(words.end[span.end - 1] * sample_rate + margin)))
        if not span.audio or hi - lo < min_samples:
            text = _join(words.text[span.start : span.end], space)
            if segments and isinstance(segments[-1], Text):
                segments[-1] = Text(segments[-1].text + text)
            else:
                segments.append(Text(text))
            continue
        if hi - lo <= max_samples:
            segments.append(Audio(waveform[lo:hi], _join(words.text[span.start : span.end], space)))
        elif split_long:
            segments.extend(_split_timed(waveform, words, span, lo, hi, max_samples, sample_rate, lead_space))
        else:
            raise ExampleError("too_long", f"a spoken span of {hi - lo} samples > {max_samples}")
    return segments
