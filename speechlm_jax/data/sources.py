"""Where examples come from: speech manifests, LibriSpeech folders, TFDS, text-only JSONL.

Every source is a random-access list of plain records (Grain's `RandomAccessDataSource`
protocol: `__len__` and `__getitem__`), read by the pipeline's `grain.MapDataset`:

- speech records `{"id", "audio": absolute path | None, "waveform": int16 [samples] (TFDS
  only), "text", "words": [{"w", "start", "end"}] | None, "speaker", "duration"}`;
- text records `{"id", "messages": [{"role", "content"}, ...]}` ending with the assistant's
  turn, for VoiceTextBlender's text-only SFT mixture.

Only metadata is read here; audio is decoded lazily by the pipeline, so a missing or
corrupt audio file costs one skipped example later, not the run. What cannot become a
record is skipped here and counted in `skipped`, by cause: `bad_json` (a line that does
not parse, or is not an object), `bad_record` (a field of the wrong type), `no_transcript`
(a manifest line without "text", an audio file of a LibriSpeech folder that no transcript
line names), `bad_target` (a targets line without its four strings).

Teacher responses for behavior imitation come from a targets JSONL
(`{"id", "task", "prompt", "response"}`, written by `speechlm-generate`): `TargetTable`.
"""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from collections.abc import Iterator
from typing import Any

import numpy as np

from speechlm_jax import storage

Record = dict[str, Any]


class ListSource:
    """Records held in memory, with the count of input lines that were skipped."""

    def __init__(self, records: list[Record], skipped: Counter | None = None):
        self.records = records
        self.skipped = Counter(skipped or {})

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Record:
        return self.records[index]


