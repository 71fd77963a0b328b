"""The demo's stages: caching by input hash, and a miniature end-to-end run of every stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speechlm_jax import cli
from speechlm_jax import stages as stage_cache
from speechlm_jax.configs import toyworld as toy_config
from speechlm_jax.data.tts import Voice
from speechlm_jax.demo import build
from speechlm_jax.demo import main as demo


def test_stage_runs_once_per_key_and_reruns_when_inputs_change(tmp_path: Path):
    calls = []

    def write(folder: Path) -> None:
        calls.append(folder.name)
        (folder / "out.txt").write_text("x")

    stages = build.Stages(tmp_path, log=lambda _: None)
    stages.run("a", {"n": 1}, [], write)
    stages.run("b", {"m": 1}, ["a"], write)
    assert calls == ["a", "b"]

    again = build.Stages(tmp_path, log=lambda _: None)
    again.run("a", {"n": 1}, [], write)
    again.run("b", {"m": 1}, ["a"], write)
    assert calls == ["a", "b"] and again.cached == ["a", "b"]
    assert again.timings == {name: stage_cache.record(tmp_path / name)["seconds"] for name in ("a", "b")}

    # A changed input rebuilds that stage and every stage built on it.
    changed = build.Stages(tmp_path, log=lambda _: None)
    changed.run("a", {"n": 2}, [], write)
    changed.run("b", {"m": 1}, ["a"], write)
    assert calls == ["a", "b", "a", "b"]


def test_teacher_data_asks_each_task_per_sentence_and_copying_tasks_in_several_phrasings(tmp_path: Path):
    from collections import Counter

    from speechlm_jax.toyworld.tasks import REPEAT, TOY_TASKS

    sizes = build.Sizes(train_sentences=5, heldout_sentences=2, asks=(("repeat", 3),), copy_sequences=7)
    build.build_corpus(tmp_path, sizes)
    # The copying sequences are a source of the teacher's beside the tasks.
    assert len((tmp_path / "copy_lm.jsonl").read_text().splitlines()) == 7
    folder = toy_config.paths(tmp_path.parent)
    assert tuple(toy_config.teacher(tmp_path.parent).data.text_sources) == (folder["text_sft"], folder["copy_lm"])
    records = [json.loads(line) for line in (tmp_path / "text_sft.jsonl").read_text().splitlines()]
    per_task = Counter(r["id"].split("-")[1] for r in records)
    assert per_task == {t.name: 3 * 5 if t.name == "repeat" else 5 for t in TOY_TASKS}
    sentences = (tmp_path / "train.txt").read_text().split("\n")[:5]
    for i, sentence in enumerate(sentences):
        asked = [r["messages"] for r in records if r["id"].startswith(f"text{i:05d}-repeat-")]
        prompts = {m[0]["content"] for m in asked}
        assert len(prompts) == 3 and all(m[1]["content"] == sentence for m in asked)
        assert prompts <= {p.replace("{content}", sentence) for p in REPEAT.prompts_train}


def test_interrupted_stage_is_not_done(tmp_path: Path):
    def fail(folder: Path) -> None:
        (folder / "partial.txt").write_text("x")
        raise KeyboardInterrupt

    stages = build.Stages(tmp_path, log=lambda _: None)
    with pytest.raises(KeyboardInterrupt):
        stages.run("a", {"n": 1}, [], fail)
    assert stage_cache.record(tmp_path / "a") is None
    built = build.Stages(tmp_path, log=lambda _: None)
    built.run("a", {"n": 1}, [], lambda f: (f / "ok.txt").write_text("y"))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == [stage_cache.MARKER, "ok.txt"]


def test_checks_compare_against_the_targets():
    teacher = {"text_acc": 0.97, "tasks": {"repeat": 0.95, "reverse": 0.8}}
    rows = {
        "asr": {"gap_heldout_tasks": 0.6, "speech_acc_heldout_tasks": 0.3, "text_retention_drop": 0.0, "wer": 0.12},
        "mtbi": {
            "gap_seen": 0.02,
            "gap_heldout_tasks": 0.05,
            "speech_acc_heldout_tasks": 0.92,
            "text_retention_drop": 0.0,
        },
        "salad": {
            "gap_seen": 0.12,
            "gap_heldout_tasks": 0.2,
            "speech_acc_heldout_tasks": 0.5,
            "text_retention_drop": 0.05,
        },
    }
    encoder = {"wer": 0.11, "cer": 0.05, "exact": 0.5}
    cascade = {"speech_acc_heldout_tasks": 0.6}
    result = {c["check"]: c["ok"] for c in demo.checks(teacher, rows, encoder, cascade)}
    assert result["teacher text accuracy >= 95%"]
    assert result["teacher repeat >= 90%"] and not result["teacher reverse >= 90%"]
    assert not result["encoder CTC WER <= 10%"]
    assert result["asr recipe WER <= 15%"]
    assert result["mtbi: gap on seen tasks <= 10 points"] and not result["salad: gap on seen tasks <= 10 points"]
    assert result["mtbi: held-out-task speech accuracy >= the cascade's"]
    assert not result["salad: held-out-task speech accuracy >= the cascade's"]
    assert result["mtbi: gap on held-out tasks <= 10 points"]
    assert not result["salad: gap on held-out tasks <= 10 points"]
    assert result["asr at least 30 points below mtbi on held-out tasks"]
    assert not result["asr at least 30 points below salad on held-out tasks"]
    assert not result["salad: text retention within 2 points of the teacher"]


@pytest.fixture
def miniature(monkeypatch: pytest.MonkeyPatch) -> build.Sizes:
    """Toy settings shrunk to seconds: few sentences, one voice, a few steps per stage, one-layer
    models and one bucket per kind (each layer and bucket is more for XLA to compile)."""
    small = dict(
        TEACHER_LLM={**toy_config.TEACHER_LLM, "num_hidden_layers": 1},
        ENCODER={**toy_config.ENCODER, "encoder_layers": 1},
        TEXT_BUCKETS=toy_config.TEXT_BUCKETS[-1:],
        SPEECH_SECONDS=toy_config.SPEECH_SECONDS[-1:],
        TEACHER_STEPS=3,
        ENCODER_STEPS=3,
        ALIGN_STEPS=3,
        RECIPE_STEPS=3,
        BATCH_SIZE=8,
        SPEECH_BATCH_SIZE=8,
        ASR_EVAL_UTTERANCES=2,
        TARGET_SHARDS=1,
        STAGE2_STEPS=3,
        STAGE2_BUDGET_FRACTION=1.0,  # of eight utterances: some texts to speak
    )
    for name, value in small.items():
        monkeypatch.setattr(toy_config, name, value)
    return build.Sizes(
        train_sentences=8,
        encoder_sentences=3,
        heldout_sentences=4,
        voices=(Voice(rate=220),),
        copy_sequences=16,
        stage2_corpus=12,
        stage2_clusters=2,
        stage2_probes=2,
    )


def test_miniature_demo_builds_every_stage_and_reports(tmp_path: Path, miniature: build.Sizes):
    out = tmp_path / "demo_out"
    report = demo.run_demo(out, ("mtbi", "salad"), sizes=miniature, eval_sentences=1)

    assert set(report["recipes"]) == {"mtbi", "salad", "salad+stage2"}
    assert 0.0 <= report["teacher"]["text_acc"] <= 1.0
    assert set(report["encoder"]) == {"wer", "cer", "exact"} and 0.0 <= report["encoder"]["cer"]
    for key in ("speech_acc_seen", "speech_acc_heldout_prompts", "speech_acc_heldout_tasks"):
        assert 0.0 <= report["cascade"][key] <= 1.0 and 0.0 <= report["cascade"]["aligned"][key] <= 1.0
    # Every recipe starts from the alignment run's connector and pools frames by its CTC labels.
    recipe_config = json.loads((out / "recipe" / "mtbi" / "config.json").read_text())
    assert recipe_config["model"]["init_from"]["workdir"] == str(out / "align" / "run")
    assert recipe_config["model"]["length_adapter"]["enabled"]
    assert recipe_config["model"]["length_adapter"]["output"] == "embeddings"
    align_config = json.loads((out / "align" / "run" / "config.json").read_text())
    assert align_config["model"]["projector"]["ctc_blank"] and recipe_config["model"]["projector"]["ctc_blank"]
    # The encoder's pretraining alone hears the corpus's encoder sentences, besides the training speech.
    paths = toy_config.paths(out)
    encoder_config = json.loads((out / "encoder" / "run" / "config.json").read_text())
    assert [s["path"] for s in encoder_config["data"]["speech_sources"]] == [paths["speech"], paths["speech_encoder"]]
    assert [s["path"] for s in recipe_config["data"]["speech_sources"]] == [paths["speech"]]
    heard_by_encoder = build.transcripts(paths["speech_encoder"])
    assert len(heard_by_encoder) == 3 and not heard_by_encoder & build.transcripts(paths["speech"])
    for row in report["recipes"].values():
        for key in (
            "speech_acc_seen",
            "speech_acc_heldout_prompts",
            "speech_acc_heldout_tasks",
            "gap_seen",
            "gap_heldout_tasks",
            "text_retention",
            "wer",
        ):
            assert 0.0 <= row[key] <= 1.0 or key in ("gap_seen", "gap_heldout_tasks", "wer")
    written = json.loads((out / "report.json").read_text())
    assert written["recipes"]["mtbi"]["speech_acc_seen"] == report["recipes"]["mtbi"]["speech_acc_seen"]
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# Toy world") and "| cascade (CTC transcript -> teacher) |" in markdown
    assert (out / "accuracy.png").stat().st_size > 0 and (out / "retention.png").stat().st_size > 0
    # The frozen teacher: projector-only mtbi cannot change the LLM's text answers.
    assert report["recipes"]["mtbi"]["text_retention_drop"] == 0.0
    # SALAD's stage 2 continued the salad run from its last step before the decay (2 of 3), on its
    # mixture plus the texts drawn from the web corpus and spoken, for STAGE2_STEPS more steps.
    assert sorted(p.name for p in (out / "recipe" / "salad" / "checkpoints").iterdir()) == ["2", "3"]
    stage2 = json.loads((out / "stage2" / "salad" / "train" / "config.json").read_text())
    assert stage2["train"]["steps"] == 2 + 3
    assert stage2["data"]["speech_sources"][-1]["path"] == str(out / "stage2" / "salad" / "synth" / "manifest.jsonl")
    drawn = (out / "stage2" / "salad" / "sample" / "selected.jsonl").read_text().splitlines()
    # Stage 2's web texts are new to the encoder too.
    web = {json.loads(line)["text"] for line in (out / "stage2" / "salad" / "corpus.jsonl").read_text().splitlines()}
    assert len(web) == 12 and not web & (heard_by_encoder | build.transcripts(paths["speech"]))
    assert drawn and "| salad+stage2 |" in (out / "report.md").read_text()

    again = demo.run_demo(out, ("mtbi", "salad"), sizes=miniature, eval_sentences=1)
    assert again["cached"] == list(again["timings"]) and again["timings"] == report["timings"]
    assert again["recipes"] == report["recipes"]


def test_speech_buckets_hold_the_longest_clip_and_the_text():
    from speechlm_jax.models.frontend import audio_token_count

    for downsample in (2, 4, 8):
        buckets = toy_config.speech_buckets(downsample)
        assert [samples for samples, _ in buckets] == [16000 * s for s in toy_config.SPEECH_SECONDS]
        for samples, positions in buckets:
            assert positions % 8 == 0 and positions >= audio_token_count(samples, downsample) + 32


def test_only_builds_the_named_stages_and_keys_the_rest(tmp_path: Path, miniature: build.Sizes):
    out = tmp_path / "demo_out"
    assert demo.run_demo(out, ("mtbi",), sizes=miniature, eval_sentences=1, only=["corpus"]) is None
    assert sorted(p.name for p in out.iterdir()) == ["corpus"]
    with pytest.raises(cli.UsageError, match="no stages \\['nonsense'\\]"):
        demo.run_demo(out, ("mtbi",), sizes=miniature, eval_sentences=1, only=["nonsense"])
    # A stage whose inputs are not built is refused, naming them; the folder stays as it was.
    with pytest.raises(cli.UsageError, match="--only encoder: it reads stage speech, which is not built"):
        demo.run_demo(out, ("mtbi",), sizes=miniature, eval_sentences=1, only=["encoder"])
    assert sorted(p.name for p in out.iterdir()) == ["corpus"]


def test_only_with_wait_builds_once_another_worker_has_built_its_inputs(tmp_path: Path, miniature: build.Sizes):
    import threading

    out = tmp_path / "demo_out"
    done = threading.Event()

    def worker() -> None:
        demo.run_demo(out, ("mtbi",), sizes=miniature, eval_sentences=1, only=["speech"], wait=True)
        done.set()

    thread = threading.Thread(target=worker, daemon=True)
    thread.start()
    assert not done.wait(3.0)  # the corpus is not built: the worker waits for it
    assert not (out / "speech").exists()
    demo.run_demo(out, ("mtbi",), sizes=miniature, eval_sentences=1, only=["corpus"])
    assert done.wait(120.0)
    assert stage_cache.record(out / "speech") is not None


def test_side_by_side_groups_share_no_stage_and_cover_the_recipes():
    phases = demo.side_by_side(("asr", "mtbi", "salad"), jobs=2)
    branches, recipes = phases
    assert branches == [["teacher", "targets", "eval/teacher"], ["speech", "encoder", "eval/encoder"]]
    # SALAD's stage 2 continues the salad run in the salad run's worker.
    assert recipes == [
        ["recipe/asr", "eval/asr", "recipe/salad", "eval/salad", "stage2/salad", "eval/salad+stage2"],
        ["recipe/mtbi", "eval/mtbi"],
    ]
    assert demo.side_by_side(("vtb",), jobs=4)[1] == [["recipe/vtb", "eval/vtb"]]


def test_a_failed_worker_fails_the_demo_naming_its_log(tmp_path: Path):
    """A worker is a `speechlm-demo --only` subprocess; its exit status and log reach the parent."""
    with pytest.raises(cli.CommandFailed, match=r"stages nonsense failed \(exit 2\); see .*nonsense\.log"):
        demo.run_workers(tmp_path, ("mtbi",), [["nonsense"]], log=lambda line: None)
    assert "--only: no stages ['nonsense']" in (tmp_path / "logs" / "nonsense.log").read_text()


def test_a_failed_worker_stops_the_others(tmp_path: Path):
    """A worker waiting for a stage that will never come (no corpus) is stopped when its sibling fails."""
    import time

    start = time.perf_counter()
    with pytest.raises(cli.CommandFailed, match=r"stages nonsense failed") as failure:
        demo.run_workers(tmp_path, ("mtbi",), [["speech"], ["nonsense"]], log=lambda line: None)
    assert "speech" not in str(failure.value)  # the stopped worker did not fail: it was stopped
    assert "waiting for corpus" in (tmp_path / "logs" / "speech.log").read_text()
    assert not (tmp_path / "speech").exists() and time.perf_counter() - start < 120


def test_jobs_refuse_custom_sizes(tmp_path: Path, miniature: build.Sizes):
    with pytest.raises(ValueError, match="demo's own sizes"):
        demo.run_demo(tmp_path, ("mtbi",), sizes=miniature, jobs=2)
