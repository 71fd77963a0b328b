"""eSpeak synthesis with word timings: voices, rates and pitches, words without events."""

import numpy as np
import pytest

from speechlm_jax.data.tts import ENGLISH_VOICES, VARIANTS, EspeakSynthesizer, Voice, word_timings


def test_espeak_words_and_timings():
    text = "The quick brown fox jumps over the lazy dog, twice."
    result = EspeakSynthesizer().synthesize(text, Voice("en-us", 175, 50))
    duration = len(result.audio) / 16000
    assert result.audio.dtype == np.int16 and 1.5 < duration < 6.0
    assert np.sqrt(np.mean(result.audio.astype(np.float64) ** 2)) > 300  # audible speech
    assert [w["w"] for w in result.words] == text.split()
    starts = [w["start"] for w in result.words]
    assert starts[0] == 0.0 and all(a < b for a, b in zip(starts, starts[1:]))
    for word in result.words:
        assert word["start"] < word["end"] <= duration
    # The pause after the comma is not part of "dog,".
    dog, twice = result.words[-2], result.words[-1]
    assert dog["end"] < twice["start"]


def test_voices_rates_and_pitches_change_the_speech():
    synth = EspeakSynthesizer()
    text = "Hello there, general listener."
    slow = synth.synthesize(text, Voice("en-us", 120, 50)).audio
    fast = synth.synthesize(text, Voice("en-us", 300, 50)).audio
    assert len(fast) < 0.7 * len(slow)
    high = synth.synthesize(text, Voice("en-us", 175, 90)).audio
    low = synth.synthesize(text, Voice("en-us", 175, 10)).audio
    assert not np.array_equal(high[: len(low)], low[: len(high)])
    for name in ENGLISH_VOICES + tuple(f"en-us+{variant}" for variant in VARIANTS) + ("en+m3",):
        assert len(synth.synthesize("Yes.", Voice(name)).audio) > 1600
    with pytest.raises(ValueError, match="unknown eSpeak voice"):
        synth.synthesize(text, Voice("xx-nowhere"))
    with pytest.raises(ValueError, match="variant"):
        synth.synthesize(text, Voice("en-us+nobody"))
    with pytest.raises(ValueError, match="rate"):
        Voice("en-us", rate=20)


def test_word_timings_fill_words_without_events():
    # "—" has no event of its own: it gets zero length where "six!" starts.
    words = word_timings("Four, five — six!", [(0, 0.0), (6, 0.4), (13, 0.9)], speech_end=1.3)
    assert words == [
        {"w": "Four,", "start": 0.0, "end": 0.4},
        {"w": "five", "start": 0.4, "end": 0.9},
        {"w": "—", "start": 0.9, "end": 0.9},
        {"w": "six!", "start": 0.9, "end": 1.3},
    ]
