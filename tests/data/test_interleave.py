"""Interleaving word spans of speech and text from word timings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from speechlm_jax.data import interleave
from speechlm_jax.data.examples import Audio, ExampleError, Text, build_example, prompt_segments
from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer

SR = 16000
SENTENCE = "The quick brown fox jumps over the lazy dog today"


def _words(text: str = SENTENCE, word_s: float = 0.3, gap_s: float = 0.1) -> tuple[np.ndarray, interleave.Words]:
    """A waveform whose sample values encode the word they belong to (word k -> k + 1, gaps 0)."""
    tokens = text.split()
    starts = np.asarray([gap_s + k * (word_s + gap_s) for k in range(len(tokens))])
    ends = starts + word_s
    waveform = np.zeros(int(round((ends[-1] + gap_s) * SR)), np.int16)
    for k, (s, e) in enumerate(zip(starts, ends)):
        waveform[int(round(s * SR)) : int(round(e * SR))] = k + 1
    record = {
        "text": text,
        "words": [{"w": w.lower().strip(".,"), "start": s, "end": e} for w, s, e in zip(tokens, starts, ends)],
    }
    words = interleave.record_words(record)
    assert words.text == tuple(tokens)
    return waveform, words


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    ratio=st.floats(0.0, 1.0),
    lo=st.integers(1, 4),
    extra=st.integers(0, 4),
    slots=st.integers(1, 4),
    seed=st.integers(0, 2**31),
)
def test_sample_spans_tile_the_words(n, ratio, lo, extra, slots, seed):
    spans = interleave.sample_spans(
        n, np.random.default_rng(seed), ratio=ratio, min_span=lo, max_span=lo + extra, max_audio_spans=slots
    )
    assert spans[0].start == 0 and spans[-1].end == n
    assert all(a.end == b.start and a.audio != b.audio for a, b in zip(spans, spans[1:]))
    assert 1 <= sum(s.audio for s in spans) <= slots


def test_ratio_is_the_spoken_fraction():
    rng = np.random.default_rng(0)
    spoken = total = 0
    for _ in range(300):
        spans = interleave.sample_spans(30, rng, ratio=0.3, min_span=1, max_span=3, max_audio_spans=30)
        spoken += sum(s.end - s.start for s in spans if s.audio)
        total += 30
    assert abs(spoken / total - 0.3) < 0.03


def test_single_audio_span():
    for seed in range(20):
        spans = interleave.single_audio_span(10, np.random.default_rng(seed), min_span=2, max_span=4)
        spoken = [s for s in spans if s.audio]
        assert len(spoken) == 1 and 2 <= spoken[0].end - spoken[0].start <= 4
        assert spans[0].start == 0 and spans[-1].end == 10


def test_content_segments_cut_the_right_words():
    waveform, words = _words()
    spans = [
        interleave.Span(0, 2, False),
        interleave.Span(2, 5, True),
        interleave.Span(5, 7, False),
        interleave.Span(7, 10, True),
    ]
    segments = interleave.content_segments(
        waveform,
        words,
        spans,
        lead_space=True,
        max_samples=10 * SR,
        split_long=False,
        sample_rate=SR,
        margin_s=0.02,
    )
    assert [type(s) for s in segments] == [Text, Audio, Text, Audio]
    assert segments[0].text == " The quick" and segments[2].text == " over the"
    assert segments[1].transcript == " brown fox jumps" and segments[3].transcript == " lazy dog today"
    # The clips hold exactly the spans' words (values k + 1) and the margins only silence.
    assert set(np.unique(segments[1].waveform)) == {0, 3, 4, 5}
    assert set(np.unique(segments[3].waveform)) == {0, 8, 9, 10}
    assert segments[1].waveform[0] == 0 and segments[1].waveform[int(0.02 * SR)] == 3


def test_long_spans_split_at_word_boundaries():
    waveform, words = _words()
    spans = [interleave.Span(0, 10, True)]
    with pytest.raises(ExampleError, match="samples"):
        interleave.content_segments(
            waveform,
            words,
            spans,
            lead_space=False,
            max_samples=SR,
            split_long=False,
            sample_rate=SR,
            margin_s=0.0,
        )
    pieces = interleave.content_segments(
        waveform,
        words,
        spans,
        lead_space=False,
        max_samples=SR,
        split_long=True,
        sample_rate=SR,
        margin_s=0.0,
    )
    assert all(isinstance(p, Audio) and len(p.waveform) <= SR for p in pieces)
    assert "".join(p.transcript for p in pieces) == SENTENCE
    np.testing.assert_array_equal(
        np.concatenate([p.waveform for p in pieces]), waveform[int(0.1 * SR) : int(round(words.end[-1] * SR))]
    )
    offset = 0
    for piece in pieces:
        count = len(piece.transcript.split())
        assert set(np.unique(piece.waveform)) - {0} == set(range(offset + 1, offset + count + 1))
        offset += count
    with pytest.raises(ExampleError, match="single word"):
        interleave.content_segments(
            waveform,
            words,
            spans,
            lead_space=False,
            max_samples=SR // 10,
            split_long=True,
            sample_rate=SR,
            margin_s=0.0,
        )


def test_whole_utterance_untimed_split():
    waveform = np.arange(35000, dtype=np.int16)
    pieces = interleave.whole_utterance(
        waveform, "a b  c", None, lead_space=True, max_samples=16000, split_long=True, sample_rate=SR
    )
    assert [len(p.waveform) for p in pieces] == [11667, 11667, 11666]
    assert [p.transcript for p in pieces] == ["", "", " a b c"]
    np.testing.assert_array_equal(np.concatenate([p.waveform for p in pieces]), waveform)
    assert (
        interleave.whole_utterance(
            waveform, "a", None, lead_space=False, max_samples=40000, split_long=False, sample_rate=SR
        )[0].transcript
        == "a"
    )


def test_interleaved_example_keeps_word_order_and_teacher_reads_the_transcript(tmp_path):
    tok = load_tokenizer(build_word_tokenizer([SENTENCE, "Repeat"], tmp_path / "tok"))
    waveform, words = _words()
    rng = np.random.default_rng(3)
    for _ in range(20):
        spans = interleave.sample_spans(len(words), rng, ratio=0.5, min_span=1, max_span=3, max_audio_spans=3)
        content = interleave.content_segments(
            waveform,
            words,
            spans,
            lead_space=True,
            max_samples=10 * SR,
            split_long=False,
            sample_rate=SR,
            margin_s=0.02,
        )
        ex = build_example(prompt_segments(tok, "Repeat {content}", content, SENTENCE), tok, downsample=4)
        frame = tok.chat_frame
        teacher_user = tok.encode(frame.prefix + "Repeat")
        content = ex.teacher_tokens[len(teacher_user) : len(teacher_user) + len(words)]
        assert tok.decode(content) == SENTENCE
        # Read the student's content back: written words as tokens, spoken words from the
        # clips (sample value k + 1 marks word k).
        spoken_words = SENTENCE.split()
        read = []
        for t in range(len(teacher_user), len(ex.tokens)):
            if ex.tokens[t] == tok.eos_id:
                break
            if ex.audio_slot[t] < 0:
                read.append(tok.hf.convert_ids_to_tokens(int(ex.tokens[t])))
            elif ex.audio_frame[t] == 0:
                clip = ex.audio[ex.audio_slot[t]]
                read += [spoken_words[v - 1] for v in sorted(int(v) for v in np.unique(clip) if v > 0)]
        assert read == spoken_words
        assert len(ex.audio) == sum(s.audio for s in spans)


def test_spans_too_short_for_a_frame_stay_text():
    waveform, words = _words()
    spans = [
        interleave.Span(0, 2, False),
        interleave.Span(2, 3, True),
        interleave.Span(3, 5, False),
        interleave.Span(5, 7, True),
        interleave.Span(7, 10, False),
    ]
    # One word is 0.3 s; with a 0.4 s minimum only the two-word span stays spoken.
    segments = interleave.content_segments(
        waveform,
        words,
        spans,
        lead_space=False,
        max_samples=10 * SR,
        split_long=False,
        sample_rate=SR,
        margin_s=0.0,
        min_samples=int(0.4 * SR),
    )
    assert [type(s) for s in segments] == [Text, Audio, Text]
    assert segments[0].text == "The quick brown fox jumps"
    assert segments[1].transcript == " over the" and segments[2].text == " lazy dog today"
