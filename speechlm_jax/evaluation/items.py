"""Evaluation items: what a benchmark asks, read from JSONL or drawn from a task registry.

An item is one question asked twice by the gap benchmark, once as text and once as speech:

    {"question": "which animal says moo",          spoken in the speech condition
     "choices": ["a cow", "a cat"] | absent,        multiple choice (scored by option
                                                    log-likelihood) or generative (absent)
     "answer": "a cow" | 0,                         the right choice (text or index) or the
                                                    reference answer of a generative item
     "audio": "wav/q1.flac" | null,                 recorded speech of the question, relative
                                                    to the item file; null: the TTS speaks it
     "task": "obqa", "id": "q1",                    optional (default: the file's stem, stem-line)
     "prompt": "answer this {content}",             optional instruction around the question
     "metric": "exact_match"}                       optional, generative items (see `METRICS`)

so users can bring spoken versions of ARC, OBQA, HellaSwag or MMLU. A malformed line
fails loudly with the file, the line number and what is wrong (`ItemFileError`); an
evaluation must not silently score a different set than the one asked for. Recorded audio
is decoded when the file is read (missing, empty, undecodable or truncated audio is such a
line), so `speechlm-eval` reads its item files before it loads a model.

`task_items` draws generative items from `speechlm_jax.data.tasks.TextTask`s with computable
answers (the toy world), which the prompt and task generalisation benchmark uses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from speechlm_jax import storage
from speechlm_jax.data.audio import AudioError, load_audio
from speechlm_jax.data.tasks import TextTask

METRICS = ("exact_match", "contains", "word_f1")
CONTENT = "{content}"


class ItemFileError(ValueError):
    """A line of an item file that cannot be an item; the message names file and line."""

    def __init__(self, path: str | Path, line: int, message: str):
        super().__init__(f"{path}:{line}: {message}")
        self.path = str(path)
        self.line = line


@dataclasses.dataclass(frozen=True)
class Item:
    """One benchmark question. `choices` is empty for generative items; `answer` is text.

    `prompt` is a template whose `{content}` is where the question goes (as text or speech);
    `audio` an absolute path of recorded speech of `question`, or None (synthesised).
    """

    id: str
    task: str
    question: str
    answer: str
    choices: tuple[str, ...] = ()
    audio: str | None = None
    prompt: str = CONTENT
    metric: str = "exact_match"

    @property
    def multiple_choice(self) -> bool:
        return bool(self.choices)

    @property
    def answer_index(self) -> int:
        """The index of the right choice (multiple-choice items only)."""
        return self.choices.index(self.answer)


def _field(row: dict[str, Any], name: str, path: Path, line: int) -> Any:
    if name not in row or row[name] is None:
        raise ItemFileError(path, line, f"missing field {name!r}")
    return row[name]


def _text(value: Any, name: str, path: Path, line: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ItemFileError(path, line, f"field {name!r} must be a non-empty string, got {value!r}")
    return value


def parse_item(row: Any, path: Path, line: int) -> Item:
    """One parsed JSON line -> Item; raises ItemFileError naming the line and the field."""
    if not isinstance(row, dict):
        raise ItemFileError(path, line, f"expected a JSON object, got {type(row).__name__}")
    question = _text(_field(row, "question", path, line), "question", path, line)
    answer = _field(row, "answer", path, line)
    choices: tuple[str, ...] = ()
    if row.get("choices") is not None:
        raw = row["choices"]
        if not isinstance(raw, list) or len(raw) < 2 or not all(isinstance(c, str) and c.strip() for c in raw):
            raise ItemFileError(path, line, "field 'choices' must be a list of at least two non-empty strings")
        choices = tuple(raw)
        if isinstance(answer, bool) or not isinstance(answer, (int, str)):
            raise ItemFileError(path, line, f"field 'answer' must be a choice or its index, got {answer!r}")
        if isinstance(answer, int):
            if not 0 <= answer < len(choices):
                raise ItemFileError(path, line, f"answer index {answer} is out of range for {len(choices)} choices")
            answer = choices[answer]
        elif answer not in choices:
            raise ItemFileError(path, line, f"answer {answer!r} is not one of the choices")
    else:
        answer = _text(answer, "answer", path, line)
    audio = row.get("audio")
    if audio is not None:
        audio_path = storage.path(storage.beside(path.parent, _text(audio, "audio", path, line)))
        if not audio_path.is_file():
            raise ItemFileError(path, line, f"audio file {str(audio_path)!r} does not exist")
        try:
            load_audio(audio_path)
        except AudioError as e:
            raise ItemFileError(path, line, f"audio file {str(audio_path)!r} cannot be used: {e.reason}") from None
        audio = str(audio_path)
    prompt = row.get("prompt", CONTENT)
    if not isinstance(prompt, str) or prompt.count(CONTENT) != 1:
        raise ItemFileError(path, line, f"field 'prompt' must contain {CONTENT} exactly once, got {prompt!r}")
    metric = row.get("metric", "exact_match")
    if metric not in METRICS:
        raise ItemFileError(path, line, f"field 'metric' must be one of {METRICS}, got {metric!r}")
    return Item(
        id=str(row.get("id", f"{path.stem}-{line}")),
        task=str(row.get("task", path.stem)),
        question=question,
        answer=answer,
        choices=choices,
        audio=audio,
        prompt=prompt,
        metric=metric,
    )


def load_items(path: storage.PathLike) -> list[Item]:
    """Every item of a JSONL file, local or in an object store (blank lines skipped); ItemFileError
    on the first bad line."""
    path = storage.path(path)
    items, seen = [], {}
    with path.open("r", encoding="utf-8") as f:
        for line, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ItemFileError(path, line, f"invalid JSON: {e.msg}") from None
            item = parse_item(row, path, line)
            if item.id in seen:
                raise ItemFileError(path, line, f"id {item.id!r} already used on line {seen[item.id]}")
            seen[item.id] = line
            items.append(item)
    if not items:
        raise ItemFileError(path, 0, "no items")
    return items


def pick(pool: Sequence[str], seed: int, key: str) -> str:
    """A deterministic choice from `pool` for (seed, key): the same on every host and rerun."""
    digest = hashlib.blake2b(f"{seed}|{key}".encode(), digest_size=8).digest()
    return pool[int.from_bytes(digest, "big") % len(pool)]


def task_items(task: TextTask, sentences: Sequence[str], *, prompt_split: str, seed: int = 0) -> list[Item]:
    """Generative items asking `task` about each sentence with a phrasing of `prompt_split`.

    The phrasing of each sentence is `pick`ed from (seed, task, sentence); the answer is
    `task.answer(sentence)`, so the task must have one.
    """
    if task.answer is None:
        raise ValueError(f"task {task.name!r} has no answer function; it cannot be scored")
    pool = task.prompts(prompt_split)
    return [
        Item(
            id=f"{task.name}-{prompt_split}-{i}",
            task=task.name,
            question=sentence,
            answer=task.answer(sentence),
            prompt=pick(pool, seed, f"{task.name}|{sentence}"),
        )
        for i, sentence in enumerate(sentences)
    ]
