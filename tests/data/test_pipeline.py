"""The Grain pipeline: batch contract, skips, mixture, host shards, exact resume via orbax."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from speechlm_jax.data.audio import load_audio
from speechlm_jax.data.batching import NoExamplesError
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.pipeline import build_pipeline, restore_iterator, save_iterator
from speechlm_jax.models.frontend import audio_token_count

BUCKETS = ((16000, 48), (48000, 64))


def _config(manifest, **overrides) -> PipelineConfig:
    values = dict(
        speech_sources=({"type": "manifest", "path": str(manifest)},),
        buckets=BUCKETS,
        max_slots=3,
        teacher_tokens=64,
        batch_size=2,
        downsample=4,
        num_threads=1,
        prefetch_buffer_size=2,
    )
    values.update(overrides)
    return PipelineConfig(**values)


def _content(tok, batch, row) -> str:
    """The teacher twin's user turn: the prompt with the transcript in it."""
    ids = batch["teacher_tokens"][row][batch["teacher_input_mask"][row] > 0]
    return tok.decode(ids)


def _check_batch(batch, config: PipelineConfig, tok) -> None:
    b, s = config.batch_size, config.max_slots
    samples, t = batch["audio"].shape[2], batch["tokens"].shape[1]
    assert (samples, t) in config.buckets
    u = config.teacher_tokens
    expected = {
        "audio": ((b, s, samples), np.int16),
        "audio_lens": ((b, s), np.int32),
        "audio_labels": ((b, s, audio_token_count(samples, config.downsample) + 1), np.int32),
        "tokens": ((b, t), np.int32),
        "positions": ((b, t), np.int32),
        "input_mask": ((b, t), np.int32),
        "audio_index": ((b, t), np.int32),
        "targets": ((b, t), np.int32),
        "loss_mask": ((b, t), np.float32),
        "teacher_tokens": ((b, u), np.int32),
        "teacher_positions": ((b, u), np.int32),
        "teacher_input_mask": ((b, u), np.int32),
        "teacher_targets": ((b, u), np.int32),
        "teacher_loss_mask": ((b, u), np.float32),
        "kl_mask": ((b, t), np.float32),
        "teacher_index": ((b, t), np.int32),
        "weight": ((b,), np.float32),
        "task_id": ((b,), np.int32),
    }
    assert set(batch) == set(expected)
    for key, (shape, dtype) in expected.items():
        assert batch[key].shape == shape and batch[key].dtype == dtype, key
    frames = audio_token_count(samples, config.downsample)
    for i in range(b):
        n = int(batch["input_mask"][i].sum())
        assert batch["input_mask"][i, :n].all() and not batch["input_mask"][i, n:].any()
        if batch["weight"][i] == 0:
            assert n == 0
            continue
        np.testing.assert_array_equal(batch["positions"][i, :n], np.arange(n))
        index = batch["audio_index"][i]
        audio_pos = index >= 0
        assert (batch["tokens"][i][audio_pos] == tok.audio_token_id).all()
        for k in range(s):
            length = batch["audio_lens"][i, k]
            frames_k = index[(index >= k * frames) & (index < (k + 1) * frames)] - k * frames
            np.testing.assert_array_equal(frames_k, np.arange(audio_token_count(int(length), config.downsample)))
            assert not batch["audio"][i, k, length:].any()
            # CTC's labels: the slot's transcript, which the teacher twin reads in its place.
            labels = batch["audio_labels"][i, k]
            labels = labels[labels >= 0].tolist()
            assert bool(labels) == (length > 0)
            teacher = batch["teacher_tokens"][i].tolist()
            assert any(teacher[j : j + len(labels)] == labels for j in range(len(teacher))), (labels, teacher)
        on = batch["kl_mask"][i] > 0
        np.testing.assert_array_equal(
            batch["targets"][i][on], batch["teacher_targets"][i][batch["teacher_index"][i][on]]
        )
        assert batch["loss_mask"][i].sum() > 0 and batch["teacher_loss_mask"][i].sum() == batch["loss_mask"][i].sum()
        np.testing.assert_array_equal(
            batch["targets"][i][batch["loss_mask"][i] > 0],
            batch["teacher_targets"][i][batch["teacher_loss_mask"][i] > 0],
        )


def _drain(iterator) -> list[dict]:
    return list(iterator)


