"""Spoken corpora on disk: sentences -> 16 kHz FLAC files and a JSONL manifest, resumably.

The start of the data flow for text-only data (sources -> examples -> buckets -> batches):
`synthesize_corpus` speaks `{"id", "text"}` items with a `tts.Synthesizer` (eSpeak NG by
default) and writes an ordinary corpus, a manifest or a LibriSpeech-style tree, that the
data sources (`sources.manifest_source`, `sources.librispeech_source`) read like any
other. Results at another rate than 16 kHz are resampled when written. With `workers > 1`
the synthesizer object is pickled into each worker process, so keep heavy state (models,
library handles) out of `__init__` and create it on first use. From the command line:
`speechlm-synth` (`synth_cli`), e.g. `--synthesizer my_module:MyTTS`, which calls `MyTTS()`.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import soxr
from tqdm import tqdm

from speechlm_jax.data.audio import AudioError, audio_duration, save_audio, to_int16
from speechlm_jax.data.tts import SAMPLE_RATE, EspeakSynthesizer, Synthesizer, Voice

UTTERANCES_PER_CHAPTER = 100  # librispeech layout: consecutive utterances of a speaker per chapter
_JOURNAL = ".synth_progress.jsonl"


@dataclasses.dataclass(frozen=True)
class _Job:
    id: str
    text: str
    voice: Voice
    audio: str  # relative to the output folder
    speaker: str


@dataclasses.dataclass
class CorpusReport:
    """What a `synthesize_corpus` run did; `failed` holds (item id, error message)."""

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
        audio = to_int16(soxr.resample(audio.astype(np.float32) / 32768.0, synthesizer.sample_rate, SAMPLE_RATE))
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
) -> CorpusReport:
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
    items. Items whose synthesis fails are left out and listed in the report's `failed`.
    """
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
