"""Sources: manifests, LibriSpeech folders, text-only JSONL and teacher targets."""

from __future__ import annotations

import json

from speechlm_jax.data.mixture import ConcatSource
from speechlm_jax.data.sources import TargetTable, librispeech_source, manifest_source, read_text_corpus, text_source


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_manifest_resolves_paths_and_counts_bad_lines(tmp_path):
    words = [{"w": "hi", "start": 0.1, "end": 0.4}]
    manifest = _write_jsonl(
        tmp_path / "m.jsonl",
        [
            {
                "id": "a",
                "audio": "wav/a.flac",
                "text": "hi",
                "words": words,
                "speaker": "s1",
                "duration": 0.5,
            },
            {"audio": "/abs/b.wav", "text": "there", "question": "q?", "answer": "x"},
            "{not json",
            {"text": "no audio"},
            "[1, 2]",
            "",
            {"audio": "wav/c.flac"},
            {"audio": "wav/d.flac", "text": ["not", "a", "string"]},
        ],
    )
    source = manifest_source(manifest)
    assert len(source) == 2
    assert source[0] == {
        "id": "a",
        "audio": str(tmp_path / "wav/a.flac"),
        "text": "hi",
        "words": words,
        "speaker": "s1",
        "duration": 0.5,
    }
    assert source[1]["id"] == "b" and source[1]["audio"] == "/abs/b.wav" and source[1]["words"] is None
    assert source[1]["question"] == "q?" and source[1]["answer"] == "x"
    assert source.skipped == {"bad_json": 2, "bad_record": 2, "no_transcript": 1}


def test_librispeech_layout(tmp_path):
    chapter = tmp_path / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("19-198-0001 HELLO WORLD\n19-198-0000 THE CAT\n\n19-198-0002\n")
    other = tmp_path / "103" / "1240"
    other.mkdir(parents=True)
    (other / "103-1240.trans.txt").write_text("103-1240-0000 A B C\n")
    source = librispeech_source(tmp_path)
    assert [r["id"] for r in source.records] == ["103-1240-0000", "19-198-0000", "19-198-0001", "19-198-0002"]
    assert source[1] == {
        "id": "19-198-0000",
        "audio": str(chapter / "19-198-0000.flac"),
        "text": "THE CAT",
        "words": None,
        "speaker": "19",
        "duration": None,
    }
    assert source[3]["text"] == ""  # kept here, skipped and counted by the pipeline
    assert source.skipped == {}


def test_librispeech_audio_without_a_transcript_line_is_counted(tmp_path):
    chapter = tmp_path / "19" / "198"
    chapter.mkdir(parents=True)
    (chapter / "19-198.trans.txt").write_text("19-198-0000 THE CAT\n19-198-0001 A DOG\n")
    for name in ("19-198-0000", "19-198-0002", "19-198-0003"):  # 0001 has a line but no file
        (chapter / f"{name}.flac").write_bytes(b"")
    lone = tmp_path / "19" / "200"  # a chapter without its transcript file
    lone.mkdir()
    (lone / "19-200-0000.flac").write_bytes(b"")
    source = librispeech_source(tmp_path)
    assert [r["id"] for r in source.records] == ["19-198-0000", "19-198-0001"]
    assert source.skipped == {"no_transcript": 3}


def test_text_source_formats(tmp_path):
    path = _write_jsonl(
        tmp_path / "t.jsonl",
        [
            {"instruction": "Say hi.", "response": "hi"},
            {"instruction": "Add.", "input": "1 + 1", "response": "2", "id": "sum"},
            {
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Yes?"},
                    {"role": "assistant", "content": "No."},
                ]
            },
            {"messages": [{"role": "user", "content": "no answer"}]},
            {"instruction": "missing response"},
        ],
    )
    source = text_source(path)
    assert len(source) == 3 and source.skipped == {"bad_record": 2}
    assert source[0] == {
        "id": "t-0",
        "messages": [{"role": "user", "content": "Say hi."}, {"role": "assistant", "content": "hi"}],
    }
    assert source[1]["id"] == "sum" and source[1]["messages"][0]["content"] == "Add.\n1 + 1"
    assert [m["role"] for m in source[2]["messages"]] == ["system", "user", "assistant"]


def test_targets_and_concat(tmp_path):
    path = _write_jsonl(
        tmp_path / "targets.jsonl",
        [
            {"id": "u1", "task": "continuation", "prompt": "Go on. {content}", "response": "and so on"},
            {"id": "u1", "task": "continuation", "prompt": "More {content}", "response": "more"},
            {"id": "u1", "task": "continuation"},
        ],
    )
    table = TargetTable((path,))
    assert len(table) == 2 and table.skipped == {"bad_target": 1}
    assert table.lookup("u1", "continuation") == {"Go on. {content}": "and so on", "More {content}": "more"}
    assert table.lookup("u2", "continuation") == {}
    a = manifest_source(
        _write_jsonl(tmp_path / "a.jsonl", [{"audio": "1.wav", "text": "one"}, {"audio": "2.wav", "text": "two"}, "x"])
    )
    b = manifest_source(_write_jsonl(tmp_path / "b.jsonl", [{"audio": "3.wav", "text": "three"}, {"audio": "4.wav"}]))
    both = ConcatSource([a, b])
    assert len(both) == 3 and [both[i]["id"] for i in range(3)] == ["1", "2", "3"]
    assert both.skipped == {"bad_json": 1, "no_transcript": 1}


def test_read_text_corpus_lines_and_jsonl(tmp_path):
    plain = tmp_path / "c.txt"
    plain.write_text("the  cat\n\na dog runs\n")
    assert read_text_corpus(plain) == [{"id": "0", "text": "the cat"}, {"id": "2", "text": "a dog runs"}]
