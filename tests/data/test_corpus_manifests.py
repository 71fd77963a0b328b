"""Lhotse cut sets (written by `lhotse` itself) and NeMo manifests (lines of its documented
schema, by hand) as sources: segments of longer recordings against Lhotse's own audio and
against the whole file sliced; bad lines counted and named."""

from __future__ import annotations

import gzip
import json
import logging

import ml_collections
import numpy as np
import pytest
import soundfile as sf
from lhotse import CutSet, Recording, RecordingSet, SupervisionSegment, SupervisionSet
from lhotse.supervision import AlignmentItem

from speechlm_jax.data.audio import load_audio, to_int16
from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.corpus_manifests import lhotse_source, nemo_source
from speechlm_jax.data.maker import record_audio
from speechlm_jax.data.pipeline import build_pipeline
from speechlm_jax.data.preflight import DataSourceError, check_sources

SR = 16000


@pytest.fixture(scope="module")
def long_recording(wav_manifest, tmp_path_factory):
    """The WAV manifest's ten utterances one after another in one file, with 0.1 s of silence
    between them; returns (path, [(start s, duration s, text, words relative to the utterance)])."""
    root = tmp_path_factory.mktemp("long")
    rows = [json.loads(line) for line in wav_manifest.read_text().splitlines()]
    pieces, utterances, at = [], [], 0
    for row in rows:
        audio = load_audio(wav_manifest.parent / row["audio"])
        utterances.append((at / SR, len(audio) / SR, row["text"], row["words"]))
        pieces += [audio, np.zeros(SR // 10, np.int16)]
        at += len(audio) + SR // 10
    path = root / "session.flac"
    sf.write(path, np.concatenate(pieces), SR, subtype="PCM_16")
    return path, utterances


def _cuts(path, utterances, stereo_path) -> CutSet:
    recording = Recording.from_file(path)
    supervisions = [
        SupervisionSegment(
            id=f"u{i}",
            recording_id=recording.id,
            start=start,
            duration=duration,
            text=text,
            speaker="s0",
            alignment={"word": [AlignmentItem(w["w"], start + w["start"], w["end"] - w["start"]) for w in words]},
        )
        for i, (start, duration, text, words) in enumerate(utterances)
    ]
    stereo = Recording.from_file(stereo_path)
    supervisions.append(
        SupervisionSegment(id="right", recording_id=stereo.id, start=0.25, duration=0.5, text="hello world", channel=1)
    )
    return (
        CutSet.from_manifests(
            recordings=RecordingSet.from_recordings([recording, stereo]),
            supervisions=SupervisionSet.from_segments(supervisions),
        )
        .trim_to_supervisions(keep_overlapping=False)
        .to_eager()
    )


@pytest.fixture(scope="module")
def stereo_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("stereo") / "stereo.wav"
    rng = np.random.default_rng(1)
    sf.write(path, rng.integers(-8000, 8000, (SR, 2)).astype(np.int16), SR, subtype="PCM_16")
    return path


@pytest.mark.parametrize("name", ["cuts.jsonl.gz", "cuts.jsonl"])
def test_lhotse_cuts_read_the_segments_lhotse_reads(long_recording, stereo_file, tmp_path, name):
    path, utterances = long_recording
    cuts = _cuts(path, utterances, stereo_file)
    cuts.to_file(tmp_path / name)
    source = lhotse_source(tmp_path / name)
    assert len(source) == len(cuts) == 11 and source.skipped == {}
    for cut, record in zip(cuts, source.records):
        assert record["id"] == cut.id and record["text"] == cut.supervisions[0].text
        # Lhotse's own decoding of the cut is the reference.
        np.testing.assert_array_equal(record_audio(record, SR), to_int16(cut.load_audio()[0]))
    for (start, duration, text, words), record in zip(utterances, source.records):
        assert (record["offset"], record["duration"]) == pytest.approx((start, duration))
        assert [w["w"] for w in record["words"]] == text.split()
        np.testing.assert_allclose([w["start"] for w in record["words"]], [w["start"] for w in words], atol=1e-6)
    right = source.records[-1]
    assert right["channel"] == 1 and right["words"] is None
    np.testing.assert_array_equal(record_audio(right, SR), sf.read(stereo_file, dtype="int16")[0][4000:12000, 1])


def test_bad_lhotse_lines_are_counted_and_named(long_recording, stereo_file, tmp_path, caplog):
    path, utterances = long_recording
    cuts = _cuts(path, utterances[:2], stereo_file)
    good = [cut.to_dict() for cut in cuts]
    mixed = cuts[0].mix(cuts[1]).to_dict()
    silent = cuts[0].to_dict() | {"id": "silent", "supervisions": []}
    url = json.loads(json.dumps(cuts[0].to_dict()))
    url["recording"]["sources"][0] = {"type": "url", "channels": [0], "source": "https://example.com/a.flac"}
    fast = cuts[0].perturb_speed(1.1).to_dict()
    lines = [json.dumps(c) for c in good] + ["{not json", json.dumps(mixed), json.dumps(silent)]
    lines += [json.dumps(url), json.dumps(fast), json.dumps({"id": "x", "start": "0"}), "[1, 2]"]
    manifest = tmp_path / "cuts.jsonl.gz"
    with gzip.open(manifest, "wt") as f:
        f.write("".join(line + "\n" for line in lines))
    with caplog.at_level(logging.WARNING):
        source = lhotse_source(manifest)
    assert len(source) == len(good)
    assert source.skipped == {"bad_json": 2, "bad_record": 4, "no_transcript": 1}
    assert f"{manifest} line 5: a MixedCut" in caplog.text
    assert f"{manifest} line 7: audio source of type 'url'" in caplog.text
    assert f"{manifest} line 8: recording transforms ['Speed']" in caplog.text


def test_a_relative_lhotse_path_is_relative_to_the_working_directory(long_recording, tmp_path, monkeypatch):
    path, utterances = long_recording
    monkeypatch.chdir(path.parent)  # where Lhotse looks for a relative path: the working directory
    recording = Recording.from_file(path.name)
    assert recording.sources[0].source == path.name
    start, duration, text, _ = utterances[1]
    supervision = SupervisionSegment(id="u1", recording_id=recording.id, start=start, duration=duration, text=text)
    cuts = CutSet.from_manifests(
        recordings=RecordingSet.from_recordings([recording]), supervisions=SupervisionSet.from_segments([supervision])
    ).trim_to_supervisions()
    cuts.to_file(tmp_path / "cuts.jsonl")
    record = lhotse_source(tmp_path / "cuts.jsonl").records[0]
    assert record["audio"] == str(path) and record["text"] == text
    np.testing.assert_array_equal(record_audio(record, SR), to_int16(cuts[0].load_audio()[0]))


def _nemo(path, utterances) -> list[dict]:
    lines = [
        {"audio_filepath": path.name, "offset": start, "duration": duration, "text": text}
        for start, duration, text, _ in utterances
    ]
    # A whole file, by absolute path, without an offset.
    lines.append({"audio_filepath": str(path), "duration": 1.0, "text": "from the start"})
    return lines


def test_nemo_lines_read_their_segment_of_the_file(long_recording):
    path, utterances = long_recording
    manifest = path.parent / "train_manifest.json"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in _nemo(path, utterances)))
    source = nemo_source(manifest)
    assert len(source) == len(utterances) + 1 and source.skipped == {}
    whole = load_audio(path)
    for record, (start, duration, text, _) in zip(source.records, utterances):
        assert record["audio"] == str(path) and record["text"] == text
        first = round(start * SR)
        np.testing.assert_array_equal(record_audio(record, SR), whole[first : first + round(duration * SR)])
    np.testing.assert_array_equal(record_audio(source.records[-1], SR), whole[:SR])


