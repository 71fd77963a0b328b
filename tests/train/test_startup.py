"""The trainer's start-up contract: everything that can be checked without compiling is checked
first, and a start that fails leaves the workdir byte-for-byte as it was."""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import jax
import pytest

from speechlm_jax.train import checkpoint, restore, trainer

REPO = Path(__file__).resolve().parents[2]


def _tree_hash(root: Path) -> dict[str, str]:
    """Every file and folder under `root`, with the sha256 of each file's bytes."""
    if not root.exists():
        return {}
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        for path in sorted(root.rglob("*"))
    }


def _train(train_command, workdir: Path, corpus: Path, *overrides: str) -> subprocess.CompletedProcess:
    argv, env = train_command(f"asr.py:tiny,data_dir={corpus}", workdir, *overrides)
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory, tiny_corpus, compilation_cache):
    """A workdir with a 2-step asr:tiny run (config.json, metrics, TensorBoard, a checkpoint)."""
    from speechlm_jax.configs import asr

    config = asr.get_config(f"tiny,data_dir={tiny_corpus}")
    config.train.steps, config.train.log_every, config.train.eval_every = 2, 1, 0
    config.train.progress_bar, config.train.fast_compile = False, True
    config.train.compilation_cache = str(compilation_cache)
    config.optimizer.schedule = "constant"
    workdir = tmp_path_factory.mktemp("trained")
    trainer.train(config, workdir, devices=jax.devices()[:1])
    return workdir, config


def test_restart_with_another_model_shape_names_the_tensor_and_damages_nothing(
    trained_workdir, tiny_corpus, train_command
):
    workdir, config = trained_workdir
    before = _tree_hash(workdir)
    assert "config.json" in before and "checkpoints/2/trainable/_METADATA" in before

    other = config.copy_and_resolve_references()
    other.model.projector.hidden = 32
    with pytest.raises(checkpoint.CheckpointMismatchError) as error:
        trainer.train(other, workdir, devices=jax.devices()[:1])
    message = str(error.value)
    assert "first mismatched tensor projector/" in message and "stored (" in message and "config builds (" in message
    assert "config.json" in message and "fresh --workdir" in message
    assert _tree_hash(workdir) == before

    # The installed command: exit status 2 and one line naming the tensor, nothing else written.
    result = _train(train_command, workdir, tiny_corpus, "--config.model.projector.hidden=32")
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("speechlm-train: the checkpoint ") and "first mismatched tensor projector/" in last
    assert "Traceback" not in result.stderr
    assert _tree_hash(workdir) == before

    # Everything downstream still reads the run's own checkpoint.
    model, read_config, step = restore.load_model(workdir)
    assert step == 2 and read_config.model.projector.hidden == config.model.projector.hidden


def test_restart_with_another_optimiser_is_refused_before_restoring(trained_workdir):
    workdir, config = trained_workdir
    before = _tree_hash(workdir)
    other = config.copy_and_resolve_references()
    other.train.trainable = "projector"  # the checkpoint also holds LoRA weights and their moments
    other.model.lora.rank = 0
    with pytest.raises(checkpoint.CheckpointMismatchError, match="trainable does not fit this run's config"):
        trainer.train(other, workdir, devices=jax.devices()[:1])
    assert _tree_hash(workdir) == before


@pytest.mark.parametrize(
    "override,message",
    [
        ("--config.train.batch_size=0", r"train.batch_size=0 must lie in \[1, inf\)"),
        ("--config.train.log_every=0", r"train.log_every=0 must lie in \[1, inf\)"),
        ("--config.checkpoint.every=-1", r"checkpoint.every=-1 must lie in \[0, inf\)"),
    ],
)
def test_a_bad_value_fails_at_start_and_writes_no_workdir(override, message, tiny_corpus, train_command, tmp_path):
    workdir = tmp_path / "run"
    result = _train(train_command, workdir, tiny_corpus, override)
    assert result.returncode == 2, result.stderr[-3000:]
    assert re.search(message, result.stderr.strip().splitlines()[-1])
    assert not workdir.exists()


def test_checkpoint_every_zero_saves_only_the_last_step(tiny_config, tmp_path):
    config = tiny_config("asr", steps=3, log_every=1)
    config.optimizer.schedule = "constant"
    config.checkpoint.every = 0
    result = trainer.train(config, tmp_path, devices=jax.devices()[:1])
    assert result.step == 3
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["3"]
