"""Stage 2's config: the stage-1 mixture plus the new manifest, and a learning rate at its peak
at the resumed step that decays linearly to 0 at the last step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from speechlm_jax.configs import salad
from speechlm_jax.selection import stage2
from speechlm_jax.toyworld.corpus import build_tiny_corpus
from speechlm_jax.train import optimizer, trainer
from speechlm_jax.train.restore import read_config


def test_stage2_config_adds_the_manifest_and_decays_linearly_to_zero(tmp_path):
    stage1 = salad.get_config(f"tiny,data_dir={tmp_path}")
    stage1.optimizer.schedule = "warmup_cosine"
    config = stage2.stage2_config(stage1, tmp_path / "synth" / "manifest.jsonl", start_step=30, steps=10, repeat=2)
    sources = list(config.data.speech_sources)
    assert sources[:-2] == list(stage1.data.speech_sources)
    assert (
        sources[-1]
        == sources[-2]
        == {"type": "manifest", "path": str((tmp_path / "synth" / "manifest.jsonl").absolute())}
    )
    assert config.train.steps == 40
    peak = config.optimizer.lr.projector
    schedule = optimizer.make_schedule(config.optimizer, peak, config.train.steps)
    lrs = np.asarray([schedule(s) for s in range(30, 41)])
    np.testing.assert_allclose(lrs, peak * np.linspace(1.0, 0.0, 11), rtol=1e-5, atol=1e-9)
    assert stage1.optimizer.schedule == "warmup_cosine"  # the stage-1 config is not changed


def test_target_tasks_follow_the_mixture(tmp_path):
    config = salad.get_config(f"tiny,data_dir={tmp_path}")
    assert stage2.target_tasks(config) == ()  # asr only: no teacher targets
    config.data.targets = ("t.jsonl",)
    config.data.kinds = {"imitation": 0.5, "continuation": 0.3, "asr": 0.2}
    config.data.tasks = ("first_word", "count_words")
    assert stage2.target_tasks(config) == ("first_word", "count_words", "continuation")
    config.data.use_task_answer = True
    assert stage2.target_tasks(config) == ()
    new = stage2.stage2_config(
        config, tmp_path / "m.jsonl", start_step=1, steps=1, targets=(str(tmp_path / "n.jsonl"),)
    )
    assert list(new.data.targets) == ["t.jsonl", str(tmp_path / "n.jsonl")]


def test_a_warmup_stable_decay_run_keeps_its_pre_decay_checkpoint_and_stage2_starts_there(tmp_path, stage1_run):
    corpus = build_tiny_corpus(tmp_path / "corpus", train_sentences=8, heldout_sentences=2)
    config = salad.get_config(f"tiny,data_dir={corpus}")
    config.train.steps, config.train.progress_bar, config.train.eval_every = 5, False, 0
    config.optimizer.schedule, config.optimizer.warmup_steps, config.optimizer.decay_fraction = (
        "warmup_stable_decay",
        1,
        0.4,
    )
    config.checkpoint.every, config.checkpoint.keep = 0, 1  # only the last one, and the pre-decay one
    trainer.train(config, tmp_path / "stage1", devices=jax.devices())
    assert stage2.stage1_steps(tmp_path / "stage1") == [3, 5]
    assert stage2.default_start_step(tmp_path / "stage1", config) == 3

    # A run on another schedule has no such checkpoint: stage 2 starts from its latest, and says so.
    cosine = read_config(stage1_run)
    assert cosine.optimizer.schedule == "warmup_cosine"
    assert stage2.default_start_step(stage1_run, cosine) == 2
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        stage2.default_start_step(tmp_path / "empty", config)