def test_one_pass_yields_every_utterance_in_contract_batches(wav_manifest, word_tokenizer, sentences):
    config = _config(wav_manifest, interleave_prob=0.5, span_max=2, kinds={"asr": 1.0})
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval", seed=1)
    batches = _drain(iterator)
    for batch in batches:
        _check_batch(batch, config, word_tokenizer)
    seen = [_content(word_tokenizer, b, i) for b in batches for i in range(2) if b["weight"][i] > 0]
    assert len(seen) == len(sentences)
    # Every teacher twin holds its full transcript, whether the student heard all of it or part.
    assert sorted(next(s for s in sentences if f" {s} " in f" {c} ") for c in seen) == sorted(sentences)
    slots = [int((b["audio_lens"][i] > 0).sum()) for b in batches for i in range(2) if b["weight"][i] > 0]
    assert min(slots) == 1 and max(slots) > 1  # whole utterances and interleaved ones
    counts = stats.as_dict()
    assert counts["examples"] == len(sentences) and counts["skipped"] == 0
    assert counts["batches"] == len(batches)


def _noise(seconds: float, rate: int = 16000) -> np.ndarray:
    return np.random.default_rng(int(seconds * 1000)).integers(-8000, 8000, int(seconds * rate)).astype(np.int16)


def _broken_corpus(wav_manifest, root: Path) -> tuple[Path, dict[str, int], dict[str, int], int]:
    """A manifest of 5 good utterances (one at 22.05 kHz, resampled) and one of each kind of
    broken file and line; the exact counts per epoch (`skipped/`) and per source (`source_skipped/`)."""
    import soundfile as sf

    rows = [json.loads(line) for line in wav_manifest.read_text().splitlines()][:4]
    for row in rows:
        row["audio"] = str(wav_manifest.parent / row["audio"])
    sf.write(root / "rate.wav", _noise(1.0, 22050), 22050, subtype="PCM_16")
    rows.append({"id": "rate", "audio": str(root / "rate.wav"), "text": "hello world"})
    (root / "empty.wav").write_bytes(b"")
    (root / "random.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    for suffix in ("wav", "flac"):
        sf.write(root / f"cut.{suffix}", _noise(1.0), 16000, subtype="PCM_16")
        data = (root / f"cut.{suffix}").read_bytes()
        (root / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
    sf.write(root / "no_frames.wav", np.zeros(0, np.int16), 16000)
    sf.write(root / "short.wav", _noise(0.005), 16000)  # 80 samples: no audio token
    sf.write(root / "long.wav", _noise(4.0), 16000)  # the largest bucket holds 3 s
    broken = {
        "missing_file": "missing.wav",
        "empty_file": "empty.wav",
        "undecodable": "random.flac",
        "truncated": ("cut.wav", "cut.flac"),
        "empty_audio": "no_frames.wav",
        "too_short": "short.wav",
        "too_long": "long.wav",
    }
    skipped = {}
    for cause, names in broken.items():
        names = (names,) if isinstance(names, str) else names
        for name in names:
            rows.append({"id": name, "audio": str(root / name), "text": "hello world"})
        skipped[cause] = len(names)
    rows.append({"id": "blank", "audio": rows[0]["audio"], "text": "  "})
    skipped["empty_text"] = 1
    rows.append({"id": "wordy", "audio": rows[0]["audio"], "text": " ".join(["hello"] * 80)})
    skipped["too_many_tokens"] = 1  # the teacher twin holds 64 tokens
    lines = [json.dumps(r) for r in rows]
    lines += ["{broken", json.dumps({"id": "untranscribed", "audio": rows[0]["audio"]}), json.dumps({"audio": 3})]
    manifest = root / "broken.jsonl"
    manifest.write_text("".join(line + "\n" for line in lines))
    return manifest, skipped, {"bad_json": 1, "no_transcript": 1, "bad_record": 1}, 5


def test_bad_files_are_skipped_and_counted_by_cause(wav_manifest, word_tokenizer, tmp_path):
    manifest, skipped, source_skipped, good = _broken_corpus(wav_manifest, tmp_path)
    iterator, stats = build_pipeline(_config(manifest), tokenizer=word_tokenizer, split="eval")
    batches = _drain(iterator)
    assert sum(int(b["weight"].sum()) for b in batches) == good
    expected = {
        "examples": good,
        "batches": len(batches),
        "split": 0,
        **{f"skipped/{k}": v for k, v in skipped.items()},
        **{f"source_skipped/{k}": v for k, v in source_skipped.items()},
        "skipped": sum(skipped.values()) + sum(source_skipped.values()),
    }
    assert stats.as_dict() == expected


def test_a_training_pass_with_no_example_fails_naming_the_causes_instead_of_reading_forever(
    wav_manifest, word_tokenizer, tmp_path
):
    rows = [json.loads(line) for line in wav_manifest.read_text().splitlines()]

    def manifest(good: int) -> Path:
        path = tmp_path / f"good{good}.jsonl"
        lines = [dict(r, audio=str(wav_manifest.parent / r["audio"])) for r in rows[:good]]
        lines += [dict(r, audio=str(tmp_path / "gone" / f"{r['id']}.wav")) for r in rows[good:]]
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        return path

    iterator, stats = build_pipeline(_config(manifest(0)), tokenizer=word_tokenizer, split="train")
    with pytest.raises(
        NoExamplesError, match=r"no example in 20 records in a row.*every one was skipped \(missing_file 20\)"
    ):
        next(iterator)
    # One good record of ten: twelve passes give batches, never the error.
    iterator, stats = build_pipeline(_config(manifest(1)), tokenizer=word_tokenizer, split="train")
    for _ in range(6):
        assert int(next(iterator)["weight"].sum()) == 2
    assert stats.as_dict()["skipped/missing_file"] >= 9 * 10


def test_skip_counts_per_epoch_survive_a_restore(wav_manifest, word_tokenizer, tmp_path):
    # Each bad file is counted once per epoch it is read in; the sources' lines once.
    manifest, skipped, source_skipped, good = _broken_corpus(wav_manifest, tmp_path)
    config = _config(manifest, num_epochs=3)
    reference, reference_stats = build_pipeline(config, tokenizer=word_tokenizer, seed=5)
    _drain(reference)
    final = reference_stats.as_dict()
    assert {k: final[f"skipped/{k}"] for k in skipped} == {k: 3 * v for k, v in skipped.items()}
    assert {k: final[f"source_skipped/{k}"] for k in source_skipped} == source_skipped
    assert final["skipped"] == 3 * sum(skipped.values()) + sum(source_skipped.values())
    assert final["examples"] == 3 * good

    first, stats = build_pipeline(config, tokenizer=word_tokenizer, seed=5)
    for _ in range(3):
        next(first)
    saved = stats.as_dict()
    assert 0 < saved["skipped"] - sum(source_skipped.values()) < 3 * sum(skipped.values())
    save_iterator(first, tmp_path / "data_state")
    resumed, resumed_stats = build_pipeline(config, tokenizer=word_tokenizer, seed=5)
    resumed = restore_iterator(resumed, tmp_path / "data_state")
    assert resumed_stats.as_dict() == saved
    _drain(resumed)
    assert resumed_stats.as_dict() == final


def test_librispeech_folder_with_broken_audio_is_counted_by_cause(word_tokenizer, tmp_path):
    import soundfile as sf

    chapter = tmp_path / "19" / "198"
    chapter.mkdir(parents=True)
    lines = ["19-198-0000 HELLO WORLD", "19-198-0001 THE CAT", "19-198-0002", "19-198-0003 GOOD MORNING"]
    (chapter / "19-198.trans.txt").write_text("\n".join(lines) + "\n")
    sf.write(chapter / "19-198-0000.flac", _noise(1.0), 16000, subtype="PCM_16")
    sf.write(chapter / "19-198-0002.flac", _noise(1.0), 16000, subtype="PCM_16")
    (chapter / "19-198-0003.flac").write_bytes(b"")
    sf.write(chapter / "19-198-0004.flac", _noise(1.0), 16000, subtype="PCM_16")  # no transcript line
    config = _config(tmp_path, speech_sources=({"type": "librispeech", "path": str(tmp_path)},))
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval")
    assert sum(int(b["weight"].sum()) for b in _drain(iterator)) == 1
    counts = stats.as_dict()
    assert {k: v for k, v in counts.items() if "skipped" in k} == {
        "skipped/missing_file": 1,
        "skipped/empty_text": 1,
        "skipped/empty_file": 1,
        "source_skipped/no_transcript": 1,
        "skipped": 4,
    }


def test_overlong_examples_are_dropped_or_split(wav_manifest, word_tokenizer, sentences):
    # Only 0.7 s (two words) fits a slot: longer utterances are dropped, or split at word boundaries.
    buckets = ((11200, 64),)
    iterator, stats = build_pipeline(_config(wav_manifest, buckets=buckets), tokenizer=word_tokenizer, split="eval")
    kept = sum(int(b["weight"].sum()) for b in _drain(iterator))
    assert 0 < kept < len(sentences) and stats.as_dict()["skipped/too_long"] == len(sentences) - kept
    config = _config(wav_manifest, buckets=buckets, overlong="split", max_slots=4)
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval")
    batches = _drain(iterator)
    counts = stats.as_dict()
    assert counts["examples"] + counts.get("skipped/too_long", 0) == len(sentences)
    assert counts["split"] > 0 and counts["examples"] > kept
    for batch in batches:
        _check_batch(batch, config, word_tokenizer)


def test_resume_through_orbax_equals_uninterrupted(wav_manifest, word_tokenizer, tmp_path):
    config = _config(wav_manifest, interleave_prob=0.5, batch_size=3, buckets=((24000, 64), (48000, 64)))
    reference, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=7)
    expected = [next(reference) for _ in range(8)]

    first, stats = build_pipeline(config, tokenizer=word_tokenizer, seed=7)
    consumed = 0
    while consumed < 2 or not any(first.get_state()["buffers"]):
        next(first)
        consumed += 1
    assert consumed <= 4, "the test needs examples waiting in a bucket"
    save_iterator(first, tmp_path / "data_state")
    counts = stats.as_dict()

    resumed, resumed_stats = build_pipeline(config, tokenizer=word_tokenizer, seed=7)
    resumed = restore_iterator(resumed, tmp_path / "data_state")
    assert resumed_stats.as_dict() == counts
    for want in expected[consumed:]:
        got = next(resumed)
        assert set(got) == set(want)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_two_processes_read_disjoint_shards_covering_the_data(wav_manifest, word_tokenizer, sentences):
    config = _config(wav_manifest)
    shards = []
    for process in range(2):
        iterator, _ = build_pipeline(
            config, tokenizer=word_tokenizer, split="eval", process_index=process, process_count=2
        )
        shards.append({_content(word_tokenizer, b, i) for b in iterator for i in range(2) if b["weight"][i] > 0})
    assert len(shards[0]) == len(shards[1]) == len(sentences) // 2
    assert not shards[0] & shards[1]
    covered = {s for s in sentences for c in shards[0] | shards[1] if f" {s} " in f" {c} "}
    assert covered == set(sentences)


def test_text_mixture_is_weighted_and_deterministic(wav_manifest, word_tokenizer, sentences, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"instruction": f"Repeat {s}", "response": s}) + "\n" for s in sentences))
    config = _config(wav_manifest, text_sources=(str(text),), text_weight=0.25, batch_size=4)
    iterator, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=3)
    batches = [next(iterator) for _ in range(12)]
    text_id = config.task_names.index("text_sft")
    is_text = np.concatenate([b["task_id"] == text_id for b in batches])
    assert abs(is_text.mean() - 0.25) < 0.1
    for b in batches:
        rows = b["task_id"] == text_id
        # Text-only rows: no audio, the teacher twin is the student.
        assert not b["audio_lens"][rows].any() and (b["audio_index"][rows] < 0).all()
        t = b["tokens"].shape[1]
        np.testing.assert_array_equal(b["tokens"][rows], b["teacher_tokens"][rows][:, :t])
    again, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=3)
    for want in batches[:4]:
        got = next(again)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    other, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=4)
    assert not all(np.array_equal(next(other)["tokens"], b["tokens"]) for b in batches[:3])


