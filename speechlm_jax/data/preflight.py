"""Before anything is built: every path a run's `config.data` names exists and can be read.

A command that builds data (`speechlm-train`, the step benchmark, `speechlm-select`) calls
`check_sources(config)` first; it reads no audio, loads no model and compiles nothing, so a
missing folder fails in a second with one line naming it, not minutes later as whatever
error the first reader of that path happens to raise (a tokenizer folder that does not
exist used to read as a Hugging Face hub error). A Hugging Face dataset source is opened as far
as its schemas, so a missing audio or text column fails here too, naming the file and the
columns it has.

When `config.data.made_by.folder` is set and the missing path lies in it, the message ends
with `config.data.made_by.command`, the command that writes that folder (the `:tiny`
variants name the tiny corpus's builder there).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from speechlm_jax import cli, storage
from speechlm_jax.data import hf_source
from speechlm_jax.data.config import SPEECH_SOURCE_TYPES

# What a Hugging Face tokenizer folder holds (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class DataSourceError(cli.UsageError):
    """A data path of the config that does not exist or cannot be read (a ValueError; exit status 2)."""


def _problem(path: storage.PathLike, kind: str) -> str | None:
    """Why `path` (local or in an object store) cannot serve as a `kind` ("file" or "folder"), or
    None when it can."""
    if problem := storage.path_problem(path):
        return problem
    path = storage.path(path)
    if not path.exists():
        return f"{path} does not exist"
    if kind == "folder" and not path.is_dir():
        return f"{path} is not a folder"
    if kind == "file" and not path.is_file():
        return f"{path} is not a file"
    if not storage.is_remote(path) and not os.access(path, os.R_OK | (os.X_OK if kind == "folder" else 0)):
        return f"{path} is not readable"
    return None


def tokenizer_problem(path: str | os.PathLike) -> str | None:
    """Why `path` is not a tokenizer folder, or None when it is one."""
    problem = _problem(path, "folder")
    folder = storage.path(path) if problem is None else None
    if problem is None and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        problem = f"{folder} holds no tokenizer ({', '.join(TOKENIZER_FILES)})"
    return problem


def _speech_kind(spec: Mapping[str, Any]) -> str:
    # Manifests are files; LibriSpeech and prepared TFDS datasets are folders; a Hugging Face
    # source is a folder, a file or a glob, checked with its columns (`_hf_problems`).
    kind = spec.get("type")
    return "file" if kind in ("manifest", "lhotse", "nemo") else "hf" if kind == "hf" else "folder"


def _speech_keys(config: Any) -> tuple[str, ...]:
    # The held-out sources count only when the run evaluates.
    train = config.get("train")
    evaluates = train is None or bool(train.get("eval_every", 1))
    return ("speech_sources", "eval_speech_sources") if evaluates else ("speech_sources",)


def _hf_problems(config: Any) -> Iterator[tuple[str, str, str]]:
    """(key, path, problem) for each speech source of an unknown type and each `hf` source whose
    files or columns cannot be read (schemas only: no rows are read)."""
    for key in _speech_keys(config):
        for i, spec in enumerate(config.data.get(key) or ()):
            name = f"data.{key}[{i}] ({spec.get('type')})"
            if spec.get("type") not in SPEECH_SOURCE_TYPES:
                yield name, str(spec.get("path")), f"unknown source type (types: {', '.join(SPEECH_SOURCE_TYPES)})"
            elif spec.get("type") == "hf":
                if problem := storage.path_problem(str(spec["path"])):
                    yield name, str(spec["path"]), problem
                    continue
                try:
                    hf_source.check_source(dict(spec))
                except (OSError, ValueError, KeyError) as e:  # HFSourceError, or a file pyarrow cannot read
                    yield (
                        name,
                        str(spec["path"]),
                        str(e) if isinstance(e, hf_source.HFSourceError) else f"cannot read: {e}",
                    )


def data_paths(config: Any) -> Iterator[tuple[str, str, str]]:
    """(config key, path, "file" | "folder" | "tokenizer") for every path of `config.data` the run reads.

    The held-out sources count only when the run evaluates (`train.eval_every` > 0).
    """
    data = config.data
    if data.get("tokenizer"):
        yield "data.tokenizer", str(data.tokenizer), "tokenizer"
    train = config.get("train")
    evaluates = train is None or bool(train.get("eval_every", 1))
    for key in ("speech_sources", "eval_speech_sources") if evaluates else ("speech_sources",):
        for i, spec in enumerate(data.get(key) or ()):
            yield f"data.{key}[{i}] ({spec.get('type')})", str(spec["path"]), _speech_kind(spec)
    files = ("text_sources", "conversation_sources", "targets")
    for key in files + ("eval_conversation_sources",) if evaluates else files:
        for i, path in enumerate(data.get(key) or ()):
            yield f"data.{key}[{i}]", str(path), "file"


def _made_by(config: Any, path: str) -> str:
    made_by = config.data.get("made_by")
    if not made_by or not made_by.get("folder") or not made_by.get("command"):
        return ""
    if storage.is_remote(path) or storage.is_remote(made_by.folder):
        return ""
    folder = Path(made_by.folder).absolute()
    target = Path(path).absolute()
    if target != folder and folder not in target.parents:
        return ""
    return f"; `{made_by.command}` writes {made_by.folder}"


def check_sources(config: Any) -> None:
    """Raises DataSourceError, in one line, naming the first path of `config.data` that is
    missing or unreadable (and how many others are), with the command that makes it when known.

    `config` is a run config (an ml_collections ConfigDict with a `data` field).
    """
    problems = []
    for key, path, kind in data_paths(config):
        if kind == "hf":
            continue  # checked with its columns (`_hf_problems`)
        problem = tokenizer_problem(path) if kind == "tokenizer" else _problem(path, kind)
        if problem is not None:
            problems.append((key, path, problem))
    problems += list(_hf_problems(config))
    if not problems:
        return
    key, path, problem = problems[0]
    more = f" (and {len(problems) - 1} more data paths)" if len(problems) > 1 else ""
    raise DataSourceError(f"{key}: {problem}{more}{_made_by(config, path)}")
