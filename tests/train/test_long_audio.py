"""Training on audio longer than the encoder's window: the tiny ASR recipe with a 2 s window,
one utterance of three windows in an 8 s bucket, and one past `data.max_audio_seconds` that
is skipped, counted and named, while training goes on."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
import soundfile as sf

from speechlm_jax.models.frontend import HOP_LENGTH
from speechlm_jax.train import data, trainer

WINDOW_POSITIONS = 100  # 200 mel frames: a 2 s window


def _long_manifest(tiny_corpus: Path, root: Path) -> Path:
    """One utterance of the corpus's first train recordings joined to about 5 s, and one of 10 s."""
    rows = [json.loads(line) for line in (tiny_corpus / "train" / "manifest.jsonl").read_text().splitlines()]
    waves, texts = [], []
    for row in rows:
        path = Path(row["audio"])
        wave, rate = sf.read(path if path.is_absolute() else tiny_corpus / "train" / path, dtype="int16")
        assert rate == 16000
        waves.append(wave)
        texts.append(row["text"])
        if sum(map(len, waves)) > 5 * 16000:
            break
    long = np.concatenate(waves)[: int(5.5 * 16000)]
    assert 4 * 16000 < len(long) <= 5.5 * 16000
    sf.write(root / "long.wav", long, 16000, subtype="PCM_16")
    sf.write(root / "too_long.wav", np.concatenate([long, long]), 16000, subtype="PCM_16")
    text = " ".join(texts[: len(waves)])
    manifest = root / "long.jsonl"
    manifest.write_text(
        json.dumps({"id": "long", "audio": str(root / "long.wav"), "text": text})
        + "\n"
        + json.dumps({"id": "too-long", "audio": str(root / "too_long.wav"), "text": text})
        + "\n"
    )
    return manifest


@pytest.fixture(scope="module")
def long_run(tiny_corpus, compilation_cache, tmp_path_factory):
    """(config, workdir, root): the tiny ASR recipe with a 2 s encoder window, trained 2 steps
    on the long utterance, checkpointed at the end."""
    from speechlm_jax.configs import asr

    root = tmp_path_factory.mktemp("long_audio")
    config = asr.get_config(f"tiny,data_dir={tiny_corpus}")
    config.train.update(
        steps=2,
        log_every=1,
        batch_size=2,
        progress_bar=False,
        eval_every=0,
        fast_compile=True,
        compilation_cache=str(compilation_cache),
    )
    config.model.encoder.max_source_positions = WINDOW_POSITIONS
    config.data.speech_sources = ({"type": "manifest", "path": str(_long_manifest(tiny_corpus, root))},)
    config.data.buckets = ((16000 * 8, 256),)
    config.data.teacher_tokens = 256
    config.data.max_audio_seconds = 8.0
    config.checkpoint.every = 2
    config.checkpoint.async_save = False
    workdir = root / "run"
    trainer.train(config, workdir, devices=jax.devices()[:1])
    return config, workdir, root


def test_a_long_utterance_trains_window_by_window(long_run):
    config, workdir, _ = long_run

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in records if r["split"] == "train"}
    assert sorted(train) == [1, 2]
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in train.values())
    assert train[2]["data/skipped/too_long"] >= 1 and train[2]["data/examples"] >= 4

    # The batches the run read: every row the one long utterance, three windows of the encoder.
    iterator, _ = data.Data(config).train_iterator()
    batch = next(iterator)
    window = 2 * WINDOW_POSITIONS * HOP_LENGTH
    assert batch["audio"].shape == (2, config.data.max_slots, 16000 * 8)
    assert (batch["audio_lens"][:, 0] > 2 * window).all() and (batch["audio_lens"][:, 1] == 0).all()


def test_speechlm_eval_answers_long_recordings_as_in_training(long_run, tmp_path):
    """`speechlm-eval` on the run: a 5.5 s recording (three windows) is one audio span, as in
    training; an 11 s one, past the run's max_audio_seconds (8 s), is cut into two slots of at
    most 8 s, as overlong="split" does. The gap benchmark answers both by speech."""
    from speechlm_jax.data.examples import Audio
    from speechlm_jax.data.tokenizer import load_tokenizer
    from speechlm_jax.evaluation import main as eval_main
    from speechlm_jax.evaluation.items import Item
    from speechlm_jax.evaluation.scoring import Scorer
    from speechlm_jax.sharding import make_mesh

    config, workdir, root = long_run
    asked = [
        Item(id=name, task="last_word", question="the dog runs", answer="runs", audio=str(root / f"{name}.wav"))
        for name in ("long", "too_long")
    ]
    items = tmp_path / "items.jsonl"
    fields = ("id", "task", "question", "answer", "audio")
    items.write_text("".join(json.dumps({k: getattr(it, k) for k in fields}) + "\n" for it in asked))
    argv = ["--workdir", str(workdir), "--items", str(items), "--max_new_tokens", "4", "--batch_size", "8"]
    result = eval_main.run(eval_main.parse_request([*argv, "--out", str(tmp_path / "o")]))
    records = {r["id"]: r for r in result["gap"]["items"]}
    assert set(records) == {"long", "too_long"} and all(isinstance(r["speech"], str) for r in records.values())

    # What the evaluator builds for those items, and its answers.
    model, _, _ = eval_main.load_run(workdir, make_mesh({"data": 1}, jax.devices()[:1]))
    scorer = Scorer(
        model,
        load_tokenizer(config.data.tokenizer),
        downsample=config.model.projector.downsample,
        batch_size=8,
        **eval_main._audio_limit(config),
    )
    slots = {
        it.id: [s for s in scorer.segments(it, spoken=True, response=None) if isinstance(s, Audio)] for it in asked
    }
    long_samples = sf.info(str(root / "long.wav")).frames
    assert [len(a.waveform) for a in slots["long"]] == [long_samples] and long_samples > 2 * 32000
    assert len(slots["too_long"]) == 2 and all(len(a.waveform) <= 8 * 16000 for a in slots["too_long"])
    answers = scorer.generate_items(asked, "speech", max_new_tokens=4)
    assert answers == [records["long"]["speech"], records["too_long"]["speech"]]