def test_text_loss_all_supervises_the_whole_text_example(wav_manifest, word_tokenizer, sentences, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"instruction": f"Repeat {s}", "response": s}) + "\n" for s in sentences))
    masks = {}
    for mode in ("response", "all"):
        config = _config(wav_manifest, text_sources=(str(text),), text_weight=1.0, batch_size=4, text_loss=mode)
        iterator, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=3)
        masks[mode] = next(iterator)
    response, everything = masks["response"], masks["all"]
    np.testing.assert_array_equal(response["tokens"], everything["tokens"])
    rows = everything["weight"] > 0
    n = everything["input_mask"][rows].sum(axis=1)
    # Every position but the last predicts a real token; the response is a strict part of it.
    np.testing.assert_array_equal(everything["loss_mask"][rows].sum(axis=1), n - 1)
    assert (response["loss_mask"][rows].sum(axis=1) < n - 1).all()
    assert (everything["loss_mask"] >= response["loss_mask"]).all()
    with pytest.raises(ValueError, match="text_loss"):
        _config(wav_manifest, text_loss="prompt")


@pytest.mark.parametrize(
    "field,value,message",
    [("batch_size", 0, "batch_size must be at least 1"), ("max_slots", 0, "max_slots"), ("buckets", (), "buckets")],
)
def test_sizes_that_would_hang_the_batcher_are_refused(wav_manifest, field, value, message):
    with pytest.raises(ValueError, match=message):
        _config(wav_manifest, **{field: value})


