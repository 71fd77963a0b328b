"""Item files: valid lines parse; malformed ones fail with the file, line number and field."""

import json

import numpy as np
import pytest
import soundfile as sf

from speechlm_jax.data.tasks import get_task
from speechlm_jax.evaluation.items import ItemFileError, load_items, task_items
from speechlm_jax.toyworld import register_toy_tasks


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_valid_items(tmp_path):
    sf.write(tmp_path / "q2.wav", np.zeros(1600, np.int16), 16000)
    path = write(
        tmp_path / "obqa.jsonl",
        [
            {"question": "which animal says moo", "choices": ["a cow", "a cat"], "answer": 0},
            "",
            {
                "question": "what is two and two",
                "answer": "four",
                "audio": "q2.wav",
                "id": "x",
                "task": "math",
                "prompt": "answer briefly {content}",
                "metric": "contains",
            },
            {"question": "pick one", "choices": ["left", "right", "up"], "answer": "up", "audio": None},
        ],
    )
    a, b, c = load_items(path)
    assert (a.id, a.task, a.answer, a.answer_index, a.multiple_choice, a.audio) == (
        "obqa-1",
        "obqa",
        "a cow",
        0,
        True,
        None,
    )
    assert (b.id, b.task, b.multiple_choice, b.prompt, b.metric) == (
        "x",
        "math",
        False,
        "answer briefly {content}",
        "contains",
    )
    assert b.audio == str(tmp_path / "q2.wav")
    assert (c.id, c.answer_index) == ("obqa-4", 2)


@pytest.mark.parametrize(
    "line, message",
    [
        ({"choices": ["a", "b"], "answer": 0}, "missing field 'question'"),
        ({"question": "q", "choices": ["a", "b"]}, "missing field 'answer'"),
        ({"question": "q", "answer": None}, "missing field 'answer'"),
        ({"question": "", "answer": "a"}, "field 'question' must be a non-empty string"),
        ({"question": "q", "choices": ["a"], "answer": 0}, "field 'choices' must be a list of at least two"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, "answer index 2 is out of range"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "answer 'c' is not one of the choices"),
        ({"question": "q", "answer": "a", "audio": "missing.wav"}, "does not exist"),
        ({"question": "q", "answer": "a", "prompt": "no placeholder"}, "field 'prompt' must contain {content}"),
        ({"question": "q", "answer": "a", "metric": "bleu"}, "field 'metric' must be one of"),
        ('{"question": "q", "answer": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_line_names_its_number_and_field(tmp_path, line, message):
    good = {"question": "fine", "answer": "yes"}
    path = write(tmp_path / "bad.jsonl", [good, good | {"id": "b"}, line])
    with pytest.raises(ItemFileError, match=rf"bad\.jsonl:3: .*{message}") as info:
        load_items(path)
    assert info.value.line == 3


def _unusable_audio(folder, kind):
    path = folder / f"{kind}.flac"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(np.random.default_rng(0).bytes(2048))
    else:  # the header intact, the stream cut halfway
        sf.write(path, np.random.default_rng(1).integers(-8000, 8000, 16000).astype(np.int16), 16000)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


@pytest.mark.parametrize("kind, reason", [("empty", "empty file"), ("random", "cannot decode"), ("cut", "truncated")])
def test_item_audio_that_exists_but_cannot_be_decoded_names_the_line(tmp_path, kind, reason):
    audio = _unusable_audio(tmp_path, kind)
    good = {"question": "fine", "answer": "yes"}
    path = write(tmp_path / "spoken.jsonl", [good, "", {"question": "q", "answer": "a", "audio": audio.name}])
    with pytest.raises(ItemFileError) as info:
        load_items(path)
    assert info.value.line == 3 and info.value.path == str(path)
    assert str(info.value).startswith(f"{path}:3: audio file {str(audio)!r} cannot be used: {reason}")


def test_duplicate_ids_and_empty_files_fail(tmp_path):
    with pytest.raises(ItemFileError, match=r":2: id 'a' already used on line 1"):
        load_items(write(tmp_path / "dup.jsonl", [{"id": "a", "question": "q", "answer": "x"}] * 2))
    with pytest.raises(ItemFileError, match="no items"):
        load_items(write(tmp_path / "empty.jsonl", [""]))


def test_task_items_use_the_tasks_answers_and_phrasings():
    register_toy_tasks()
    task = get_task("last_word")
    items = task_items(task, ["the dog runs", "a cat sleeps"], prompt_split="heldout", seed=3)
    assert [it.answer for it in items] == ["runs", "sleeps"]
    assert all(it.prompt in task.prompts_heldout and not it.multiple_choice for it in items)
    assert items == task_items(task, ["the dog runs", "a cat sleeps"], prompt_split="heldout", seed=3)
    with pytest.raises(ValueError, match="no answer function"):
        task_items(get_task("continuation"), ["x"], prompt_split="train")
