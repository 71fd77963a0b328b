"""A run whose data folder was never made fails at once, in one line naming the folder and the
command that makes it (exit status 2), from `speechlm-train` and the step benchmark alike."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=os.environ["XLA_FLAGS"].replace("device_count=8", "device_count=1"),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "prog, command",
    [
        ("speechlm-train", ["-m", "speechlm_jax.train.main", "--workdir", "{tmp}/run"]),
        ("benchmarks.train_step", ["-m", "benchmarks.train_step", "--steps", "1"]),
    ],
)
def test_a_tiny_run_before_its_corpus_exists_names_the_folder_and_its_builder(prog, command, tmp_path):
    corpus = tmp_path / "no_corpus"
    args = [a.format(tmp=tmp_path) for a in command]
    result = _run(*args, f"--config=configs/mtbi.py:tiny,data_dir={corpus}")
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Repo id" not in result.stderr, result.stderr[-3000:]
    # One line: the data paths are checked before the mesh or the model is built.
    errors = [line for line in lines if line.startswith(f"{prog}:")]
    assert len(errors) == 1 and lines == errors, result.stderr
    assert f"data.tokenizer: {corpus}/tokenizer does not exist" in errors[0]
    assert f"`python -m speechlm_jax.toyworld.corpus {corpus}` writes {corpus}" in errors[0]
    assert not corpus.exists() and not (tmp_path / "run").exists()


def test_a_run_whose_audio_is_all_missing_fails_in_one_line_and_writes_nothing(tmp_path):
    """Not a hang: every record skipped for two passes is an error (exit 2), before the workdir exists."""
    from speechlm_jax.toyworld.corpus import build_tiny_corpus

    corpus = build_tiny_corpus(tmp_path / "corpus", train_sentences=4, heldout_sentences=2)
    for audio in (corpus / "train").rglob("*.flac"):
        audio.unlink()
    result = _run(
        "-m", "speechlm_jax.train.main", f"--config=configs/asr.py:tiny,data_dir={corpus}", f"--workdir={tmp_path}/run"
    )
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("speechlm-train: no example in 8 records in a row") and "missing_file 8" in last, last
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()