def test_task_kinds_prompts_and_targets(wav_manifest, word_tokenizer, tmp_path):
    from speechlm_jax.data.tasks import TASKS, TextTask, register_task

    register_task(TextTask("pipeline_echo", ("Repeat {content}",), ("Repeat : {content}",), answer=lambda s: s))
    targets = tmp_path / "targets.jsonl"
    targets.write_text(
        "".join(
            json.dumps({"id": f"u{i}", "task": "continuation", "prompt": p, "response": "yes"}) + "\n"
            for i in range(0, 10, 2)
            for p in TASKS["continuation"].prompts_train
        )
    )
    config = _config(
        wav_manifest,
        kinds={"continuation": 1.0, "mixed_modal": 1.0},
        tasks=("pipeline_echo",),
        use_task_answer=True,
        targets=(str(targets),),
        prompt_split="heldout",
    )
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval", seed=0)
    batches = _drain(iterator)
    counts = stats.as_dict()
    # Continuation examples need the teacher's response: only even utterances have one,
    # and only for training prompts, so held-out continuation examples are all skipped.
    assert counts.get("skipped/no_target", 0) > 0
    echo = config.task_names.index("pipeline_echo")
    rows = [(b, i) for b in batches for i in range(2) if b["weight"][i] > 0]
    assert rows and all(b["task_id"][i] == echo for b, i in rows)
    for b, i in rows:
        _check_batch(b, config, word_tokenizer)
        content = _content(word_tokenizer, b, i)
        assert content.startswith("Repeat :")
        assert (b["audio_lens"][i] > 0).sum() == 1  # mixed-modal: one spoken span
    del TASKS["pipeline_echo"]


