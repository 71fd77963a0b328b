"""The trainer reports the data it skipped by cause: `data/skipped/<cause>` in metrics.jsonl,
exactly what the pipeline counted after those batches, across a restart from a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import soundfile as sf

from speechlm_jax.train import data, trainer


def _broken_manifest(root: Path) -> Path:
    """Recordings that cannot train, each of another cause, beside the tiny corpus's own."""
    sf.write(root / "short.wav", np.ones(40, np.int16), 16000)
    (root / "empty.wav").write_bytes(b"")
    (root / "random.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    rows = [
        {"id": "gone", "audio": str(root / "gone.wav"), "text": "hello"},
        {"id": "empty", "audio": str(root / "empty.wav"), "text": "hello"},
        {"id": "random", "audio": str(root / "random.flac"), "text": "hello"},
        {"id": "short", "audio": str(root / "short.wav"), "text": "hello"},
        {"id": "untranscribed", "audio": str(root / "short.wav")},
    ]
    path = root / "broken.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _records(workdir: Path) -> dict[int, dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if r["split"] == "train"}


def test_skips_by_cause_reach_metrics_and_survive_a_restart(tiny_config, tmp_path):
    config = tiny_config("asr", steps=2, log_every=1)
    config.optimizer.schedule = "constant"
    config.checkpoint.every = 2
    broken = _broken_manifest(tmp_path)
    config.data.speech_sources = (*config.data.speech_sources, {"type": "manifest", "path": str(broken)})
    workdir = tmp_path / "run"
    trainer.train(config, workdir, devices=jax.devices()[:1])
    config.train.steps = 4
    trainer.train(config, workdir, devices=jax.devices()[:1])
    records = _records(workdir)
    assert sorted(records) == [1, 2, 3, 4]

    # The same pipeline read directly, batch after batch.
    iterator, stats = data.Data(config).train_iterator()
    causes = ("missing_file", "empty_file", "undecodable", "too_short")
    for step_index in range(1, 5):
        next(iterator)
        expected = {f"data/{k}": float(v) for k, v in stats.as_dict().items()}
        got = {k: v for k, v in records[step_index].items() if k.startswith("data/")}
        assert got == expected, step_index
    final = records[4]
    assert final["data/source_skipped/no_transcript"] == 1.0
    # 32 examples from 12 readable recordings take more than two epochs: each broken file was read twice.
    assert all(final[f"data/skipped/{cause}"] >= 2.0 for cause in causes), final
    assert final["data/skipped"] == 1.0 + sum(final[f"data/skipped/{cause}"] for cause in causes)
    assert "data/skipped/bad_audio" not in final and "data/skipped/empty_audio" not in final
