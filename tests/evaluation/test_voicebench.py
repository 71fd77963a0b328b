"""VoiceBench subsets from local copies in the hub's schema (`evaluation.voicebench`), and `speechlm-eval --voicebench`.

The fixtures are what `datasets` writes for `hlt-lab/voicebench`: an Audio column of encoded
bytes plus a file name, `prompt`, and the subset's scoring columns, as Parquet shards named
`<split>-00000-of-00001.parquet` or as a `save_to_disk` folder.
"""

import io
import json

import numpy as np
import pytest
import soundfile as sf

from speechlm_jax.data.examples import Audio
from speechlm_jax.evaluation import cascade, voicebench
from speechlm_jax.evaluation import main as eval_main
from speechlm_jax.evaluation.scoring import Scorer, TTSSpeech

# IFEval's kwargs column: one struct per instruction with every checker's argument, None when unused.
_KWARG_FIELDS = ("keywords", "num_words", "relation", "end_phrase")


def _recording(seconds: float, rate: int = 24000, freq: float = 220.0) -> dict:
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), rate, format="FLAC")
    return {"bytes": buffer.getvalue(), "path": "q.flac"}


def _dataset(columns):
    from datasets import Audio, Dataset

    return Dataset.from_dict(columns).cast_column("audio", Audio())


def _mcq_columns(n, offset=0):
    return {
        "audio": [_recording(0.4 + 0.1 * i) for i in range(n)],
        "prompt": [f"which one is right {i + offset}? A. the cat B. the dog C. a tree D. the sun" for i in range(n)],
        "reference": ["ABCD"[(i + offset) % 4] for i in range(n)],
    }


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    from datasets import DatasetDict

    root = tmp_path_factory.mktemp("voicebench")
    (root / "openbookqa").mkdir()
    _dataset(_mcq_columns(3)).to_parquet(str(root / "openbookqa" / "test-00000-of-00001.parquet"))
    DatasetDict({"law": _dataset(_mcq_columns(2)), "physics": _dataset(_mcq_columns(2, offset=5))}).save_to_disk(
        str(root / "mmsu")
    )
    bbh = {
        "audio": [_recording(0.5) for _ in range(3)],
        "prompt": ["is it plausible that he scored", "is the order right (A) or (B)", "do you return"],
        "reference": ["yes", "(B)", "no"],
        "id": ["sports_understanding_0", "hyperbaton_1", "navigate_2"],
    }
    (root / "bbh").mkdir()
    _dataset(bbh).to_parquet(str(root / "bbh" / "test-00000-of-00001.parquet"))
    kwargs = [[{"keywords": ["ocean"]}], [{"num_words": 5.0, "relation": "less than"}, {}]]
    ifeval = {
        "audio": [_recording(0.6), _recording(0.3)],
        "key": [1001, 1002],
        "prompt": ["write about the ocean", "answer in few words without commas"],
        "instruction_id_list": [["keywords:existence"], ["length_constraints:number_words", "punctuation:no_comma"]],
        "kwargs": [[{f: kw.get(f) for f in _KWARG_FIELDS} for kw in row] for row in kwargs],
    }
    _dataset(ifeval).save_to_disk(str(root / "ifeval"))
    return root


def test_each_subset_is_read_in_the_hub_schema(copies):
    obqa = voicebench.read_subset(str(copies / "openbookqa"))
    assert obqa.name == "openbookqa" and len(obqa.items) == 3
    first = obqa.items[0]
    assert first.reference == "A" and first.item.task == "openbookqa" and first.item.prompt == "{content}"
    assert first.item.question.startswith("which one is right 0?")
    # 0.4 s of 24 kHz FLAC, decoded and resampled to 16 kHz int16.
    wave = obqa.waveforms[first.item.audio]
    assert wave.dtype == np.int16 and abs(len(wave) - 6400) <= 2

    mmsu = voicebench.read_subset(f"mmsu={copies / 'mmsu'}", limit=1)
    assert [it.item.task for it in mmsu.items] == ["mmsu/law", "mmsu/physics"]
    assert [it.reference for it in mmsu.items] == ["A", "B"]

    bbh = voicebench.read_subset(str(copies / "bbh"))
    assert [it.item.id for it in bbh.items] == ["bbh/sports_understanding_0", "bbh/hyperbaton_1", "bbh/navigate_2"]

    ifeval = voicebench.read_subset(str(copies / "ifeval"))
    assert ifeval.items[1].instruction_ids == ("length_constraints:number_words", "punctuation:no_comma")
    assert ifeval.items[1].kwargs == ({"num_words": 5, "relation": "less than"}, {})
    assert isinstance(ifeval.items[1].kwargs[0]["num_words"], int)
    assert ifeval.items[0].item.id == "ifeval/1001"