def test_interleaved_synthesized_speech_keeps_word_order(librispeech_corpus, word_tokenizer):
    """Real TTS speech with word timings: every slot holds exactly the words it replaces."""
    _, manifest = librispeech_corpus
    rows = {r["text"]: r for r in map(json.loads, manifest.read_text().splitlines())}
    config = _config(
        manifest,
        interleave_prob=1.0,
        interleave_ratio=0.5,
        span_min=1,
        span_max=2,
        buckets=((48000, 64),),
        margin_s=0.02,
    )
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval", seed=2)
    frames = audio_token_count(48000, config.downsample)
    checked = 0
    for batch in iterator:
        _check_batch(batch, config, word_tokenizer)
        for i in np.flatnonzero(batch["weight"]):
            teacher = batch["teacher_tokens"][i][batch["teacher_input_mask"][i] > 0].tolist()
            text = next(s for s in rows if f" {s} " in f" {word_tokenizer.decode(teacher)} ")
            ids = word_tokenizer.encode(text)
            start = next(u for u in range(len(teacher)) if teacher[u : u + len(ids)] == ids)
            # Expand each slot into the teacher tokens its last frame's KL index points past.
            student, index = batch["tokens"][i], batch["audio_index"][i]
            out, spans = [], []
            for t in range(int(batch["input_mask"][i].sum())):
                if index[t] < 0:
                    out.append(int(student[t]))
                elif index[t + 1] < 0:
                    assert batch["kl_mask"][i, t] == 1
                    end = int(batch["teacher_index"][i, t]) + 1
                    spans.append((len(out) - start, end - start))
                    out.extend(teacher[len(out) : end])
            assert out == teacher
            assert [k // frames for k in index[index >= 0]] == sorted(k // frames for k in index[index >= 0])
            words = rows[text]["words"]
            for k, (a, b) in enumerate(spans):
                lo = max(0, round(words[a]["start"] * 16000 - 320))
                samples = len(load_audio(manifest.parent / rows[text]["audio"]))
                hi = min(samples, round(words[b - 1]["end"] * 16000 + 320))
                assert abs(int(batch["audio_lens"][i, k]) - (hi - lo)) <= 1
            checked += 1
    assert checked == len(rows) and stats.as_dict()["skipped"] == 0


def test_running_text_is_the_transcript_after_bos_with_spans_spoken(librispeech_corpus, word_tokenizer):
    """SALAD's running text: no prompt, no chat frame; the teacher reads the transcript after BOS, the
    student the same with spans spoken; the written words are supervised and carry the KL."""
    _, manifest = librispeech_corpus
    texts = [json.loads(line)["text"] for line in manifest.read_text().splitlines()]
    config = _config(
        manifest,
        kinds={"running_text": 1.0},
        interleave_ratio=0.5,
        span_min=1,
        span_max=2,
        buckets=((48000, 64),),
        margin_s=0.02,
    )
    assert config.task_names[-1] == "running_text"
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval", seed=3)
    bos = word_tokenizer.hf.bos_token_id
    checked = 0
    for batch in iterator:
        _check_batch(batch, config, word_tokenizer)
        for i in np.flatnonzero(batch["weight"]):
            assert batch["task_id"][i] == config.task_names.index("running_text")
            teacher = batch["teacher_tokens"][i][batch["teacher_input_mask"][i] > 0].tolist()
            assert teacher[0] == bos and word_tokenizer.decode(teacher[1:]).strip() in texts
            student = batch["tokens"][i][batch["input_mask"][i] > 0]
            spoken = batch["audio_index"][i][: len(student)] >= 0
            assert spoken.any()
            # Every written token after BOS is a target of NLL and of KL; no position predicts an audio frame.
            written = np.flatnonzero(~spoken)[1:]
            np.testing.assert_array_equal(np.flatnonzero(batch["loss_mask"][i]), written - 1)
            assert set(np.flatnonzero(batch["kl_mask"][i])) >= set(written - 1)
            checked += 1
    assert checked == len(texts) and stats.as_dict()["skipped"] == 0


def test_checkpoint_manager_composite_and_config_dict(wav_manifest, word_tokenizer, tmp_path):
    """The trainer's way: the iterator as one item of an orbax CheckpointManager; a ConfigDict config."""
    import grain
    import ml_collections
    import orbax.checkpoint as ocp

    config = ml_collections.ConfigDict(
        dict(
            speech_sources=[{"type": "manifest", "path": str(wav_manifest)}],
            buckets=[[48000, 64], [24000, 64]],
            max_slots=3,
            teacher_tokens=64,
            batch_size=3,
            interleave_prob=0.5,
            num_threads=1,
            prefetch_buffer_size=2,
        )
    )
    reference, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=11)
    expected = [next(reference) for _ in range(5)]
    iterator, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=11)
    next(iterator), next(iterator)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        manager.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
    fresh, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=11)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data",)) as manager:
        restored = manager.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
    for want in expected[2:]:
        got = next(restored["data"])
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_spoken_qa_uses_the_records_question_and_answer(wav_manifest, word_tokenizer, tmp_path):
    rows = [json.loads(line) for line in wav_manifest.read_text().splitlines()][:3]
    for row in rows:
        row["audio"] = str(wav_manifest.parent / row["audio"])
        row["question"], row["answer"] = "What is said?", "yes"
    rows.append(dict(rows[0], id="noq", question=None))
    manifest = tmp_path / "qa.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(manifest, kinds={"spoken_qa": 1.0})
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval")
    batches = list(iterator)
    assert stats.as_dict()["skipped/no_question"] == 1
    qa = config.task_names.index("spoken_qa")
    for b in batches:
        _check_batch(b, config, word_tokenizer)
        for i in np.flatnonzero(b["weight"]):
            assert b["task_id"][i] == qa
            assert "What is said?" in _content(word_tokenizer, b, i)
            response = b["targets"][i][b["loss_mask"][i] > 0]
            assert word_tokenizer.hf.convert_ids_to_tokens(response.tolist()) == ["yes", "<eos>"]


