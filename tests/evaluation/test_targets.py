"""speechlm-generate: shard files, resume after an interruption, determinism under a seed."""

import json

import pytest

from speechlm_jax.data.sources import TargetTable
from speechlm_jax.data.tasks import get_task
from speechlm_jax.evaluation import targets as generate_cli
from speechlm_jax.toyworld import register_toy_tasks
from speechlm_jax.toyworld.sentences import sentences

TASKS = "first_word,count_words"


@pytest.fixture(scope="module")
def setup(tmp_path_factory, toy_tokenizer, save_toy_hf_llama):
    root = tmp_path_factory.mktemp("gen")
    tok = toy_tokenizer(root / "tok")
    save_toy_hf_llama(root / "llm", tok, initializer_range=0.2)
    manifest = root / "manifest.jsonl"
    with open(manifest, "w") as f:
        for i, text in enumerate(sentences("train", 7, seed=3)):
            f.write(json.dumps({"id": f"utt{i}", "audio": f"utt{i}.flac", "text": text}) + "\n")
    return root, tok


def args(root, out, *extra):
    return [
        "--llm",
        str(root / "llm"),
        "--tokenizer",
        str(root / "tok"),
        "--source",
        f"manifest:{root / 'manifest.jsonl'}",
        "--tasks",
        TASKS,
        "--out",
        str(out),
        "--num_shards",
        "3",
        "--batch_size",
        "4",
        "--max_new_tokens",
        "5",
        "--dtype",
        "float32",
        "--no_progress",
        "--temperature",
        "1.0",
        "--seed",
        "7",
        *extra,
    ]


def generate(argv):
    return generate_cli.run(generate_cli.parse_request(argv))


def read(out):
    return {p.name: p.read_text() for p in sorted(out.glob("targets-*.jsonl"))}


def test_interrupted_and_resumed_run_writes_the_same_targets(setup, tmp_path, monkeypatch):
    root, tok = setup
    summary = generate(args(root, tmp_path / "full"))
    full = read(tmp_path / "full")
    assert sorted(full) == [f"targets-0000{i}-of-00003.jsonl" for i in range(3)]
    assert summary["examples"] == 7 * 2 and summary["generated_tokens"] > 0 and summary["tokens_per_second"] > 0

    rows = [json.loads(line) for text in full.values() for line in text.splitlines()]
    assert [r["id"] for r in rows] == [f"utt{i}" for i in range(7) for _ in range(2)]
    for r in rows:
        assert r["prompt"] in get_task(r["task"]).prompts_train and set(r) == {"id", "task", "prompt", "response"}
    # The pipeline's reader takes the shard files as they are.
    table = TargetTable(tuple(str(p) for p in sorted((tmp_path / "full").glob("targets-*"))))
    assert len(table) == 14

    # Interrupt after the first shard is written, then run again.
    real_write = generate_cli.write_shard
    calls = []

    def interrupted(path, rows):
        if calls:
            raise KeyboardInterrupt
        calls.append(path)
        real_write(path, rows)

    monkeypatch.setattr(generate_cli, "write_shard", interrupted)
    with pytest.raises(KeyboardInterrupt):
        generate(args(root, tmp_path / "resumed"))
    assert len(read(tmp_path / "resumed")) == 1
    monkeypatch.setattr(generate_cli, "write_shard", real_write)
    resumed = generate(args(root, tmp_path / "resumed"))
    assert resumed["shards_skipped"] == 1
    assert read(tmp_path / "resumed") == full

    # A finished run is skipped entirely; another seed samples other answers.
    assert generate(args(root, tmp_path / "resumed"))["shards_skipped"] == 3
    generate(args(root, tmp_path / "other", "--seed", "8"))
    assert read(tmp_path / "other") != full


def test_prompt_choice_is_deterministic_and_distinct():
    register_toy_tasks()
    pool = get_task("first_word").prompts_train
    a = generate_cli.choose_prompts(pool, 3, 0, "utt1", "first_word")
    assert a == generate_cli.choose_prompts(pool, 3, 0, "utt1", "first_word") and len(set(a)) == 3
    assert generate_cli.choose_prompts(pool, 0, 0, "utt1", "first_word") == list(pool)
    assert [generate_cli.shard_bounds(7, i, 3) for i in range(3)] == [(0, 2), (2, 4), (4, 7)]
    hosts = [generate_cli.host_shards(5, i, 2) for i in range(2)]
    assert hosts == [[0, 2, 4], [1, 3]]
