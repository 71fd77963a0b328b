"""Corpus writing: layouts, resuming, voice assignment, worker processes, the CLI."""

import json

import numpy as np
import pytest

from speechlm_jax.data.audio import load_audio
from speechlm_jax.data.synth_cli import main as synth_main
from speechlm_jax.data.tts import EspeakSynthesizer, SynthResult, Voice, voice_grid
from speechlm_jax.data.tts_corpus import librispeech_transcript, synthesize_corpus

ITEMS = [
    {"id": "a", "text": "The quick brown fox jumps over the lazy dog."},
    {"id": "b", "text": "Speech models should listen as well as they read."},
    {"id": "c/3", "text": "Four, five — six!"},
]


class CountingSynthesizer:
    """Wraps a synthesizer and counts its calls."""

    def __init__(self, inner):
        self.inner = inner
        self.sample_rate = inner.sample_rate
        self.calls = 0

    def synthesize(self, text: str, voice: Voice) -> SynthResult:
        self.calls += 1
        return self.inner.synthesize(text, voice)


class ToneSynthesizer:
    """A plugged-in engine at 22050 Hz: one 0.2 s tone per word."""

    sample_rate = 22050

    def synthesize(self, text: str, voice: Voice) -> SynthResult:
        words = text.split()
        t = np.arange(int(0.2 * self.sample_rate)) / self.sample_rate
        tone = (8000 * np.sin(2 * np.pi * (200 + voice.pitch) * t)).astype(np.int16)
        timed = [{"w": w, "start": 0.2 * i, "end": 0.2 * (i + 1)} for i, w in enumerate(words)]
        return SynthResult(audio=np.tile(tone, len(words)), words=timed)


def _records(manifest):
    return [json.loads(line) for line in manifest.read_text().splitlines()]


def _assert_same_speech(record, reference):
    """Same item, voice and words; times within 30 ms (eSpeak NG's timing varies by a few ms
    from call to call)."""
    same_keys = ("id", "audio", "text", "speaker", "voice")
    assert {k: record[k] for k in same_keys} == {k: reference[k] for k in same_keys}
    assert [w["w"] for w in record["words"]] == [w["w"] for w in reference["words"]]
    times = [[w["start"], w["end"]] for w in record["words"]] + [[record["duration"]] * 2]
    expected = [[w["start"], w["end"]] for w in reference["words"]] + [[reference["duration"]] * 2]
    np.testing.assert_allclose(times, expected, atol=0.03)


def test_corpus_resumes_without_new_synthesis(tmp_path):
    voices = voice_grid(["en-us", "en-gb"], [160, 190], [50])
    synth = CountingSynthesizer(EspeakSynthesizer())
    manifest = synthesize_corpus(ITEMS, tmp_path, voices=voices, synthesizer=synth).manifest
    assert synth.calls == 3
    first = _records(manifest)
    assert [r["id"] for r in first] == ["a", "b", "c/3"]
    for record in first:
        audio = load_audio(tmp_path / record["audio"])
        assert record["duration"] == pytest.approx(len(audio) / 16000, abs=1e-3)
        assert [w["w"] for w in record["words"]] == record["text"].split()
        assert record["voice"] in {v.key for v in voices} and record["speaker"] == record["voice"]

    report = synthesize_corpus(ITEMS, tmp_path, voices=voices, synthesizer=synth)
    assert synth.calls == 3 and (report.synthesized, report.reused) == (0, 3)
    assert _records(report.manifest) == first

    (tmp_path / first[1]["audio"]).unlink()
    with open(tmp_path / ".synth_progress.jsonl", "a") as journal:
        journal.write('{"id": "a", "cut sh')  # an interrupted append
    report = synthesize_corpus(ITEMS, tmp_path, voices=voices, synthesizer=synth)
    assert synth.calls == 4 and (report.synthesized, report.reused) == (1, 2)
    again = _records(report.manifest)
    assert again[0] == first[0] and again[2] == first[2]
    _assert_same_speech(again[1], first[1])


