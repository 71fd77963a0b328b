"""Speech manifests of other toolkits as sources: Lhotse cut sets and NeMo manifests.

    {"type": "lhotse", "path": "cuts.jsonl.gz"}    a Lhotse `CutSet` (JSONL, gzipped or not)
    {"type": "nemo", "path": "train_manifest.json"}  NeMo lines {"audio_filepath", "duration",
                                                    "text", "offset"?}

Both name segments of longer recordings (a cut's `start` and `duration` in its recording; a
NeMo line's `offset` and `duration`), so their records carry `"offset"` and `"duration"` (and
a Lhotse cut on one channel of a multi-channel file its `"channel"`), and the pipeline reads
only that segment of the file (`audio.AudioSegment`). Only metadata is read here, as for every
source; audio is decoded per example.

Lhotse cuts (`MonoCut`, as `CutSet.to_file` writes them, recording and supervisions inline):
the transcript is the supervisions' texts in time order; word timings come from the
supervisions' `alignment["word"]` when every supervision has one (Lhotse keeps alignment times
in recording time; they are shifted to the cut's). A relative audio path is relative to the
working directory, as Lhotse reads it. Cuts Lhotse can describe but this reader cannot play
(a `MixedCut`, a URL, command or in-memory audio source, a speed or volume transform) are
`bad_record`.

NeMo lines follow its documented ASR manifest schema; audio is read from `offset` (default 0)
for `duration` seconds, as NeMo's ASR datasets read it. A relative `audio_filepath` is
relative to the manifest's folder, as NeMo resolves it.

Every line that cannot become a record is counted (`bad_json`, `bad_record`, `no_transcript`)
and logged with the file, the line number and what is wrong.
"""

from __future__ import annotations

import gzip
import json
import logging
import numbers
import os
from collections import Counter
from collections.abc import Iterator
from typing import Any

from speechlm_jax import storage
from speechlm_jax.data.sources import ListSource

log = logging.getLogger(__name__)

_LOGGED_LINES = 10  # lines of one file that are logged one by one; later ones are only counted


class _Skips:
    """The skipped lines of one manifest: counted by cause, the first ones logged with their line."""

    def __init__(self, path: str):
        self.path = path
        self.counts: Counter = Counter()

    def __call__(self, line: int, cause: str, why: str) -> None:
        self.counts[cause] += 1
        if sum(self.counts.values()) <= _LOGGED_LINES:
            log.warning("%s line %d: %s; skipped as %s", self.path, line, why, cause)

    def summary(self) -> None:
        total = sum(self.counts.values())
        if total > _LOGGED_LINES:
            log.warning("%s: %d lines skipped in all (%s)", self.path, total, dict(self.counts))


