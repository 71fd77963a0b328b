"""The trainer end to end on the tiny TTS corpus: learning, mesh invariance, resume, preemption, failures."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from speechlm_jax.train import build, partitions, step, trainer
from speechlm_jax.train import config as config_lib

REPO = Path(__file__).resolve().parents[2]


def _records(workdir: Path, split: str = "train") -> list[dict]:
    path = workdir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if r["split"] == split]


def _losses(records: list[dict]) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records}


@pytest.mark.parametrize("recipe", ["asr", "mtbi", "salad", "vtb"])
def test_tiny_variant_lowers_its_loss(recipe, tiny_config, tmp_path):
    config = tiny_config(recipe, steps=12, log_every=1)
    result = trainer.train(config, tmp_path, devices=jax.devices()[:1])
    losses = [r["loss"] for r in _records(tmp_path)]
    assert result.step == 12 and len(losses) == 12
    assert np.mean(losses[-3:]) < 0.97 * np.mean(losses[:3]), losses
    # The frozen base is bitwise what the model builder makes from the config.
    fresh = build.build_model(
        config, result.mesh, config_lib.sharding_rules(config), compiler_options=step.compiler_options(True)
    )
    _, _, frozen = partitions.split_model(fresh, config_lib.trainable_groups(config))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), result.frozen, frozen)


def _constant(config):
    """A constant learning rate: the step program no longer depends on `train.steps`, so runs
    of different lengths share one compiled program (the session's XLA cache)."""
    config.optimizer.schedule = "constant"
    return config


def test_eight_devices_give_the_losses_of_one(tiny_config, tmp_path):
    one = _constant(tiny_config("asr", steps=5, log_every=1))
    trainer.train(one, tmp_path / "one", devices=jax.devices()[:1])
    eight = _constant(tiny_config("asr", steps=5, log_every=1))
    eight.mesh.data, eight.mesh.fsdp, eight.mesh.tensor = 1, 2, 4
    result = trainer.train(eight, tmp_path / "eight")
    assert dict(result.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    sharded = [
        v
        for v in jax.tree.leaves(result.trainable)
        if len(v.sharding.device_set) == 8 and not v.sharding.is_fully_replicated
    ]
    assert sharded, "no trainable parameter is sharded over the 8 devices"
    a, b = _losses(_records(tmp_path / "one")), _losses(_records(tmp_path / "eight"))
    assert a.keys() == b.keys() == {1, 2, 3, 4, 5}
    np.testing.assert_allclose([b[k] for k in a], [a[k] for k in a], atol=1e-5, rtol=0)


def _popen(train_command, config_arg: str, workdir: Path, *overrides: str) -> subprocess.Popen:
    argv, env = train_command(config_arg, workdir, *overrides)
    return subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_step(process: subprocess.Popen, workdir: Path, step_index: int, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if any(r["step"] >= step_index for r in _records(workdir)):
            return
        if process.poll() is not None:
            raise AssertionError(f"training exited with {process.returncode}:\n{process.stdout.read()}")
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"no step {step_index} within {timeout} s")


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(tiny_corpus, train_command, tmp_path):
    process = _popen(
        train_command,
        f"asr.py:tiny,data_dir={tiny_corpus}",
        tmp_path,
        "--config.train.log_every=1",
        "--config.train.steps=1000",
        "--config.checkpoint.every=1000",
        "--config.optimizer.schedule=constant",
    )
    _wait_for_step(process, tmp_path, 2)
    process.send_signal(signal.SIGTERM)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "SIGTERM" in output
    last = max(r["step"] for r in _records(tmp_path))
    steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert steps == [last] and 2 <= last < 1000


def test_nonfinite_loss_stops_naming_the_steps(tiny_config, tmp_path):
    config = _constant(tiny_config("asr", steps=6, log_every=3))
    config.optimizer.lr.projector = config.optimizer.lr.lora = 1e30
    config.optimizer.warmup_steps = 0
    with pytest.raises(trainer.NonFiniteLossError, match=r"between steps \d+ and \d+"):
        trainer.train(config, tmp_path, devices=jax.devices()[:1])
    assert not (tmp_path / "checkpoints").exists() or not any(
        p.name.isdigit() for p in (tmp_path / "checkpoints").iterdir()
    )


def test_evaluation_and_tensorboard(tiny_config, tmp_path):
    config = _constant(tiny_config("asr", steps=2, log_every=1, eval_every=2, eval_batches=1))
    trainer.train(config, tmp_path, devices=jax.devices()[:1])
    held_out = _records(tmp_path, "eval")
    assert [r["step"] for r in held_out] == [2] and np.isfinite(held_out[0]["loss"])
    events = EventAccumulator(str(tmp_path / "tensorboard" / "train"))
    events.Reload()
    for tag in ("loss", "grad_norm", "lr/projector", "tokens_per_s", "audio_s_per_s", "mfu", "cross_entropy/nll"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert json.loads((tmp_path / "config.json").read_text())["recipe"] == "asr"
