"""The `:tiny` ASR recipe trains on every external source type: a Hugging Face dataset saved with
`save_to_disk` and as Parquet, a Lhotse cut set and a NeMo manifest (segments of one long
recording), each made from the tiny corpus's training manifest."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf

from speechlm_jax.data.audio import load_audio
from speechlm_jax.train import trainer

SR = 16000


def _rows(tiny_corpus: Path) -> list[dict]:
    manifest = tiny_corpus / "train" / "manifest.jsonl"
    rows = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    for row in rows:
        row["audio"] = str(manifest.parent / row["audio"])
    return rows


def _session(rows: list[dict], root: Path) -> tuple[Path, list[tuple[float, float, str]]]:
    """The utterances one after another in one file: (path, [(offset s, duration s, text)])."""
    pieces, segments, at = [], [], 0
    for row in rows:
        audio = load_audio(row["audio"])
        segments.append((at / SR, len(audio) / SR, row["text"]))
        pieces += [audio, np.zeros(SR // 5, np.int16)]
        at += len(audio) + SR // 5
    path = root / "session.flac"
    sf.write(path, np.concatenate(pieces), SR, subtype="PCM_16")
    return path, segments


def _source(kind: str, rows: list[dict], root: Path) -> dict:
    if kind.startswith("hf"):
        from datasets import Audio, Dataset

        ds = Dataset.from_dict({"audio": [r["audio"] for r in rows], "text": [r["text"] for r in rows]})
        ds = ds.cast_column("audio", Audio())
        if kind == "hf-disk":
            ds.save_to_disk(str(root / "disk"))
            return {"type": "hf", "path": str(root / "disk"), "split": "train"}
        ds.to_parquet(str(root / "parquet" / "train-00000-of-00001.parquet"))
        return {"type": "hf", "path": str(root / "parquet"), "split": "train"}
    path, segments = _session(rows, root)
    if kind == "lhotse":
        from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet

        recording = Recording.from_file(path)
        supervisions = [
            SupervisionSegment(id=f"u{i}", recording_id=recording.id, start=start, duration=duration, text=text)
            for i, (start, duration, text) in enumerate(segments)
        ]
        cuts = CutSet.from_manifests(
            recordings=RecordingSet.from_recordings([recording]),
            supervisions=SupervisionSet.from_segments(supervisions),
        ).trim_to_supervisions()
        cuts.to_file(root / "cuts.jsonl.gz")
        return {"type": "lhotse", "path": str(root / "cuts.jsonl.gz")}
    lines = [{"audio_filepath": path.name, "offset": o, "duration": d, "text": t} for o, d, t in segments]
    (root / "manifest.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"type": "nemo", "path": str(root / "manifest.json")}


@pytest.mark.parametrize("kind", ["hf-disk", "hf-parquet", "lhotse", "nemo"])
def test_the_tiny_recipe_trains_on_the_source(kind, tiny_config, tiny_corpus, tmp_path):
    config = tiny_config("asr", steps=2, log_every=1)
    config.optimizer.schedule = "constant"  # one step program for every source (the XLA cache)
    config.data.speech_sources = (_source(kind, _rows(tiny_corpus), tmp_path),)
    result = trainer.train(config, tmp_path / "run", devices=jax.devices()[:1])
    assert result.step == 2
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    # Every example came from the source and none was skipped.
    assert train[-1]["data/examples"] >= 2 * config.train.batch_size and train[-1]["data/skipped"] == 0
