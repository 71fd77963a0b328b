"""Every `speechlm-*` console command as a user runs it: a subprocess of the installed script.

Each command prints its usage for `--help` (exit status 0), reports a user error in one line
on standard error without a traceback (exit status 2), and, where a run is cheap, succeeds
with exit status 0. The commands come from setup.py, so a new one without a case here fails.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def console_scripts() -> dict[str, str]:
    """name -> "module:function", as setup.py declares them."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "console_scripts":
                    return dict(item.value.split("=", 1) for item in value.elts)
    raise AssertionError("setup.py declares no console_scripts")


SCRIPTS = console_scripts()


def command(name: str) -> list[str]:
    """The installed script next to this Python when it runs setup.py's entry point (an install
    from an older checkout may not), else what such a script runs."""
    module, function = SCRIPTS[name].split(":")
    installed = shutil.which(name, path=str(Path(sys.executable).parent))
    if installed and f"from {module} import {function}" in Path(installed).read_text(errors="replace"):
        return [installed]
    return [sys.executable, "-c", f"import sys; from {module} import {function}; sys.exit({function}())"]


def run(name: str, *args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return subprocess.run([*command(name), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def assert_user_error(result: subprocess.CompletedProcess, name: str, *fragments: str) -> None:
    """Exit status 2 and one line on standard error, from the command, naming the problem."""
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(name.split()[0]), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_setup_declares_the_commands_tested_here():
    assert set(SCRIPTS) == {name for name, *_ in USER_ERRORS}


def test_entry_points_import_together_in_one_process():
    """No command keeps global flag state: every entry point imports beside the others."""
    import importlib

    for name, target in SCRIPTS.items():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), name


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_help_prints_usage(name):
    result = run(name, "--help")
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: {name}"), result.stdout[:500]


# (command, arguments, what the error line names); arguments may use {tmp}.
USER_ERRORS = [
    (
        "speechlm-train",
        ["--config", "{tmp}/missing.py:tiny", "--workdir", "{tmp}/run"],
        ["missing.py", "does not exist"],
    ),
    (
        "speechlm-train",
        ["--config", "configs/asr.py:tiny", "--config.train.batch_sise=4", "--workdir", "{tmp}/run"],
        ["train.batch_sise", "nearest valid keys: train.batch_size"],
    ),
    (
        "speechlm-train",
        ["--config", "configs/asr.py:tiny", "--config.train.steps=many", "--workdir", "{tmp}/run"],
        ["--config.train.steps=many", "not an int"],
    ),
    ("speechlm-train", ["--config", "configs/asr.py:tiny"], ["--workdir"]),
    (
        "speechlm-compile",
        ["--config", "configs/asr.py:tiny", "--config.model.lora.rnak=4", "--topology", "v5p-8"],
        ["model.lora.rank"],
    ),
    ("speechlm-compile", ["--config", "configs/asr.py:tiny"], ["--topology"]),
    ("speechlm-eval", ["--base", "{tmp}/no_llm", "--out", "{tmp}/out"], ["{tmp}/no_llm"]),
    ("speechlm-eval", ["--out", "{tmp}/out"], ["--workdir", "--base"]),
    ("speechlm-generate", ["--source", "manifest:{tmp}/m.jsonl", "--tasks", "repeat", "--out", "{tmp}/out"], ["--llm"]),
    (
        "speechlm-generate",
        ["--llm", "{tmp}", "--source", "nothing:{tmp}", "--tasks", "repeat", "--out", "{tmp}/out"],
        ["--source", "TYPE:PATH"],
    ),
    ("speechlm-convert", ["export", "--workdir", "{tmp}/nothing", "--out", "{tmp}/out"], ["not a trainer workdir"]),
    ("speechlm-convert", [], ["command"]),
    ("speechlm-select", ["report", "--workdir", "{tmp}/sel"], ["run the sample stage first"]),
    ("speechlm-select", ["polish", "--workdir", "{tmp}/sel"], ["polish"]),
    ("speechlm-demo", ["--out", "{tmp}/demo", "--recipes", "asr,bogus"], ["unknown recipes ['bogus']"]),
    ("speechlm-demo", ["--out", "{tmp}/demo", "--wait"], ["--wait: only with --only"]),
    (
        "speechlm-demo",
        ["--out", "{tmp}/demo", "--only", "teacher"],
        ["--only teacher", "stage corpus, which is not built"],
    ),
    ("speechlm-synth", ["--input", "{tmp}/missing.txt", "--out", "{tmp}/out"], ["missing.txt"]),
    (
        "speechlm-synth",
        ["--input", "{tmp}/missing.txt", "--out", "{tmp}/out", "--rates", "fast"],
        ["--rates", "'fast'"],
    ),
]


@pytest.mark.parametrize(
    "name, args, fragments", USER_ERRORS, ids=[f"{n}-{i}" for i, (n, *_) in enumerate(USER_ERRORS)]
)
def test_user_error_is_one_line_with_exit_status_2(name, args, fragments, tmp_path):
    result = run(name, *(a.format(tmp=tmp_path) for a in args))
    assert_user_error(result, name, *(f.format(tmp=tmp_path) for f in fragments))
    assert not (tmp_path / "run" / "config.json").exists() and not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory, toy_tokenizer, save_toy_hf_llama) -> Path:
    """A random 2-layer Llama saved by transformers, its word tokenizer in the same folder."""
    folder = tmp_path_factory.mktemp("cli_llm") / "llm"
    return save_toy_hf_llama(folder, toy_tokenizer(folder))


def test_eval_of_a_base_llm_succeeds(tiny_llm, tmp_path):
    items = tmp_path / "items.jsonl"
    items.write_text(
        json.dumps(
            {
                "question": "the dog runs",
                "choices": ["yes", "no"],
                "answer": "yes",
                "prompt": "is there a place in {content}",
            }
        )
        + "\n"
    )
    result = run(
        "speechlm-eval",
        "--base",
        str(tiny_llm),
        "--items",
        str(items),
        "--out",
        str(tmp_path / "out"),
        "--batch_size",
        "8",
        "--max_new_tokens",
        "2",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["speechlm_eval"]["gap"]["items"] == 1
    assert (tmp_path / "out" / "report.json").is_file()


def test_eval_of_a_malformed_item_file_is_a_user_error(tiny_llm, tmp_path):
    items = tmp_path / "bad.jsonl"
    items.write_text('{"question": "q"}\n')
    result = run("speechlm-eval", "--base", str(tiny_llm), "--items", str(items), "--out", str(tmp_path / "out"))
    assert_user_error(result, "speechlm-eval", "bad.jsonl:1")


def test_generate_targets_succeeds(tiny_llm, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(
        "".join(
            json.dumps({"id": f"u{i}", "audio": f"u{i}.flac", "text": t}) + "\n"
            for i, t in enumerate(["the dog runs", "a cat sleeps"])
        )
    )
    result = run(
        "speechlm-generate",
        "--llm",
        str(tiny_llm),
        "--source",
        f"manifest:{manifest}",
        "--tasks",
        "first_word",
        "--task_modules",
        "speechlm_jax.toyworld.tasks",
        "--out",
        str(tmp_path / "targets"),
        "--num_shards",
        "1",
        "--batch_size",
        "8",
        "--max_new_tokens",
        "2",
        "--dtype",
        "float32",
        "--no_progress",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["speechlm_generate"]["examples"] == 2
    assert (tmp_path / "targets" / "targets-00000-of-00001.jsonl").is_file()


def test_generate_with_an_unknown_task_is_a_user_error(tiny_llm, tmp_path):
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text(json.dumps({"id": "u0", "audio": "u0.flac", "text": "the dog runs"}) + "\n")
    result = run(
        "speechlm-generate",
        "--llm",
        str(tiny_llm),
        "--source",
        f"manifest:{manifest}",
        "--tasks",
        "no_such_task",
        "--out",
        str(tmp_path / "targets"),
    )
    assert_user_error(result, "speechlm-generate", "no_such_task")


def test_synth_of_two_words_succeeds(tmp_path):
    texts = tmp_path / "texts.txt"
    texts.write_text("hello world\n")
    result = run(
        "speechlm-synth",
        "--input",
        str(texts),
        "--out",
        str(tmp_path / "corpus"),
        "--voices",
        "en-us",
        "--rates",
        "175",
        "--pitches",
        "50",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "1 synthesized" in result.stdout
    assert len((tmp_path / "corpus" / "manifest.jsonl").read_text().splitlines()) == 1


def test_train_succeeds_with_exit_status_0(tiny_corpus, compilation_cache, tmp_path):
    result = run(
        "speechlm-train",
        "--config",
        f"configs/asr.py:tiny,data_dir={tiny_corpus}",
        "--workdir",
        str(tmp_path / "run"),
        "--config.train.steps=1",
        "--config.train.eval_every=0",
        "--config.train.progress_bar=False",
        "--config.train.fast_compile=True",
        f"--config.train.compilation_cache={compilation_cache}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "finished at step 1 (done)" in result.stderr
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()


@pytest.mark.parametrize("name", ["speechlm-train", "speechlm-compile"])
def test_an_internal_error_exits_1_with_its_traceback(name, tmp_path):
    """A bug (here: a config file that raises something other than a bad value) is not a user error."""
    config = tmp_path / "broken.py"
    config.write_text("def get_config(arg=None):\n    raise RuntimeError('the config module is broken')\n")
    extra = ["--workdir", str(tmp_path / "run")] if name == "speechlm-train" else ["--topology", "v5p-8"]
    result = run(name, "--config", f"{config}:tiny", *extra)
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "Traceback" in result.stderr and "RuntimeError: the config module is broken" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "name, args, scheme",
    [
        ("speechlm-train", ["--config", f"{REPO}/configs/asr.py:tiny", "--workdir", "ftp://host/runs/asr"], "ftp"),
        ("speechlm-eval", ["--base", "{tmp}", "--out", "hdfs://host/eval"], "hdfs"),
        ("speechlm-convert", ["export", "--workdir", "{tmp}", "--out", "az://container/hf"], "az"),
    ],
)
def test_an_unsupported_url_scheme_is_refused_and_no_local_folder_is_made(name, args, scheme, tmp_path):
    result = run(name, *(a.format(tmp=tmp_path) for a in args), cwd=tmp_path)
    assert_user_error(result, name, f"the {scheme}:// scheme is not supported (object stores: gs://")
    assert not any(p.name.endswith(":") for p in tmp_path.iterdir())