def test_a_bad_copy_fails_naming_file_row_and_column(copies, tmp_path):
    bad = _mcq_columns(2)
    bad["reference"][1] = "E"
    _dataset(bad).to_parquet(str(tmp_path / "test-00000-of-00001.parquet"))
    with pytest.raises(voicebench.VoiceBenchError, match=r"row 1: 'reference' must be one of A-D, got 'E'"):
        voicebench.read_subset(f"openbookqa={tmp_path}")
    broken = _mcq_columns(1)
    broken["audio"][0] = {"bytes": b"not audio at all" * 10, "path": "q.wav"}
    _dataset(broken).save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(voicebench.VoiceBenchError, match=r"broken\[test\] row 0: column 'audio' cannot be used"):
        voicebench.read_subset(f"mmsu={tmp_path / 'broken'}")
    with pytest.raises(voicebench.VoiceBenchError, match=r"needs the columns .* missing \['id'\]"):
        voicebench.read_subset(f"bbh={copies / 'openbookqa'}")
    with pytest.raises(voicebench.VoiceBenchError) as refused:
        voicebench.read_subset(f"sd-qa={tmp_path}")
    # The refusal says why (the scikit-learn and numpy pins) and how to score it elsewhere.
    for reason in ("PEDANT", "scikit-learn==1.3.2", "numpy<2", "cannot load", "qa-metrics==0.2.17", "evaluate.py"):
        assert reason in str(refused.value)
    with pytest.raises(voicebench.VoiceBenchError, match="name the subset as SUBSET=PATH"):
        voicebench.read_subset(str(tmp_path))


@pytest.fixture(scope="module")
def tok(tmp_path_factory, toy_tokenizer):
    return toy_tokenizer(tmp_path_factory.mktemp("tok"))


def test_speech_text_and_cascade_are_scored_by_the_subset_rule(copies, tok, toy_speechlm, toy_downsample, monkeypatch):
    subset = voicebench.read_subset(str(copies / "bbh"))
    speech = voicebench.RecordedSpeech(subset.waveforms, TTSSpeech())
    scorer = Scorer(toy_speechlm(tok), tok, downsample=toy_downsample, speech=speech, batch_size=4, length_multiple=64)
    # A perfect transcript: the cascade must then answer exactly as the text condition does.
    monkeypatch.setattr(cascade, "transcribe", lambda s, waveforms, blank_id: [it.question for it in asked])
    asked = [vb.item for vb in subset.items]
    result = voicebench.run_voicebench(scorer, subset, max_new_tokens=4, blank_id=0)
    assert result["conditions"] == ["text", "speech", "cascade"]
    records = result["items"]
    assert [r["cascade"] for r in records] == [r["text"] for r in records]
    assert records[0]["text"] == scorer.generate_items(asked[:1], "text", max_new_tokens=4)[0]
    for r, vb in zip(records, subset.items):
        for condition in result["conditions"]:
            assert r[f"{condition}_score"] == voicebench.score_response(vb, r[condition])
    overall = result["overall"]
    assert overall["items"] == 3
    assert overall["speech"] == np.mean([r["speech_score"]["correct"] for r in records])
    assert overall["gap"] == overall["text"] - overall["speech"]
    assert overall["cascade_gap"] == overall["cascade"] - overall["speech"]
    assert overall["speech_details"]["fail"] == np.mean([r["speech_score"]["guessed"] for r in records])
    # The speech condition heard the recordings: the student's audio slot is the recording's length.
    segments = scorer.segments(asked[0], spoken=True, response=None)
    slot = next(s for s in segments if isinstance(s, Audio))
    assert len(slot.waveform) == len(subset.waveforms[asked[0].audio])