def test_voice_assignment_depends_on_seed_and_id_only(tmp_path):
    voices = voice_grid(["en-us", "en-gb", "en-029"], [150, 175, 200], [40, 60])
    items = [{"id": f"utt{i}", "text": "word"} for i in range(30)]

    def assignment(run_items, seed, folder):
        manifest = synthesize_corpus(
            run_items, tmp_path / folder, voices=voices, synthesizer=ToneSynthesizer(), seed=seed
        ).manifest
        return {r["id"]: r["voice"] for r in _records(manifest)}

    forward = assignment(items, 0, "forward")
    assert forward == assignment(items[::-1], 0, "backward")
    assert forward != assignment(items, 1, "other_seed")
    assert len(set(forward.values())) > 5


def test_librispeech_layout_and_resampled_plugin(tmp_path):
    items = [{"id": f"u{i}", "text": f"word number {i}, said plainly."} for i in range(5)]
    voices = [Voice("en-us", 175, 20), Voice("en-us", 175, 80)]
    synth = CountingSynthesizer(ToneSynthesizer())
    manifest = synthesize_corpus(items, tmp_path, voices=voices, synthesizer=synth, layout="librispeech").manifest
    records = _records(manifest)
    assert [r["id"] for r in records] == [item["id"] for item in items]
    transcripts = {}
    for path in tmp_path.glob("*/*/*.trans.txt"):
        speaker, chapter = path.parent.parent.name, path.parent.name
        assert path.name == f"{speaker}-{chapter}.trans.txt"
        for line in path.read_text().splitlines():
            utterance, text = line.split(" ", 1)
            transcripts[utterance] = text
    for record in records:
        speaker, chapter, name = record["audio"].split("/")
        assert name.startswith(f"{speaker}-{chapter}-") and name.endswith(".flac")
        assert record["speaker"] == speaker
        assert transcripts[name[: -len(".flac")]] == librispeech_transcript(record["text"])
        assert transcripts[name[: -len(".flac")]].startswith("WORD NUMBER ")
        audio = load_audio(tmp_path / record["audio"])
        assert len(audio) == pytest.approx(0.2 * 16000 * 5, abs=2)  # 22050 Hz -> 16 kHz
    assert len(transcripts) == 5
    utterances = sorted(transcripts)
    per_speaker = {}
    for u in utterances:
        per_speaker.setdefault(u.split("-")[0], []).append(u.split("-")[2])
    for numbers in per_speaker.values():
        assert numbers == [f"{i:04d}" for i in range(len(numbers))]


def test_worker_processes_write_the_same_corpus(tmp_path):
    voices = [Voice("en-us", 175, 50), Voice("en-gb+f3", 200, 60)]
    serial = synthesize_corpus(ITEMS, tmp_path / "serial", voices=voices, workers=1).manifest
    parallel = synthesize_corpus(ITEMS, tmp_path / "parallel", voices=voices, workers=2).manifest
    for record, reference in zip(_records(parallel), _records(serial), strict=True):
        _assert_same_speech(record, reference)
        assert len(load_audio(tmp_path / "parallel" / record["audio"])) == pytest.approx(
            record["duration"] * 16000, abs=16
        )


def test_cli_writes_corpus_and_summary(tmp_path, capsys):
    texts = tmp_path / "texts.txt"
    texts.write_text("First line here.\n\nSecond line.\n")
    out = tmp_path / "out"
    args = [
        "--input",
        str(texts),
        "--out",
        str(out),
        "--voices",
        "en-us,en+m3",
        "--rates",
        "175",
        "--pitches",
        "50",
    ]
    assert synth_main(args) == 0
    assert "2 synthesized, 0 already done, 0 failed" in capsys.readouterr().out.strip().splitlines()[-1]
    assert [r["id"] for r in _records(out / "manifest.jsonl")] == ["texts-000000", "texts-000002"]
    assert synth_main(args) == 0
    assert "0 synthesized, 2 already done" in capsys.readouterr().out

    plugged = tmp_path / "plugged"
    assert (
        synth_main(args[:3] + [str(plugged), "--layout", "librispeech", "--synthesizer", f"{__name__}:ToneSynthesizer"])
        == 0
    )
    records = _records(plugged / "manifest.jsonl")
    assert [len(r["words"]) for r in records] == [3, 2]
    assert all(r["duration"] == pytest.approx(0.2 * len(r["words"]), abs=1e-3) for r in records)
    assert len(list(plugged.glob("*/*/*.trans.txt"))) >= 1
