"""Weights & Biases (`train.wandb_run`): offline runs written by wandb itself, read back from their run files."""

import glob
import json
import os
import time

import jax
import ml_collections
import pytest

from speechlm_jax.configs.base import base_config
from speechlm_jax.evaluation import main as eval_main
from speechlm_jax.evaluation import report
from speechlm_jax.train import config as config_lib
from speechlm_jax.train import metrics, trainer, wandb_run


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """W&B offline, its files under a temporary WANDB_DIR; returns `runs(run_id)`: that id's run folders."""
    root = tmp_path / "wandb_dir"
    root.mkdir()
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(root))
    monkeypatch.setenv("WANDB_SILENT", "true")

    def runs(run_id: str) -> list[str]:
        return sorted(glob.glob(str(root / "wandb" / f"offline-run-*-{run_id}")))

    return runs


def _config(project: str = "speechlm-test") -> ml_collections.ConfigDict:
    config = base_config()
    config.train.wandb.project = project
    return config


def _read(run_dir: str) -> wandb_run.OfflineRun:
    """The run once wandb's service has written its exit record (it writes after `finish` returns)."""
    deadline = time.monotonic() + 60
    while True:
        run = wandb_run.read_offline_run(run_dir)
        if run.finished or time.monotonic() > deadline:
            return run
        time.sleep(0.2)


def _run_id(workdir) -> str:
    return json.loads((workdir / wandb_run.RUN_FILE).read_text())["id"]


def test_metric_writer_sends_every_scalar_and_the_config(offline, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = _config()
    writer = metrics.MetricWriter(workdir, wandb=wandb_run.WandbRun.open(config, workdir))
    for step in (1, 2, 3):
        writer.write(step, {"loss": 1.0 / step, "lr/projector": 1e-4})
    writer.write(3, {"loss": 0.25}, split="eval")
    writer.close()

    [run_dir] = offline(_run_id(workdir))
    run = _read(run_dir)
    assert run.finished and run.project == "speechlm-test"
    assert run.config["train"]["wandb"]["project"] == "speechlm-test"
    assert run.config["optimizer"]["lr"]["projector"] == config.optimizer.lr.projector
    rows = [{k: v for k, v in row.items() if not k.startswith("_")} | {"step": row["_step"]} for row in run.history]
    train = [(r["step"], r["train/loss"]) for r in rows if "train/loss" in r]
    assert train == [(1, 1.0), (2, 0.5), (3, pytest.approx(1 / 3))]
    assert [(r["step"], r["eval/loss"]) for r in rows if "eval/loss" in r] == [(3, 0.25)]
    assert all(r["train/lr/projector"] == 1e-4 for r in rows if "train/loss" in r)
    # metrics.jsonl and TensorBoard are written as before.
    assert len((workdir / "metrics.jsonl").read_text().splitlines()) == 4


def test_no_project_no_run_and_a_bad_mode_fails_at_start(offline, tiny_config, tmp_path):
    assert wandb_run.WandbRun.open(base_config(), tmp_path) is None
    assert not (tmp_path / wandb_run.RUN_FILE).exists()
    config = tiny_config("asr")
    config.train.wandb.project = "p"
    config_lib.validate(config)
    config.train.wandb.mode = "sometimes"
    with pytest.raises(config_lib.ConfigError, match=r"train.wandb.mode='sometimes' is not one of"):
        config_lib.validate(config)


def test_an_evaluation_report_joins_the_workdirs_run(offline, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    config = _config()
    first = wandb_run.WandbRun.open(config, workdir)
    first.log(5, {"loss": 2.0})
    first.finish()
    result = {"gap": {"overall": {"text": 0.75, "speech": 0.5, "gap": 0.25, "items": 4}, "tasks": {}}}
    files = report.write_report(result, tmp_path / "out")
    assert wandb_run.attach_evaluation(config, workdir, files, eval_main.headline(result))

    runs = offline(_run_id(workdir))
    assert len(runs) == 2  # the training run and the evaluation, one W&B run id
    evaluation = _read(runs[-1])
    assert evaluation.run_id == _read(runs[0]).run_id
    [artifact] = evaluation.artifacts
    assert artifact["type"] == "evaluation" and {"report.json", "report.md"} <= set(artifact["files"])
    assert evaluation.summary["speechlm_eval/gap/text"] == 0.75
    assert evaluation.summary["speechlm_eval/gap/gap"] == 0.25


def test_training_and_speechlm_eval_log_to_one_offline_run(offline, tiny_config, tmp_path):
    config = tiny_config("asr", steps=2, log_every=1, eval_every=2, eval_batches=1)
    config.train.wandb.project = "speechlm-tiny"
    workdir = tmp_path / "run"
    trainer.train(config, workdir, devices=jax.devices()[:1])
    [train_dir] = offline(_run_id(workdir))
    run = _read(train_dir)
    assert run.config["recipe"] == "asr" and run.config["train"]["steps"] == 2
    logged = {(row["_step"], key) for row in run.history for key in row if not key.startswith("_")}
    assert {(1, "train/loss"), (2, "train/loss"), (2, "eval/loss")} <= logged

    items = tmp_path / "items.jsonl"
    items.write_text(json.dumps({"question": "the dog runs", "choices": ["yes", "no"], "answer": "yes"}) + "\n")
    eval_main.evaluate(workdir=str(workdir), items=str(items), batch_size=2, out=str(tmp_path / "out"))
    [_, eval_dir] = offline(_run_id(workdir))
    evaluation = _read(eval_dir)
    assert evaluation.artifacts[0]["type"] == "evaluation"
    assert "report.json" in evaluation.artifacts[0]["files"]
    assert set(os.listdir(tmp_path / "out")) >= {"report.json", "report.md"}
    assert "speechlm_eval/gap/speech" in evaluation.summary