def test_bad_nemo_lines_are_counted_and_named(long_recording, tmp_path, caplog):
    path, utterances = long_recording
    good = _nemo(path, utterances[:2])[:2]
    bad = [
        {"audio_filepath": str(path), "text": "no duration"},
        {"audio_filepath": str(path), "duration": 1.0, "text": 3},
        {"audio_filepath": str(path), "duration": 1.0},
        {"audio_filepath": str(path), "duration": 1.0, "offset": -1, "text": "before the start"},
        {"audio": str(path), "duration": 1.0, "text": "manifest schema, not NeMo's"},
    ]
    manifest = path.parent / "bad_manifest.json"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in good + bad) + "not json\n")
    with caplog.at_level(logging.WARNING):
        source = nemo_source(manifest)
    assert len(source) == 2
    assert source.skipped == {"bad_record": 4, "no_transcript": 1, "bad_json": 1}
    assert f"{manifest} line 3: duration None is not a positive number; skipped as bad_record" in caplog.text
    assert f"{manifest} line 7: no audio_filepath string" in caplog.text


def test_segments_train_through_the_pipeline_and_past_the_end_is_counted(long_recording, word_tokenizer):
    path, utterances = long_recording
    end = sum(d for _, d, _, _ in utterances) + 0.1 * len(utterances)
    lines = _nemo(path, utterances)[:-1] + [{"audio_filepath": str(path), "offset": end, "duration": 1.0, "text": "a"}]
    manifest = path.parent / "pipeline_manifest.json"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = PipelineConfig(
        speech_sources=({"type": "nemo", "path": str(manifest)},),
        buckets=((16000, 48), (48000, 64)),
        max_slots=3,
        teacher_tokens=64,
        batch_size=2,
    )
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval")
    batches = list(iterator)
    counts = stats.as_dict()
    assert sum(int(b["weight"].sum()) for b in batches) == counts["examples"] == len(utterances)
    assert counts["skipped/truncated"] == 1 and counts["skipped"] == 1


@pytest.mark.parametrize("kind", ["lhotse", "nemo"])
def test_preflight_names_a_missing_manifest(kind, tmp_path):
    spec = {"type": kind, "path": str(tmp_path / "cuts.jsonl.gz")}
    config = ml_collections.ConfigDict({"data": {"speech_sources": (spec,)}, "train": {"eval_every": 0}})
    with pytest.raises(DataSourceError, match=rf"data.speech_sources\[0\] \({kind}\): .*cuts.jsonl.gz does not exist"):
        check_sources(config)
    (tmp_path / "cuts.jsonl.gz").mkdir()
    with pytest.raises(DataSourceError, match="is not a file"):
        check_sources(config)
