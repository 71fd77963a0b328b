"""Offline TTS, the engine: eSpeak NG through ctypes, speech with word timings.

Where the recipes need speech that no dataset has (SALAD's stage-2 targeted data, spoken
versions of text SFT data, the toy world), this module speaks it; `tts_corpus` writes what
it speaks to disk as an ordinary corpus that the data sources read like any other (the
start of the data flow: sources -> examples -> buckets -> batches). Word timings let the
interleaving step swap single words between speech and text.

Engines plug in through the `Synthesizer` protocol: any object with a `sample_rate`
attribute and `synthesize(text, voice) -> SynthResult` works (see `EspeakSynthesizer`).
`voice_grid` lists the voices a corpus draws from.

The built-in engine is eSpeak NG through ctypes, with the library and voice data from the
`espeakng-loader` wheel (no network, no system packages). libespeak-ng keeps global state
and is not thread-safe, so parallelism is processes, each initialising it once.
"""

import ctypes
import dataclasses
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import espeakng_loader
import numpy as np
import soxr

from speechlm_jax.data.audio import to_int16

SAMPLE_RATE = 16000
_AUDIBLE = 0.02  # a sample (or 10 ms frame peak) above this fraction of the peak is speech

# English voices of the bundled data (language or file name) and eSpeak variants to mix in.
ENGLISH_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029", "en-us-nyc")
VARIANTS = ("f1", "f2", "f3", "f4", "m1", "m2", "m3", "m4", "m7")
DEFAULT_VOICE_NAMES = ("en-us", "en-gb", "en-us+f3", "en+m3", "en-gb-scotland+f2", "en-029+m1")


@dataclasses.dataclass(frozen=True)
class Voice:
    """A speaking style: eSpeak voice name (optionally `+variant`), words per minute, pitch 0-100."""

    name: str = "en-us"
    rate: int = 175
    pitch: int = 50

    def __post_init__(self):
        if not 80 <= self.rate <= 450:
            raise ValueError(f"rate must be in [80, 450] words per minute, got {self.rate}")
        if not 0 <= self.pitch <= 100:
            raise ValueError(f"pitch must be in [0, 100], got {self.pitch}")

    @property
    def key(self) -> str:
        """A stable string naming the voice, e.g. `en-us+f3_r175_p50`."""
        return f"{self.name}_r{self.rate}_p{self.pitch}"


@dataclasses.dataclass
class SynthResult:
    """audio: int16 [samples] at the synthesizer's sample_rate; words: one
    `{"w": str, "start": float, "end": float}` (seconds) per whitespace-separated word of
    the text, in order."""

    audio: np.ndarray
    words: list[dict[str, Any]]


class Synthesizer(Protocol):
    """A TTS engine: speaks text in a voice, with the start and end of every word."""

    sample_rate: int

    def synthesize(self, text: str, voice: Voice) -> SynthResult: ...


def voice_grid(names: Sequence[str], rates: Sequence[int], pitches: Sequence[int]) -> list[Voice]:
    """Every combination of voice names, rates and pitches, in a fixed order."""
    return [Voice(n, r, p) for n in names for r in rates for p in pitches]


# eSpeak NG's C API (speak_lib.h), the parts used here.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_INITIALIZE_DONT_EXIT = 0x8000
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_RATE, _PITCH = 1, 3
_EVENT_LIST_TERMINATED, _EVENT_WORD = 0, 1


class _EspeakEvent(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_int),
        ("unique_identifier", ctypes.c_uint),
        ("text_position", ctypes.c_int),  # 1-based, in characters
        ("length", ctypes.c_int),
        ("audio_position", ctypes.c_int),  # milliseconds from the start of the text
        ("sample", ctypes.c_int),
        ("user_data", ctypes.c_void_p),
        ("id", ctypes.c_char * 8),  # union {int number; const char *name; char string[8]}
    ]


class _EspeakVoice(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_char_p),
        ("languages", ctypes.c_void_p),  # (priority byte, name, NUL)*, then a 0 byte
        ("identifier", ctypes.c_char_p),
        ("gender", ctypes.c_ubyte),
        ("age", ctypes.c_ubyte),
        ("variant", ctypes.c_ubyte),
        ("xx1", ctypes.c_ubyte),
        ("score", ctypes.c_int),
        ("spare", ctypes.c_void_p),
    ]