def _jsonl(path: storage.PathLike, skipped: Counter) -> Iterator[dict]:
    with storage.path(path).open("r", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                skipped["bad_json"] += 1
                continue
            if not isinstance(row, dict):
                skipped["bad_json"] += 1
                continue
            yield row


def manifest_source(path: storage.PathLike) -> ListSource:
    """A JSONL manifest `{"audio", "text", "words"?, "speaker"?, "duration"?, "id"?}`.

    Relative `audio` paths are relative to the manifest's folder (as `tts_corpus.synthesize_corpus`
    writes them); the manifest and its audio may be in an object store (gs://, s3://).
    """
    path = storage.path(path)
    skipped: Counter = Counter()
    records = []
    for row in _jsonl(path, skipped):
        if not isinstance(row.get("audio"), str):
            skipped["bad_record"] += 1
            continue
        if "text" not in row:
            skipped["no_transcript"] += 1
            continue
        if not isinstance(row["text"], str):
            skipped["bad_record"] += 1
            continue
        audio = storage.beside(path.parent, row["audio"])
        records.append(
            {
                "id": str(row.get("id", posixpath.splitext(posixpath.basename(audio))[0])),
                "audio": audio,
                "text": row["text"],
                "words": row.get("words") or None,
                "speaker": str(row.get("speaker", "")),
                "duration": row.get("duration"),
                # Spoken-content QA fields, when the manifest has them.
                **{k: row[k] for k in ("question", "answer") if isinstance(row.get(k), str)},
            }
        )
    return ListSource(records, skipped)


def librispeech_source(root: storage.PathLike, *, audio_ext: str = ".flac") -> ListSource:
    """A LibriSpeech-layout folder: `speaker/chapter/speaker-chapter-utt.flac` and
    `speaker/chapter/speaker-chapter.trans.txt` (lines `UTTERANCE-ID TRANSCRIPT`).

    Records are sorted by utterance id so the order does not depend on the file system. An
    audio file that no transcript line names is counted as `no_transcript`; a line whose
    audio file is missing stays a record (the pipeline skips it as `missing_file`).
    """
    root = storage.path(root)
    skipped: Counter = Counter()
    records = []
    for trans in sorted(root.glob("*/*/*.trans.txt")):
        speaker = trans.parent.parent.name
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            utt_id, _, text = line.strip().partition(" ")
            records.append(
                {
                    "id": utt_id,
                    "audio": str(trans.parent / f"{utt_id}{audio_ext}"),
                    "text": text.strip(),
                    "words": None,
                    "speaker": speaker,
                    "duration": None,
                }
            )
    named = {r["audio"] for r in records}
    skipped["no_transcript"] += sum(1 for audio in root.glob(f"*/*/*{audio_ext}") if str(audio) not in named)
    records.sort(key=lambda r: r["id"])
    return ListSource(records, +skipped)


def _text(value: Any) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TFDSSource:
    """A split of a prepared `PairedSpeech` TFDS dataset (ArrayRecord), read without TensorFlow.

    Records carry the decoded int16 waveform instead of a path. A dataset in an object store is
    copied to local disk first, once per process: ArrayRecord's reader opens files through its
    own file layer, not fsspec, and never returned on a gs:// path of the test emulator.
    """

    def __init__(self, data_dir: storage.PathLike, split: str = "train"):
        import tensorflow_datasets as tfds

        self.builder = tfds.builder_from_directory(str(storage.local_copy(data_dir)))
        self.data = self.builder.as_data_source(split=split)
        self.skipped: Counter = Counter()

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> Record:
        row = self.data[index]
        words = [
            {"w": _text(w), "start": float(s), "end": float(e)}
            for w, s, e in zip(row["words"]["w"], row["words"]["start"], row["words"]["end"])
        ]
        return {
            "id": _text(row["id"]),
            "audio": None,
            "waveform": np.asarray(row["waveform"], dtype=np.int16),
            "text": _text(row["text"]),
            "words": words or None,
            "speaker": _text(row["speaker"]),
            "duration": float(row["duration"]),
        }


def text_source(path: storage.PathLike) -> ListSource:
    """Text-only SFT data: JSONL of `{"instruction", "input"?, "response"}` or `{"messages"}`."""
    path = storage.path(path)
    skipped: Counter = Counter()
    records = []
    for i, row in enumerate(_jsonl(path, skipped)):
        if "messages" in row:
            messages = row["messages"]
            ok = (
                isinstance(messages, list)
                and messages
                and all(isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in messages)
                and messages[-1]["role"] == "assistant"
            )
        else:
            instruction, response = row.get("instruction"), row.get("response")
            ok = isinstance(instruction, str) and isinstance(response, str)
            if ok:
                extra = row.get("input")
                user = f"{instruction}\n{extra}" if isinstance(extra, str) and extra else instruction
                messages = [{"role": "user", "content": user}, {"role": "assistant", "content": response}]
        if not ok:
            skipped["bad_record"] += 1
            continue
        records.append(
            {
                "id": str(row.get("id", f"{path.stem}-{i}")),
                "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
            }
        )
    return ListSource(records, skipped)


class TargetTable:
    """Teacher responses keyed by (utterance id, task, prompt), from a targets JSONL."""

    def __init__(self, paths: tuple[storage.PathLike, ...] = ()):
        self.responses: dict[tuple[str, str], dict[str, str]] = {}
        self.skipped: Counter = Counter()
        for path in paths:
            for row in _jsonl(path, self.skipped):
                if not all(isinstance(row.get(k), str) for k in ("id", "task", "prompt", "response")):
                    self.skipped["bad_target"] += 1
                    continue
                self.responses.setdefault((row["id"], row["task"]), {})[row["prompt"]] = row["response"]

    def __len__(self) -> int:
        return sum(len(v) for v in self.responses.values())

    def lookup(self, utterance_id: str, task: str) -> dict[str, str]:
        """{prompt: response} for this utterance and task (empty when there are none)."""
        return self.responses.get((utterance_id, task), {})


def read_text_corpus(path: storage.PathLike) -> list[dict[str, str]]:
    """`{"id", "text"}` records of a text corpus: JSONL with "text" (and "id", default the line
    number) or plain lines; whitespace normalised, empty lines left out, ids unique."""
    path = storage.path(path)
    records = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            row = json.loads(line)
            records.append({"id": str(row.get("id", i)), "text": " ".join(str(row["text"]).split())})
        else:
            records.append({"id": str(i), "text": " ".join(line.split())})
    ids = [r["id"] for r in records]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path} has duplicate ids")
    return records
