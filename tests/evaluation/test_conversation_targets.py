"""speechlm-generate --conversations: the teacher answers every assistant turn as a rollout,
checked against transformers' own greedy decoding of the chat-template prompt."""

import json

import pytest
import torch
import transformers

from speechlm_jax.data.conversations import conversation_source, turn_key
from speechlm_jax.data.sources import TargetTable
from speechlm_jax.evaluation import targets as generate_cli
from speechlm_jax.toyworld.sentences import sentences

MAX_NEW = 4


def _conversation(i: int, sentence: str) -> dict:
    first = {
        "role": "user",
        "content": [
            {"type": "text", "text": "what is the first word of"},
            {"type": "audio", "audio": f"wav/{i}.wav", "transcript": sentence},
        ],
    }
    messages = [first, {"role": "assistant", "content": sentence.split()[0]}]
    if i % 2 == 0:  # every other conversation has a text follow-up
        messages += [
            {"role": "user", "content": "what is the last word"},
            {"role": "assistant", "content": sentence.split()[-1]},
        ]
    return {"id": f"c{i}", "messages": messages}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, toy_tokenizer, save_toy_hf_llama):
    root = tmp_path_factory.mktemp("conv_gen")
    tok = toy_tokenizer(root / "tok")
    save_toy_hf_llama(root / "llm", tok, initializer_range=0.2)
    path = root / "conversations.jsonl"
    path.write_text(
        "".join(json.dumps(_conversation(i, s)) + "\n" for i, s in enumerate(sentences("train", 5, seed=2)))
    )
    return root, tok, path


def _reference_answer(model, tok, messages) -> str:
    """transformers' greedy answer to the conversation so far, through the tokenizer's chat template."""
    text = tok.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tok.encode(text)])
    out = model.generate(
        ids, max_new_tokens=MAX_NEW, do_sample=False, eos_token_id=list(tok.stop_ids), pad_token_id=tok.pad_id
    )
    new = out[0, ids.shape[1] :].tolist()
    if new and new[-1] in tok.stop_ids:
        new = new[:-1]
    return tok.decode(new).strip()


def test_every_assistant_turn_is_answered_by_the_teacher_given_its_own_earlier_answers(setup, tmp_path):
    root, tok, path = setup
    summary = generate_cli.generate_targets(
        llm=str(root / "llm"),
        tokenizer=str(root / "tok"),
        conversations=str(path),
        out=str(tmp_path),
        num_shards=2,
        batch_size=4,
        max_new_tokens=MAX_NEW,
        dtype="float32",
        no_progress=True,
    )
    assert summary["examples"] == 5 + 3 and summary["generated_tokens"] > 0
    rows = [json.loads(line) for p in sorted(tmp_path.glob("targets-*.jsonl")) for line in p.read_text().splitlines()]
    assert [(r["id"], r["prompt"]) for r in rows] == [
        (f"c{i}", turn_key(t)) for i in range(5) for t in ((1, 3) if i % 2 == 0 else (1,))
    ]
    assert {r["task"] for r in rows} == {"conversation"}
    table = TargetTable(tuple(str(p) for p in sorted(tmp_path.glob("targets-*.jsonl"))))
    assert len(table) == len(rows)

    model = transformers.AutoModelForCausalLM.from_pretrained(root / "llm", torch_dtype=torch.float32).eval()
    answers = {(r["id"], r["prompt"]): r["response"] for r in rows}
    for record in conversation_source(path).records:
        twin = []
        for i, m in enumerate(record["conversation"]):
            if m["role"] == "assistant":
                expected = _reference_answer(model, tok, twin)
                assert answers[record["id"], turn_key(i)] == expected
                twin.append({"role": "assistant", "content": expected})  # the teacher's own answer
            else:
                content = " ".join(p.get("text", p.get("transcript")) for p in m["content"])
                twin.append({"role": m["role"], "content": content})
    # A random teacher does not just echo the record: the rollout differs from teacher forcing somewhere.
    assert any(answers[f"c{i}", turn_key(1)] != s.split()[0] for i, s in enumerate(sentences("train", 5, seed=2)))


def test_source_or_conversations_is_required(setup, tmp_path):
    root, _, path = setup
    request = generate_cli.parse_request(["--llm", str(root / "llm"), "--conversations", str(path), "--out", "o"])
    assert request.conversations == (str(path),) and request.source is None and request.tasks == ()
    with pytest.raises(generate_cli.cli.UsageError, match="--conversations"):
        generate_cli.generate_targets(llm=str(root / "llm"), out=str(tmp_path))
    with pytest.raises(generate_cli.cli.UsageError, match="--source"):
        generate_cli.generate_targets(llm=str(root / "llm"), out=str(tmp_path), tasks="repeat", conversations="x")