def _lines(path: str, skips: _Skips) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSONL file, gzipped when its name ends in .gz."""
    with storage.path(path).open("rb") as raw:
        f = gzip.open(raw, "rt", encoding="utf-8") if path.endswith(".gz") else _text(raw)
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                skips(number, "bad_json", f"not JSON ({e.msg})")
                continue
            if not isinstance(row, dict):
                skips(number, "bad_json", f"a JSON {type(row).__name__}, not an object")
                continue
            yield number, row


def _text(raw: Any) -> Iterator[str]:
    for line in raw:
        yield line.decode("utf-8")


def _number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def nemo_source(path: str | os.PathLike) -> ListSource:
    """A NeMo ASR manifest (see the module docstring)."""
    path = os.fspath(path)
    base = os.fspath(storage.path(path).parent)
    skips = _Skips(path)
    records = []
    for number, row in _lines(path, skips):
        audio, duration, offset = row.get("audio_filepath"), row.get("duration"), row.get("offset", 0.0)
        if not isinstance(audio, str) or not audio:
            skips(number, "bad_record", "no audio_filepath string")
            continue
        if not _number(duration) or duration <= 0:
            skips(number, "bad_record", f"duration {duration!r} is not a positive number")
            continue
        if offset is None:
            offset = 0.0
        if not _number(offset) or offset < 0:
            skips(number, "bad_record", f"offset {offset!r} is not a number >= 0")
            continue
        if "text" not in row:
            skips(number, "no_transcript", "no text")
            continue
        if not isinstance(row["text"], str):
            skips(number, "bad_record", f"text is a {type(row['text']).__name__}, not a string")
            continue
        stem = os.path.splitext(os.path.basename(audio))[0]
        records.append(
            {
                "id": str(row.get("id") or (f"{stem}-{offset:g}" if offset else stem)),
                "audio": storage.beside(base, audio),
                "offset": float(offset),
                "duration": float(duration),
                "text": row["text"],
                "words": None,
                "speaker": str(row.get("speaker", "")),
            }
        )
    skips.summary()
    return ListSource(records, skips.counts)


class _Unplayable(ValueError):
    """A cut this reader cannot turn into audio (the message says why)."""


_PLAYABLE_TRANSFORMS = ("Resample",)  # the pipeline resamples to its own rate anyway


def _cut_audio(cut: dict) -> tuple[str, int | None]:
    """(audio file, channel of the file or None for all) of a MonoCut's recording."""
    recording = cut.get("recording")
    if not isinstance(recording, dict) or not isinstance(recording.get("sources"), list):
        raise _Unplayable("no recording with sources")
    transforms = [t.get("name") if isinstance(t, dict) else t for t in recording.get("transforms") or ()]
    if any(name not in _PLAYABLE_TRANSFORMS for name in transforms):
        raise _Unplayable(f"recording transforms {transforms} (only {', '.join(_PLAYABLE_TRANSFORMS)} is read)")
    channel = cut.get("channel", 0)
    for source in recording["sources"]:
        if not isinstance(source, dict):
            raise _Unplayable("a recording source that is not an object")
        channels = source.get("channels") or [0]
        if isinstance(channel, list):
            if len(recording["sources"]) != 1 or sorted(channel) != sorted(channels):
                raise _Unplayable(f"channels {channel} spread over several sources")
        elif channel not in channels:
            continue
        if source.get("type") != "file" or not isinstance(source.get("source"), str):
            raise _Unplayable(f"audio source of type {source.get('type')!r} (only 'file' is read)")
        if isinstance(channel, list) or len(channels) == 1:
            return source["source"], None
        return source["source"], channels.index(channel)
    raise _Unplayable(f"no source of the recording holds channel {channel}")


def _cut_words(cut: dict, supervisions: list[dict]) -> list[dict] | None:
    words = []
    for supervision in supervisions:
        alignment = (supervision.get("alignment") or {}).get("word")
        if not alignment:
            return None
        for item in alignment:
            symbol, start, duration = item[0], float(item[1]), float(item[2])
            words.append({"w": symbol, "start": start - cut["start"], "end": start + duration - cut["start"]})
    return words


def lhotse_source(path: str | os.PathLike) -> ListSource:
    """A Lhotse cut set in JSONL(.gz) (see the module docstring)."""
    path = os.fspath(path)
    skips = _Skips(path)
    records = []
    for number, cut in _lines(path, skips):
        kind = cut.get("type", "MonoCut")
        if kind not in ("MonoCut", "MultiCut"):
            skips(number, "bad_record", f"a {kind}, not a MonoCut or MultiCut with its recording inline")
            continue
        if not isinstance(cut.get("id"), str) or not _number(cut.get("start")) or not _number(cut.get("duration")):
            skips(number, "bad_record", "not a Lhotse cut (id, start, duration)")
            continue
        if cut["start"] < 0 or cut["duration"] <= 0:
            skips(number, "bad_record", f"start {cut['start']} and duration {cut['duration']} name no segment")
            continue
        try:
            audio, channel = _cut_audio(cut)
        except _Unplayable as e:
            skips(number, "bad_record", str(e))
            continue
        supervisions = cut.get("supervisions") or []
        if not isinstance(supervisions, list) or not all(isinstance(s, dict) for s in supervisions):
            skips(number, "bad_record", "supervisions are not a list of objects")
            continue
        supervisions = sorted(supervisions, key=lambda s: s.get("start", 0.0) if _number(s.get("start")) else 0.0)
        texts = [s["text"] for s in supervisions if isinstance(s.get("text"), str) and s["text"].strip()]
        if not texts:
            skips(number, "no_transcript", "no supervision with a text")
            continue
        try:
            words = _cut_words(cut, supervisions)
        except (TypeError, ValueError, IndexError):
            skips(number, "bad_record", "a word alignment that is not [symbol, start, duration, score] items")
            continue
        speakers = [s["speaker"] for s in supervisions if isinstance(s.get("speaker"), str)]
        records.append(
            {
                "id": cut["id"],
                "audio": storage.absolute(audio),
                "offset": float(cut["start"]),
                "duration": float(cut["duration"]),
                "channel": channel,
                "text": " ".join(texts),
                "words": words,
                "speaker": speakers[0] if speakers else "",
            }
        )
    skips.summary()
    return ListSource(records, skips.counts)