_SynthCallback = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_EspeakEvent)
)


class _Espeak:
    """The process-wide libespeak-ng instance (initialised once, used under a lock)."""

    _instance: "_Espeak | None" = None
    _create_lock = threading.Lock()

    @classmethod
    def get(cls) -> "_Espeak":
        with cls._create_lock:
            if cls._instance is None:
                cls._instance = cls()
            return cls._instance

    def __init__(self):
        self.lock = threading.Lock()
        self.data_path = Path(espeakng_loader.get_data_path())
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        lib.espeak_SetSynthCallback.argtypes = [_SynthCallback]
        lib.espeak_Synth.argtypes = [
            ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
            ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p,
        ]  # fmt: skip
        lib.espeak_ListVoices.argtypes = [ctypes.c_void_p]
        lib.espeak_ListVoices.restype = ctypes.POINTER(ctypes.POINTER(_EspeakVoice))
        self.sample_rate = lib.espeak_Initialize(
            _AUDIO_OUTPUT_SYNCHRONOUS, 0, str(self.data_path).encode(), _INITIALIZE_DONT_EXIT
        )
        if self.sample_rate <= 0:
            raise RuntimeError(f"espeak_Initialize failed with data at {self.data_path}")
        self.lib = lib
        self.identifiers = self._voice_identifiers()
        self._chunks: list[np.ndarray] = []
        self._words: list[tuple[int, int]] = []
        # Kept on the instance: ctypes would free the trampoline if the object were dropped.
        self._callback = _SynthCallback(self._on_audio)
        lib.espeak_SetSynthCallback(self._callback)

    def _voice_identifiers(self) -> dict[str, str]:
        """Maps language codes and file names (lower-case) to voice identifiers like `gmw/en-US`."""
        table: dict[str, str] = {}
        voices = self.lib.espeak_ListVoices(None)
        i = 0
        while voices[i]:
            voice = voices[i].contents
            identifier = voice.identifier.decode()
            table.setdefault(identifier.rsplit("/", 1)[-1].lower(), identifier)
            offset = voice.languages
            while ctypes.c_ubyte.from_address(offset).value:  # the priority byte
                language = ctypes.string_at(offset + 1)
                table.setdefault(language.decode().lower(), identifier)
                offset += len(language) + 2
            i += 1
        return table

    def _on_audio(self, wav, num_samples, events) -> int:
        if num_samples > 0 and wav:
            self._chunks.append(np.ctypeslib.as_array(wav, (num_samples,)).copy())
        i = 0
        while events[i].type != _EVENT_LIST_TERMINATED:
            if events[i].type == _EVENT_WORD:
                self._words.append((events[i].text_position - 1, events[i].audio_position))
            i += 1
        return 0

    def resolve(self, name: str) -> str:
        base, _, variant = name.partition("+")
        identifier = self.identifiers.get(base.lower())
        if identifier is None:
            english = sorted(k for k in self.identifiers if k.startswith("en"))
            raise ValueError(f"unknown eSpeak voice {base!r}; English voices: {english}")
        if variant and not (self.data_path / "voices" / "!v" / variant).is_file():
            raise ValueError(f"unknown eSpeak variant {variant!r} in {name!r}")
        return identifier + (f"+{variant}" if variant else "")

    def speak(self, text: str, voice: Voice) -> tuple[np.ndarray, list[tuple[int, int]]]:
        """int16 audio at self.sample_rate and (character index, ms) of every word event."""
        with self.lock:
            if self.lib.espeak_SetVoiceByName(self.resolve(voice.name).encode()) != 0:
                raise ValueError(f"eSpeak could not load voice {voice.name!r}")
            self.lib.espeak_SetParameter(_RATE, voice.rate, 0)
            self.lib.espeak_SetParameter(_PITCH, voice.pitch, 0)
            self._chunks, self._words = [], []
            data = text.encode("utf-8")
            status = self.lib.espeak_Synth(data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            if status != 0:
                raise RuntimeError(f"espeak_Synth failed with status {status}")
            audio = np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)
            return audio, self._words