_WORKER_PROGRAM = """
import sys

import numpy as np
from absl import flags

from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.pipeline import build_pipeline
from speechlm_jax.data.tokenizer import load_tokenizer


def batches(num_workers):
    config = PipelineConfig(speech_sources=({"type": "manifest", "path": sys.argv[1]},),
                            buckets=((16000, 48), (48000, 64)), max_slots=3, teacher_tokens=64, batch_size=2,
                            num_threads=1, prefetch_buffer_size=2, num_workers=num_workers)
    iterator, _ = build_pipeline(config, tokenizer=load_tokenizer(sys.argv[2]), split="eval")
    return list(iterator)


if __name__ == "__main__":
    try:
        batches(1)
        raise SystemExit("worker processes started without parsed absl flags")
    except RuntimeError as error:
        assert "absl" in str(error), error
    assert not flags.FLAGS.is_parsed(), "the library parsed or marked the absl flags"
    flags.FLAGS(sys.argv[:1])  # what an entry point without absl.app does before starting workers
    in_process, in_workers = batches(0), batches(1)
    assert len(in_workers) == len(in_process) > 0
    for want, got in zip(in_process, in_workers):
        for key in want:
            np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    print("ok")
"""


def test_worker_processes_from_a_program_without_absl_app(wav_manifest, word_tokenizer, tmp_path):
    """mp_prefetch from a plain `python program.py`: the library leaves absl's flags alone and says
    what to do; once the program parses them, worker processes yield the in-process batches."""
    program = tmp_path / "program.py"
    program.write_text(_WORKER_PROGRAM)
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run(
        [sys.executable, str(program), str(wav_manifest), word_tokenizer.hf.name_or_path],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_utterances_up_to_max_audio_seconds_are_one_slot_and_longer_ones_skipped_by_name(
    word_tokenizer, tmp_path, caplog
):
    """A 40 s bucket holds a 35 s utterance whole (the model encodes it window by window); over
    `max_audio_seconds` (38 s) a file is skipped from its header, counted and named in the log."""
    import soundfile as sf

    sf.write(tmp_path / "long.wav", _noise(35.0), 16000, subtype="PCM_16")
    sf.write(tmp_path / "longer.wav", _noise(39.0), 16000, subtype="PCM_16")
    rows = [
        {"id": "u-long", "audio": str(tmp_path / "long.wav"), "text": "hello world"},
        {"id": "u-longer", "audio": str(tmp_path / "longer.wav"), "text": "hello world"},
    ]
    manifest = tmp_path / "long.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = _config(manifest, buckets=((16000, 48), (40 * 16000, 512)), max_audio_seconds=38.0, max_slots=1)
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval")
    with caplog.at_level("WARNING"):
        (batch,) = _drain(iterator)
    assert batch["audio"].shape == (2, 1, 40 * 16000) and batch["audio_lens"][:, 0].tolist() == [35 * 16000, 0]
    frames = int((batch["audio_index"][0] >= 0).sum())
    assert frames == audio_token_count(35 * 16000, 4) == 437
    counts = stats.as_dict()
    assert counts["examples"] == 1 and counts["skipped/too_long"] == 1
    (message,) = [r.getMessage() for r in caplog.records if "skipped (too_long)" in r.getMessage()]
    assert "u-longer" in message and str(tmp_path / "longer.wav") in message and "39.000s > 38.0s" in message


def test_max_audio_seconds_past_the_largest_bucket_is_refused_unless_split(tmp_path):
    with pytest.raises(ValueError, match=r"max_audio_seconds=120 is longer than the largest bucket .* 30 s"):
        _config(tmp_path / "m.jsonl", buckets=((16000 * 30, 512),), max_audio_seconds=120.0)
    _config(tmp_path / "m.jsonl", buckets=((16000 * 30, 512),), max_audio_seconds=120.0, overlong="split")


def test_a_stored_waveform_past_max_audio_seconds_is_skipped_naming_the_record(word_tokenizer):
    """Sources that hold waveforms (TFDS, HF datasets) are held to the same maximum."""
    from speechlm_jax.data.examples import Example, Skipped
    from speechlm_jax.data.maker import ExampleMaker
    from speechlm_jax.data.sources import TargetTable

    config = PipelineConfig(buckets=((16000 * 40, 512),), max_audio_seconds=35.0, downsample=4)
    maker = ExampleMaker(config, word_tokenizer, TargetTable())
    rng = np.random.default_rng(0)
    kept = maker({"id": "ok", "waveform": _noise(34.0), "text": "hello world"}, rng)
    assert isinstance(kept, Example) and kept.max_audio_samples == 34 * 16000
    skipped = maker({"id": "tfds-17", "waveform": _noise(36.0), "text": "hello world"}, rng)
    assert skipped == Skipped("too_long", "id tfds-17: too long: 36.000s > max_audio_seconds 35s")
