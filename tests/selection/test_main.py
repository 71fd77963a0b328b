"""`speechlm-select` end to end on a tiny stage-1 SALAD run: every stage writes its artefacts,
a rerun skips finished stages, other settings are refused, and the summary reaches the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speechlm_jax.selection import main as select
from speechlm_jax.selection import stage2
from speechlm_jax.toyworld.sentences import sentences
from speechlm_jax.train.config import ConfigError


def _args(workdir: Path, corpus: Path, stage1: Path, report_dir: Path) -> list[str]:
    return [
        "--workdir",
        str(workdir),
        "--corpus",
        str(corpus),
        "--stage1",
        str(stage1),
        "--clusters",
        "3",
        "--tolerance",
        "0.1",
        "--probe_size",
        "2",
        "--gamma",
        "5",
        "--budget_hours",
        "0.004",
        "--steps",
        "2",
        "--stage1_step",
        "1",
        "--shard_size",
        "8",
        "--batch_size",
        "8",
        "--mesh",
        "data=-1",
        "--quiet",
        "--set",
        "train.log_every=1",
        "--report_dir",
        str(report_dir),
    ]


def test_all_stages_then_rerun_skips(stage1_run, tmp_path, capsys):
    corpus = tmp_path / "web.jsonl"
    corpus.write_text(
        "".join(json.dumps({"id": f"w{i}", "text": t}) + "\n" for i, t in enumerate(sentences("train", 24, seed=9)))
    )
    workdir, report_dir = tmp_path / "sel", tmp_path / "eval"
    args = _args(workdir, corpus, stage1_run, report_dir)
    assert select.main(["all", *args]) == 0

    assert len(list((workdir / "embed").glob("shard-*.npz"))) == 3
    cluster = json.loads((workdir / "cluster" / "summary.json").read_text())
    lower, upper = cluster["bounds"]
    assert sum(cluster["sizes"]) == 24 and min(cluster["sizes"]) >= lower and max(cluster["sizes"]) <= upper
    before = json.loads((workdir / "probe_before" / "clusters.json").read_text())
    assert before["step"] == 2 and before["probes"] == [2, 2, 2] and np.all(np.asarray(before["misalignment"]) > 0)
    drawn = json.loads((workdir / "sample" / "summary.json").read_text())
    assert 0 < drawn["estimated_seconds"] <= drawn["budget_seconds"] == pytest.approx(0.004 * 3600)
    selected = [json.loads(line) for line in (workdir / "sample" / "selected.jsonl").read_text().splitlines()]
    probes = {i for v in json.loads((workdir / "probe_before" / "probes.json").read_text()).values() for i in v}
    assert selected and not {int(r["id"][1:]) for r in selected} & probes
    synth = [json.loads(line) for line in (workdir / "synth" / "manifest.jsonl").read_text().splitlines()]
    assert [r["text"] for r in synth] == [r["text"] for r in selected] and all(r["words"] for r in synth)
    # Stage 2 continued the stage-1 checkpoint at step 1 for 2 steps, its mixture with the new manifest.
    config = json.loads((workdir / "train" / "config.json").read_text())
    assert config["train"]["steps"] == 3 and config["data"]["speech_sources"][-1]["path"].endswith(
        "synth/manifest.jsonl"
    )
    records = [json.loads(line) for line in (workdir / "train" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 3]  # log_every=1 from --set
    after = json.loads((workdir / "probe_after" / "clusters.json").read_text())
    assert after["step"] == 3 and after["probes"] == [2, 2, 2]
    summary = json.loads((workdir / "report" / "selection.json").read_text())
    assert [r["m_after"] for r in summary["clusters"]] == after["misalignment"]
    assert "## Active selection" in (report_dir / "report.md").read_text()
    assert "speechlm_select" in capsys.readouterr().out

    markers = {p: p.stat().st_mtime_ns for p in workdir.glob("*/done.json")}
    # Everything is done: the command (a subprocess, as a user runs it) succeeds recomputing nothing.
    rerun = subprocess.run(
        [sys.executable, "-m", "speechlm_jax.selection.main", "all", *args],
        env=dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in workdir.glob("*/done.json")} == markers

    assert select.main(["sample", *[a if a != "5" else "2" for a in args]]) == 2
    assert "rerun with --force" in capsys.readouterr().err
    assert select.main(["sample", "--force", *[a if a != "5" else "0" for a in args]]) == 0
    assert json.loads((workdir / "sample" / "done.json").read_text())["gamma"] == 0.0


def test_stage2_refuses_unknown_override_keys(stage1_run, tmp_path):
    with pytest.raises(ConfigError, match="train.steps"):
        stage2.continue_training(
            stage1_run, tmp_path / "m.jsonl", tmp_path / "run", steps=1, overrides={"train.stepz": 3}
        )
    assert not (tmp_path / "run").exists()


def test_speech_seconds_reads_durations_or_headers(tmp_path):
    from speechlm_jax.data.audio import save_audio

    save_audio(tmp_path / "a.flac", np.zeros(8000, np.int16))
    save_audio(tmp_path / "b.flac", np.zeros(24000, np.int16))
    (tmp_path / "m.jsonl").write_text(
        json.dumps({"audio": "a.flac", "text": "x"})
        + "\n"
        + json.dumps({"audio": "b.flac", "text": "y", "duration": 1.5})
        + "\n"
    )
    assert select.speech_seconds([{"type": "manifest", "path": str(tmp_path / "m.jsonl")}]) == pytest.approx(2.0)


def test_speech_seconds_of_hf_rows_and_of_segments(tmp_path):
    # Hugging Face rows hold their audio's bytes (read from the header); a NeMo line names its segment.
    from datasets import Audio, Dataset

    from speechlm_jax.data.audio import save_audio

    save_audio(tmp_path / "a.flac", np.zeros(8000, np.int16))
    save_audio(tmp_path / "b.flac", np.zeros(24000, np.int16))
    audio = [{"bytes": (tmp_path / f"{n}.flac").read_bytes(), "path": None} for n in "ab"]
    Dataset.from_dict({"audio": audio, "text": ["x", "y"]}).cast_column("audio", Audio()).save_to_disk(
        str(tmp_path / "hf")
    )
    assert select.speech_seconds([{"type": "hf", "path": str(tmp_path / "hf")}]) == pytest.approx(2.0)
    (tmp_path / "nemo.json").write_text(
        json.dumps({"audio_filepath": "b.flac", "offset": 0.5, "duration": 0.75, "text": "y"})
    )
    assert select.speech_seconds([{"type": "nemo", "path": str(tmp_path / "nemo.json")}]) == pytest.approx(0.75)
