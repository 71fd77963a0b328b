"""speechlm-eval end to end on a base LLM (text upper bound) and its failure on a bad item file."""

import json

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
