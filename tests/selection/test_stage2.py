"""Stage 2's config: the stage-1 mixture plus the new manifest, and a learning rate at its peak
at the resumed step that decays linearly to 0 at the last step."""

from __future__ import annotations

import numpy as np

from speechlm_jax.configs import salad
from speechlm_jax.selection import stage2
from speechlm_jax.train import optimizer


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
