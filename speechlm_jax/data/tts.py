"""Offline TTS: speech with word timings for text-only data, and corpora written to disk.

Where the recipes need speech that no dataset has (SALAD's stage-2 targeted data, spoken
versions of text SFT data, the toy world), this module synthesises it. The output is an
ordinary corpus (16 kHz FLAC files and a JSONL manifest, or a LibriSpeech-style tree) that
the data sources read like any other; word timings let the interleaving step swap single
words between speech and text.

Engines plug in through the `Synthesizer` protocol: any object with a `sample_rate`
attribute and `synthesize(text, voice) -> SynthResult` works (see `EspeakSynthesizer`).
Results at another rate are resampled to 16 kHz when written. With `workers > 1` the
synthesizer object is pickled into each worker process, so keep heavy state (models,
library handles) out of `__init__` and create it on first use. From the command line:
`speechlm-synth --synthesizer my_module:MyTTS`, which calls `MyTTS()`.

The built-in engine is eSpeak NG through ctypes, with the library and voice data from the
`espeakng-loader` wheel (no network, no system packages). libespeak-ng keeps global state
and is not thread-safe, so parallelism is processes, each initialising it once.
"""

import concurrent.futures
import ctypes
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import espeakng_loader
import numpy as np
import soxr
from tqdm import tqdm

from speechlm_jax.data.audio import AudioError, audio_duration, save_audio, to_int16

SAMPLE_RATE = 16000
UTTERANCES_PER_CHAPTER = 100  # librispeech layout: consecutive utterances of a speaker per chapter
_JOURNAL = ".synth_progress.jsonl"
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


@dataclasses.dataclass(frozen=True)
class _Job:
    id: str
    text: str
    voice: Voice
    audio: str  # relative to the output folder
    speaker: str


@dataclasses.dataclass
class CorpusReport:
    """What a `build_corpus` run did; `failed` holds (item id, error message)."""

    manifest: Path
    synthesized: int
    reused: int
    failed: list[tuple[str, str]]
    seconds: float  # total audio in the manifest

    def summary(self) -> str:
        return (
            f"{self.synthesized + self.reused} utterances ({self.seconds / 60:.1f} min) in "
            f"{self.manifest}: {self.synthesized} synthesized, {self.reused} already done, "
            f"{len(self.failed)} failed"
        )


