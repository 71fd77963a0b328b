"""The data preflight: every path of `config.data` checked before anything is built, in one line."""

from __future__ import annotations

import json

import ml_collections
import pytest

from speechlm_jax import cli
from speechlm_jax.data.preflight import DataSourceError, check_sources
from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer


def _config(root, **data) -> ml_collections.ConfigDict:
    """A run config whose data lie in `root`, made (the message says) by `make-data ROOT`."""
    values = dict(
        tokenizer=str(root / "tokenizer"),
        speech_sources=({"type": "manifest", "path": str(root / "train.jsonl")},),
        eval_speech_sources=({"type": "librispeech", "path": str(root / "heldout")},),
        text_sources=(str(root / "text.jsonl"),),
        targets=(str(root / "targets.jsonl"),),
        made_by={"folder": str(root), "command": f"make-data {root}"},
    )
    values.update(data)
    return ml_collections.ConfigDict({"data": values, "train": {"eval_every": 10}})


def _corpus(root):
    build_word_tokenizer(["hello world"], root / "tokenizer")
    (root / "train.jsonl").write_text(json.dumps({"audio": "a.wav", "text": "hello"}) + "\n")
    (root / "heldout").mkdir()
    (root / "text.jsonl").write_text("")
    (root / "targets.jsonl").write_text("")
    return root


def test_a_complete_corpus_passes(tmp_path):
    check_sources(_config(_corpus(tmp_path)))


def test_a_missing_corpus_names_the_tokenizer_folder_and_the_command_that_makes_it(tmp_path):
    root = tmp_path / "never_made"
    with pytest.raises(DataSourceError) as info:
        check_sources(_config(root))
    message = str(info.value)
    assert "\n" not in message
    assert message == (
        f"data.tokenizer: {root / 'tokenizer'} does not exist (and 4 more data paths); `make-data {root}` writes {root}"
    )
    # A usage error: every command reports it in one line with exit status 2.
    assert isinstance(info.value, cli.UsageError) and isinstance(info.value, ValueError)


def _replace_with_folder(path):
    path.unlink()
    path.mkdir()


def _replace_with_file(path):
    path.rmdir()
    path.write_text("")


BREAKS = {
    "manifest": (lambda r: (r / "train.jsonl").unlink(), "data.speech_sources[0] (manifest): {r}/train.jsonl does not"),
    "librispeech": (
        lambda r: (r / "heldout").rmdir(),
        "data.eval_speech_sources[0] (librispeech): {r}/heldout does not",
    ),
    "text": (lambda r: (r / "text.jsonl").unlink(), "data.text_sources[0]: {r}/text.jsonl does not exist"),
    "targets": (lambda r: (r / "targets.jsonl").unlink(), "data.targets[0]: {r}/targets.jsonl does not exist"),
    "tokenizer": (
        lambda r: [f.unlink() for f in (r / "tokenizer").iterdir()],
        "data.tokenizer: {r}/tokenizer holds no tokenizer",
    ),
    "manifest_folder": (lambda r: _replace_with_folder(r / "train.jsonl"), "{r}/train.jsonl is not a file"),
    "librispeech_file": (lambda r: _replace_with_file(r / "heldout"), "{r}/heldout is not a folder"),
}


@pytest.mark.parametrize("name", sorted(BREAKS))
def test_each_missing_path_is_named(tmp_path, name):
    root = _corpus(tmp_path)
    broken, expected = BREAKS[name]
    broken(root)
    with pytest.raises(DataSourceError) as info:
        check_sources(_config(root))
    assert expected.format(r=root) in str(info.value)
    assert str(info.value).endswith(f"; `make-data {root}` writes {root}")


def test_the_command_is_named_only_for_paths_in_its_folder(tmp_path):
    root = _corpus(tmp_path / "corpus")
    elsewhere = tmp_path / "elsewhere" / "train.jsonl"
    config = _config(root, speech_sources=({"type": "manifest", "path": str(elsewhere)},))
    with pytest.raises(DataSourceError) as info:
        check_sources(config)
    assert str(info.value) == f"data.speech_sources[0] (manifest): {elsewhere} does not exist"


def test_held_out_sources_count_only_when_the_run_evaluates(tmp_path):
    root = _corpus(tmp_path)
    (root / "heldout").rmdir()
    config = _config(root)
    config.train.eval_every = 0
    check_sources(config)
    config.train.eval_every = 5
    with pytest.raises(DataSourceError, match="eval_speech_sources"):
        check_sources(config)


def test_load_tokenizer_refuses_a_folder_that_is_not_there(tmp_path):
    # A Hugging Face client would read the path as a hub repo id and complain about its form.
    missing = tmp_path / "corpus" / "tokenizer"
    with pytest.raises(DataSourceError, match=f"^tokenizer: {missing} does not exist$"):
        load_tokenizer(missing)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSourceError, match="holds no tokenizer"):
        load_tokenizer(tmp_path / "empty")
    assert len(load_tokenizer(build_word_tokenizer(["hello world"], tmp_path / "tok"))) > 0


def test_an_unsupported_url_scheme_is_refused_not_read_as_a_local_folder(tmp_path):
    config = _config(_corpus(tmp_path), speech_sources=({"type": "manifest", "path": "ftp://host/train.jsonl"},))
    with pytest.raises(
        DataSourceError,
        match=r"data.speech_sources\[0\] \(manifest\): 'ftp://host/train.jsonl': the ftp:// scheme is not supported",
    ):
        check_sources(config)
