"""speechlm-eval end to end on a base LLM (text upper bound) and its failure on a bad item file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from speechlm_jax.evaluation import main as eval_main


@pytest.fixture(scope="module")
def base(tmp_path_factory, toy_tokenizer, save_toy_hf_llama):
    root = tmp_path_factory.mktemp("base")
    tok = toy_tokenizer(root / "llm")  # the tokenizer lives in the checkpoint folder, as on the hub
    save_toy_hf_llama(root / "llm", tok)
    return root


def test_base_llm_text_upper_bound_report(base, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text(
        "\n".join(
            json.dumps(row)
            for row in [
                {
                    "question": "the dog runs",
                    "choices": ["yes", "no"],
                    "answer": "yes",
                    "prompt": "is there a place in {content}",
                },
                {"question": "a cat sleeps in the barn", "choices": ["yes", "no"], "answer": 0, "task": "has_place"},
                {
                    "question": "the dog runs",
                    "answer": "runs",
                    "prompt": "what is the last word of {content}",
                    "task": "last_word",
                },
            ]
        )
        + "\n"
    )
    result = eval_main.run(
        eval_main.parse_request(
            [
                "--base",
                str(base / "llm"),
                "--items",
                str(items),
                "--out",
                str(tmp_path / "out"),
                "--batch_size",
                "4",
                "--max_new_tokens",
                "3",
            ]
        )
    )
    assert result["gap"]["conditions"] == ["text"] and result["gap"]["overall"]["items"] == 3
    assert set(result["gap"]["tasks"]) == {"items", "has_place", "last_word"}
    assert "retention" not in result and "diagnostics" not in result
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["gap"]["overall"] == result["gap"]["overall"]
    assert "## Text-speech gap" in (tmp_path / "out" / "report.md").read_text()
    assert eval_main.headline(result)["gap"]["items"] == 3


def test_malformed_item_file_exits_with_the_line(base, tmp_path, capsys):
    items = tmp_path / "bad.jsonl"
    items.write_text('{"question": "q", "answer": "a"}\n{"question": "q2", "choices": ["a", "b"]}\n')
    assert eval_main.main(["--base", str(base / "llm"), "--items", str(items), "--out", str(tmp_path / "out")]) == 2
    assert "bad.jsonl:2: missing field 'answer'" in capsys.readouterr().err


def _run_with_a_broken_recording(tmp_path):
    """A workdir (its config.json only) and an item file whose line 2 has an empty recording."""
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_text("{}")
    (tmp_path / "q2.wav").write_bytes(b"")
    items = tmp_path / "spoken.jsonl"
    items.write_text(
        json.dumps({"question": "the dog runs", "answer": "runs"})
        + "\n"
        + json.dumps({"question": "a cat sleeps", "answer": "sleeps", "audio": "q2.wav"})
        + "\n"
    )
    return workdir, items


def test_item_files_are_read_before_the_model_loads(tmp_path, monkeypatch):
    workdir, items = _run_with_a_broken_recording(tmp_path)

    def load_run(*args, **kwargs):
        raise AssertionError("the model was loaded before the item files were read")

    monkeypatch.setattr(eval_main, "load_run", load_run)
    request = eval_main.EvalRequest(workdir=str(workdir), items=(str(items),))
    with pytest.raises(eval_main.items.ItemFileError, match=r"spoken\.jsonl:2: audio file .*q2\.wav.* empty file"):
        eval_main.run(request)


def test_speechlm_eval_exits_2_on_an_empty_recording_naming_file_and_line(tmp_path):
    # The workdir holds no model at all: only an item check made before loading one can say this.
    workdir, items = _run_with_a_broken_recording(tmp_path)
    repo = Path(__file__).resolve().parents[2]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(repo), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JAX_PLATFORMS="cpu",
    )
    result = subprocess.run(
        [sys.executable, "-m", "speechlm_jax.evaluation.main", "--workdir", str(workdir), "--items", str(items)],
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert lines == [f"speechlm-eval: {items}:2: audio file {str(tmp_path / 'q2.wav')!r} cannot be used: empty file"]
    assert not (workdir / "report.json").exists()


def test_asr_refuses_a_source_of_segments_instead_of_scoring_whole_recordings(tmp_path):
    import numpy as np

    from speechlm_jax.data.audio import save_audio

    save_audio(tmp_path / "session.flac", np.zeros(32000, np.int16))
    line = {"audio_filepath": "session.flac", "offset": 1.0, "duration": 0.5, "text": "hello"}
    (tmp_path / "nemo.json").write_text(json.dumps(line) + "\n")
    request = eval_main.EvalRequest(
        base="llm", asr=True, asr_source={"type": "nemo", "path": str(tmp_path / "nemo.json")}
    )
    with pytest.raises(eval_main.cli.UsageError, match="--asr scores whole audio files; the nemo source .*nemo.json"):
        eval_main._asr_records(request, None)