def _speech_end(audio: np.ndarray) -> int:
    """Index after the last audible sample (0 for silence)."""
    magnitude = np.abs(audio.astype(np.int32))
    loud = np.nonzero(magnitude > _AUDIBLE * max(int(magnitude.max(initial=0)), 1))[0]
    return int(loud[-1]) + 1 if loud.size else 0


def _trim_pauses(words: list[dict[str, Any]], audio: np.ndarray, sample_rate: int) -> list[dict[str, Any]]:
    """Moves each word's end back to its last audible 10 ms frame, so pauses after a word
    (commas, sentence ends) are not counted as part of it."""
    frame = sample_rate // 100
    num_frames = len(audio) // frame
    peaks = np.abs(audio[: num_frames * frame].astype(np.int32)).reshape(num_frames, frame).max(axis=1)
    loud = peaks > _AUDIBLE * max(int(peaks.max(initial=0)), 1)
    trimmed = []
    for word in words:
        first, last = int(word["start"] * 100), min(int(np.ceil(word["end"] * 100)), num_frames)
        audible = np.nonzero(loud[first:last])[0]
        end = word["end"] if audible.size == 0 else min(word["end"], (first + audible[-1] + 1) / 100)
        trimmed.append({**word, "end": round(float(max(end, word["start"])), 3)})
    return trimmed


def word_timings(text: str, events: Sequence[tuple[int, float]], speech_end: float) -> list[dict[str, Any]]:
    """Start/end seconds for each whitespace-separated word of `text`.

    events: (character index into text, seconds) at which the engine starts a word. A word
    starts at its first event; one with no event of its own (a lone dash, say) starts where
    the next word starts, with zero length. Each word ends where the next begins; the last
    ends at `speech_end` (the end of audible speech). Times never decrease.
    """
    spans = [(m.start(), m.end(), m.group()) for m in re.finditer(r"\S+", text)]
    starts: list[float | None] = [None] * len(spans)
    token = 0
    for char, seconds in sorted(events, key=lambda e: e[1]):
        while token < len(spans) and spans[token][1] <= char:
            token += 1
        if token < len(spans) and spans[token][0] <= char and starts[token] is None:
            starts[token] = seconds
    following = speech_end
    for i in reversed(range(len(spans))):
        if starts[i] is None or starts[i] > following:
            starts[i] = following
        following = starts[i]
    ends = starts[1:] + [speech_end]
    return [
        {"w": word, "start": round(start, 3), "end": round(end, 3)}
        for (_, _, word), start, end in zip(spans, starts, ends)
    ]


class EspeakSynthesizer:
    """eSpeak NG speech at 16 kHz with word timings from its word events.

    eSpeak speaks at 22050 Hz; audio is resampled with soxr and trailing silence beyond
    `tail_seconds` after the last audible sample is cut. Word ends exclude the pause
    that follows a word (see `_trim_pauses`). eSpeak NG's output varies by a few
    milliseconds from call to call, so a corpus is reproducible in its items, voices and
    words, not bit for bit.
    """

    sample_rate = SAMPLE_RATE

    def __init__(self, tail_seconds: float = 0.1):
        self.tail_seconds = tail_seconds

    def synthesize(self, text: str, voice: Voice) -> SynthResult:
        if not text.strip():
            raise ValueError("cannot synthesize empty text")
        engine = _Espeak.get()
        audio, events = engine.speak(text, voice)
        native = engine.sample_rate
        end = _speech_end(audio)
        if end == 0:
            raise RuntimeError(f"eSpeak produced no audible speech for {text!r}")
        audio = audio[: min(len(audio), end + int(self.tail_seconds * native))]
        words = word_timings(text, [(c, ms / 1000.0) for c, ms in events], end / native)
        words = _trim_pauses(words, audio, native)
        resampled = soxr.resample(audio.astype(np.float32) / 32768.0, native, self.sample_rate)
        return SynthResult(audio=to_int16(resampled), words=words)