def test_speechlm_eval_reports_voicebench_for_a_base_llm(copies, tmp_path, toy_tokenizer, save_toy_hf_llama):
    llm = tmp_path / "llm"
    save_toy_hf_llama(llm, toy_tokenizer(llm))  # the tokenizer lives in the checkpoint folder, as on the hub
    result = eval_main.evaluate(
        base=str(llm),
        voicebench=f"{copies / 'openbookqa'},ifeval={copies / 'ifeval'}",
        voicebench_max_new_tokens=3,
        out=str(tmp_path / "out"),
        batch_size=4,
    )
    assert set(result["voicebench"]) == {"openbookqa", "ifeval"}
    assert result["voicebench"]["openbookqa"]["conditions"] == ["text"]
    assert set(result["voicebench"]["ifeval"]["overall"]["text_details"]) == {
        "prompt_strict",
        "instruction_strict",
        "prompt_loose",
        "instruction_loose",
        "score",
    }
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["voicebench"]["openbookqa"]["overall"] == result["voicebench"]["openbookqa"]["overall"]
    assert "## VoiceBench" in (tmp_path / "out" / "report.md").read_text()
    assert eval_main.headline(result)["voicebench/ifeval"]["items"] == 2


def test_speechlm_eval_exits_2_on_a_subset_it_cannot_score(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    assert eval_main.main(["--workdir", str(workdir), "--voicebench", f"sd-qa={tmp_path}"]) == 2
    assert "VoiceBench subset 'sd-qa'" in capsys.readouterr().err


def test_the_report_table_has_a_row_per_subset_and_task_and_every_condition():
    from speechlm_jax.evaluation import report

    def scores(text, speech, cascade, n):
        details = {c: {"score": v, "fail": 0.5} for c, v in (("text", text), ("speech", speech), ("cascade", cascade))}
        out = {"text": text, "speech": speech, "cascade": cascade, "gap": text - speech, "items": n}
        out["cascade_gap"] = cascade - speech
        return out | {f"{c}_details": d for c, d in details.items()}

    section = {
        "mmsu": {"overall": scores(0.75, 0.5, 0.625, 4), "tasks": {"mmsu/law": scores(1.0, 0.5, 0.5, 2)}},
        "bbh": {"overall": scores(0.5, 0.25, 0.5, 4), "tasks": {}},
    }
    lines = report.voicebench_markdown(section)
    header = next(line for line in lines if line.startswith("| subset"))
    assert (
        header
        == "| subset | text | speech | gap | cascade | cascade_gap | text fail | speech fail | cascade fail | items |"
    )
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| subset")]
    assert [r.split(" | ")[0] for r in rows] == ["| **mmsu**", "| mmsu/law", "| **bbh**"]
    assert rows[0] == "| **mmsu** | 0.7500 | 0.5000 | 0.2500 | 0.6250 | 0.1250 | 0.5000 | 0.5000 | 0.5000 | 4 |"
    assert "text fail" not in section["mmsu"]["overall"]  # the report's numbers are left as they are


def test_copies_in_a_bucket_are_read_as_local_ones(copies, gcs_bucket):
    from speechlm_jax import storage

    for subset in ("openbookqa", "mmsu"):
        for file in (copies / subset).rglob("*"):
            if file.is_file():
                storage.write_bytes(f"{gcs_bucket}/vb/{subset}/{file.relative_to(copies / subset)}", file.read_bytes())
    for subset in ("openbookqa", "mmsu"):
        remote = voicebench.read_subset(f"{gcs_bucket}/vb/{subset}")
        local = voicebench.read_subset(str(copies / subset))
        assert [vb.item for vb in remote.items] == [vb.item for vb in local.items]
        assert all(np.array_equal(remote.waveforms[k], w) for k, w in local.waveforms.items())
