"""report.json / report.md / plots, and training curves read back from tensorboardX event files."""

import json

import pytest
from tensorboardX import SummaryWriter

from speechlm_jax.evaluation.report import per_task_gaps, read_training_curves, write_report


def scores(text, speech):
    return {"text": text, "speech": speech, "gap": text - speech, "items": 4}


REPORT = {
    "model": {"workdir": "/tmp/run", "step": 20, "oracle": False},
    "gap": {
        "overall": scores(0.75, 0.5),
        "tasks": {"arc": scores(1.0, 0.5), "obqa": scores(0.5, 0.5)},
        "conditions": ["text", "speech"],
        "items": [{"id": "q1", "task": "arc", "text": "a", "speech": "b"}],
    },
    "generalisation": {"heldout_tasks": {"overall": scores(0.6, 0.2), "tasks": {}}},
    "retention": {"overall": {"text": 0.75, "text_adapted": 0.5, "drop": 0.25, "items": 4}, "tasks": {}},
    "diagnostics": {
        "misalignment": {"per_token": 0.5, "per_sequence": 2.0, "tokens": 12},
        "forgetting": {"per_token": 0.0, "per_sequence": 0.0, "tokens": 20},
        "sequences": 3,
        "prefix_fraction": 0.5,
    },
    "asr": {"wer": 0.25, "utterances": 2.0, "words": 8.0, "substitutions": 1.0, "deletions": 1.0, "insertions": 0.0},
}


def test_training_curves_round_trip_through_event_files(tmp_path):
    for split, offset in (("train", 0.0), ("eval", 0.5)):
        writer = SummaryWriter(str(tmp_path / "tensorboard" / split))
        for step in (1, 2, 3):
            writer.add_scalar("loss", 3.0 / step + offset, step)
            if split == "train":
                writer.add_scalar("lr/projector", 1e-3 * step, step)
        writer.close()
    curves = read_training_curves(tmp_path)
    assert set(curves) == {"train", "eval"}
    assert [s for s, _ in curves["train"]["loss"]] == [1, 2, 3]
    assert [v for _, v in curves["eval"]["loss"]] == pytest.approx([3.5, 2.0, 1.5])
    assert "lr/projector" in curves["train"] and "lr/projector" not in curves["eval"]
    assert read_training_curves(tmp_path / "nothing") == {}


def test_write_report(tmp_path):
    writer = SummaryWriter(str(tmp_path / "run" / "tensorboard" / "train"))
    writer.add_scalar("loss", 1.0, 1)
    writer.close()
    files = write_report(REPORT, tmp_path / "out", workdir=tmp_path / "run")
    assert json.loads((tmp_path / "out" / "report.json").read_text()) == REPORT
    for name in ("gap_per_task.png", "text_vs_speech.png", "training_curves.png"):
        assert (tmp_path / "out" / name).read_bytes()[:4] == b"\x89PNG"
    md = files["report.md"].read_text()
    assert "| **overall** | 0.7500 | 0.5000 | 0.2500 | 4 |" in md
    assert "| heldout_tasks | 0.6000 | 0.2000 | 0.4000 | 4 |" in md
    assert "| misalignment M | 0.5000 | 2.0000 | 12 |" in md
    assert "WER 0.2500 over 2 utterances" in md and "![training curves](training_curves.png)" in md


def test_text_only_report_has_no_gap_plots(tmp_path):
    text_only = {
        "model": {"base": "/ckpt"},
        "gap": {"overall": {"text": 0.5, "items": 2}, "tasks": {"arc": {"text": 0.5, "items": 2}}},
    }
    files = write_report(text_only, tmp_path)
    assert set(files) == {"report.json", "report.md"}
    assert "| arc | 0.5000 | 2 |" in files["report.md"].read_text()


def test_toy_tasks_give_the_per_task_plot_without_item_files(tmp_path):
    toy = {
        "generalisation": {
            "seen_tasks/train_prompts": {"overall": scores(0.5, 0.25), "tasks": {"repeat": scores(0.5, 0.25)}},
            "seen_tasks/heldout_prompts": {"overall": scores(0.5, 0.0), "tasks": {"repeat": scores(0.5, 0.0)}},
            "heldout_tasks": {"overall": scores(1.0, 0.5), "tasks": {"reverse": scores(1.0, 0.5)}},
        }
    }
    files = write_report(toy, tmp_path)
    assert {"gap per task", "text vs speech accuracy"} <= set(files)
    assert per_task_gaps(toy) == {"repeat": scores(0.5, 0.25), "reverse": scores(1.0, 0.5)}