def _voice_index(seed: int, item_id: str, num_voices: int) -> int:
    # A hash of (seed, id), not a running RNG: an item keeps its voice when the input is
    # reordered, extended or resumed.
    digest = hashlib.sha256(f"{seed}\0{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % num_voices


def _plan(items: Iterable[Mapping[str, Any]], voices: Sequence[Voice], layout: str, seed: int) -> list[_Job]:
    jobs, seen_ids, seen_paths = [], set(), set()
    utterances_per_speaker = [0] * len(voices)
    for item in items:
        item_id, text = str(item["id"]), " ".join(str(item["text"]).split())
        if item_id in seen_ids:
            raise ValueError(f"duplicate item id {item_id!r}")
        if not text:
            raise ValueError(f"item {item_id!r} has empty text")
        seen_ids.add(item_id)
        v = _voice_index(seed, item_id, len(voices))
        if layout == "librispeech":
            speaker = str(v + 1)
            n = utterances_per_speaker[v]
            utterances_per_speaker[v] += 1
            chapter = str(n // UTTERANCES_PER_CHAPTER + 1)
            name = f"{speaker}-{chapter}-{n % UTTERANCES_PER_CHAPTER:04d}.flac"
            audio = f"{speaker}/{chapter}/{name}"
        else:
            speaker = voices[v].key
            audio = "audio/" + re.sub(r"[^A-Za-z0-9._-]", "_", item_id) + ".flac"
            if audio in seen_paths:
                raise ValueError(f"item id {item_id!r} collides with another as file {audio}")
            seen_paths.add(audio)
        jobs.append(_Job(item_id, text, voices[v], audio, speaker))
    return jobs


def _finished(out_dir: Path, jobs: Sequence[_Job]) -> dict[str, dict[str, Any]]:
    """Journal records of earlier runs whose audio file is still there and readable."""
    journal = out_dir / _JOURNAL
    if not journal.is_file():
        return {}
    wanted = {job.id: job for job in jobs}
    done = {}
    for line in journal.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by an interrupted run
        job = wanted.get(record.get("id")) if isinstance(record, dict) else None
        planned = None if job is None else (job.audio, job.text, job.voice.key)
        if planned is None or tuple(record.get(k) for k in ("audio", "text", "voice")) != planned:
            continue
        try:
            audio_duration(out_dir / job.audio)
        except AudioError:
            continue
        done[job.id] = record
    return done


def _render(synthesizer: Synthesizer, out_dir: Path, job: _Job) -> dict[str, Any]:
    """Synthesises one item, writes its 16 kHz FLAC and returns its manifest record."""
    result = synthesizer.synthesize(job.text, job.voice)
    audio = np.asarray(result.audio)
    if audio.dtype != np.int16 or audio.ndim != 1 or audio.size == 0:
        raise ValueError(f"synthesizer returned {audio.dtype} {audio.shape}; expected int16 [samples]")
    if synthesizer.sample_rate != SAMPLE_RATE:
        audio = to_int16(
            soxr.resample(audio.astype(np.float32) / 32768.0, synthesizer.sample_rate, SAMPLE_RATE)
        )
    save_audio(out_dir / job.audio, audio, SAMPLE_RATE)
    return {
        "id": job.id,
        "audio": job.audio,
        "text": job.text,
        "words": result.words,
        "speaker": job.speaker,
        "voice": job.voice.key,
        "duration": round(len(audio) / SAMPLE_RATE, 3),
    }


_worker_synthesizer: Synthesizer | None = None


def _init_worker(synthesizer: Synthesizer) -> None:
    global _worker_synthesizer
    _worker_synthesizer = synthesizer


def _render_in_worker(out_dir: Path, job: _Job) -> dict[str, Any]:
    return _render(_worker_synthesizer, out_dir, job)


def _run(
    synthesizer: Synthesizer, out_dir: Path, jobs: Sequence[_Job], workers: int
) -> Iterator[tuple[_Job, dict[str, Any] | None, str | None]]:
    """Yields (job, record, None) or (job, None, error) as items finish."""
    if workers <= 1:
        for job in jobs:
            try:
                yield job, _render(synthesizer, out_dir, job), None
            except Exception as e:  # noqa: BLE001 - one bad item must not stop the corpus
                yield job, None, f"{type(e).__name__}: {e}"
        return
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        workers, mp_context=context, initializer=_init_worker, initargs=(synthesizer,)
    ) as pool:
        pending, queue = {}, iter(jobs)
        while True:
            # A bounded window of submitted jobs keeps memory flat for large corpora.
            for job in queue:
                pending[pool.submit(_render_in_worker, out_dir, job)] = job
                if len(pending) >= 4 * workers:
                    break
            if not pending:
                return
            done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
            for future in done:
                job = pending.pop(future)
                try:
                    yield job, future.result(), None
                except Exception as e:  # noqa: BLE001 - one bad item must not stop the corpus
                    yield job, None, f"{type(e).__name__}: {e}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def librispeech_transcript(text: str) -> str:
    """LibriSpeech's transcript style: upper case, no punctuation except apostrophes in words."""
    return " ".join(re.sub(r"[^\w']+|(?<!\w)'|'(?!\w)|_", " ", text.upper()).split())


def _write_librispeech_transcripts(out_dir: Path, records: Sequence[dict[str, Any]]) -> None:
    chapters: dict[Path, list[str]] = {}
    for record in records:
        audio = Path(record["audio"])
        chapters.setdefault(audio.parent, []).append(f"{audio.stem} {librispeech_transcript(record['text'])}")
    for folder, lines in chapters.items():
        speaker, chapter = folder.parts
        _write_atomic(out_dir / folder / f"{speaker}-{chapter}.trans.txt", "\n".join(sorted(lines)) + "\n")


def build_corpus(
    items: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    voices: Sequence[Voice],
    workers: int = 1,
    synthesizer: Synthesizer | None = None,
    layout: str = "manifest",
    seed: int = 0,
    progress: bool = False,
) -> CorpusReport:
    """`synthesize_corpus`, returning counts as well as the manifest path."""
    if layout not in ("manifest", "librispeech"):
        raise ValueError(f"layout must be 'manifest' or 'librispeech', got {layout!r}")
    if not voices:
        raise ValueError("need at least one voice")
    synthesizer = synthesizer if synthesizer is not None else EspeakSynthesizer()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = _plan(items, voices, layout, seed)
    records = _finished(out_dir, jobs)
    reused = len(records)
    todo = [job for job in jobs if job.id not in records]
    failed = []
    with open(out_dir / _JOURNAL, "a", encoding="utf-8") as journal:
        for job, record, error in tqdm(
            _run(synthesizer, out_dir, todo, workers), total=len(todo), disable=not progress, unit="utt"
        ):
            if record is None:
                failed.append((job.id, error))
                continue
            records[job.id] = record
            journal.write(json.dumps(record, ensure_ascii=False) + "\n")
            journal.flush()
    ordered = [records[job.id] for job in jobs if job.id in records]
    manifest = out_dir / "manifest.jsonl"
    _write_atomic(manifest, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ordered))
    if layout == "librispeech":
        _write_librispeech_transcripts(out_dir, ordered)
    return CorpusReport(
        manifest=manifest,
        synthesized=len(ordered) - reused,
        reused=reused,
        failed=failed,
        seconds=sum(r["duration"] for r in ordered),
    )


def synthesize_corpus(
    items: Iterable[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    *,
    voices: Sequence[Voice],
    workers: int = 1,
    synthesizer: Synthesizer | None = None,
    layout: str = "manifest",
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Speaks every `{"id", "text"}` item to 16 kHz FLAC and writes `out_dir/manifest.jsonl`.

    Each item gets a voice from `voices` chosen by a hash of (seed, id), so reruns and
    resumed runs agree. Manifest lines are `{"id", "audio", "text", "words", "speaker",
    "voice", "duration"}` in input order, `audio` relative to `out_dir`, `words` as in
    `SynthResult`. layout="manifest" writes `audio/<id>.flac` with speaker = the voice key;
    layout="librispeech" writes `<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac` plus
    `<speaker>-<chapter>.trans.txt` (`librispeech_transcript` of the text), where speaker
    = voice index + 1 and a chapter holds 100 consecutive utterances of that speaker in
    input order.
    Resumable: finished items (recorded in `out_dir/.synth_progress.jsonl` with a readable
    audio file) are not synthesised again, and the manifest is rebuilt from all finished
    items. Items whose synthesis fails are left out (see `build_corpus` for the count).
    """
    return build_corpus(
        items,
        out_dir,
        voices=voices,
        workers=workers,
        synthesizer=synthesizer,
        layout=layout,
        seed=seed,
        progress=progress,
    ).manifest
