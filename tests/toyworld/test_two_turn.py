"""The toy world's two-turn task end to end: conversations over the tiny corpus's speech, the
teacher's answers to every turn (speechlm-generate), and tiny recipes trained on them."""

from __future__ import annotations

import json
import random

import jax
import ml_collections
import numpy as np

from speechlm_jax.data.conversations import conversation_source, turn_key
from speechlm_jax.data.tokenizer import load_tokenizer
from speechlm_jax.evaluation.targets import generate_targets
from speechlm_jax.toyworld.conversations import TWO_TURN, conversation, write_two_turn
from speechlm_jax.toyworld.sentences import parse
from speechlm_jax.toyworld.tasks import all_words
from speechlm_jax.train import trainer


def test_two_turn_conversations_ask_about_the_spoken_sentence():
    assert TWO_TURN.words() <= set(all_words())
    sentence = "two red dogs run in the park"
    parse(sentence)
    seen = set()
    for seed in range(20):
        record = conversation(TWO_TURN, "u0", "/a.wav", sentence, random.Random(seed))
        first, answer, follow_up, second = record["messages"]
        assert [p["type"] for p in first["content"]].count("audio") == 1
        assert first["content"][[p["type"] for p in first["content"]].index("audio")]["transcript"] == sentence
        assert sentence not in follow_up["content"]
        expected = {"what is the last word": "park", "which word comes last": "park", "how many words": "seven"}
        expected |= {"count the words": "seven", "what is the first word": "two", "which word comes first": "two"}
        assert second["content"] == expected[follow_up["content"]]
        seen.add(follow_up["content"])
    assert len(seen) > 3


def _metrics(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def _on_conversations(config, conversations, teacher):
    """The recipe's tiny variant reading only the two-turn conversations, over the teacher LLM."""
    del config.model["llm"]
    config.model.llm = str(teacher)
    config.model.llm_weights = str(teacher)
    config.data.conversation_sources = (str(conversations),)
    config.data.conversation_weight = 1.0 - config.data.text_weight
    config.data.kinds = ml_collections.ConfigDict({"asr": 1.0})
    config.train.log_every = 1
    return config


def test_two_turn_task_trains_on_record_and_teacher_answers(tiny_corpus, tiny_config, save_toy_hf_llama, tmp_path):
    conversations = write_two_turn(tiny_corpus / "train" / "manifest.jsonl", tmp_path / "two_turn.jsonl")
    records = conversation_source(conversations).records
    assert len(records) == 12 and not conversation_source(conversations).skipped
    spoken = [next(p for p in r["conversation"][0]["content"] if p["type"] == "audio") for r in records]
    assert all(len(p["words"]) == len(p["transcript"].split()) for p in spoken)  # timed: MTBI interleaves them
    tok = load_tokenizer(tiny_corpus / "tokenizer")
    for record in records:
        for m in record["conversation"]:
            for p in m["content"]:
                ids = tok.encode(p.get("text", p.get("transcript")))
                assert ids and tok.hf.unk_token_id not in ids
    teacher = save_toy_hf_llama(tmp_path / "teacher", tok, initializer_range=0.2)

    # The teacher answers both turns of every conversation.
    summary = generate_targets(
        llm=str(teacher),
        tokenizer=str(tiny_corpus / "tokenizer"),
        conversations=str(conversations),
        out=str(tmp_path / "targets"),
        num_shards=1,
        batch_size=12,
        max_new_tokens=6,
        dtype="float32",
        no_progress=True,
    )
    assert summary["examples"] == 24
    shard = tmp_path / "targets" / "targets-00000-of-00001.jsonl"
    rows = [json.loads(line) for line in shard.read_text().splitlines()]
    assert {(r["id"], r["prompt"]) for r in rows} == {(r["id"], turn_key(t)) for r in records for t in (1, 3)}

    # MTBI and SALAD on the teacher's answers: imitation of both answers; SALAD's KL on the text
    # positions of both turns, mixed with the NLL.
    for recipe in ("mtbi", "salad"):
        config = _on_conversations(tiny_config(recipe, steps=3), conversations, teacher)
        config.data.conversation_responses = "teacher"
        config.data.targets = (str(shard),)
        result = trainer.train(config, tmp_path / recipe, devices=jax.devices()[:1])
        train = [r for r in _metrics(tmp_path / recipe) if r["split"] == "train"]
        assert result.step == 3 and all(np.isfinite(r["loss"]) for r in train)
        assert train[-1]["data/skipped"] == 0 and train[-1]["data/examples"] >= 3 * config.train.batch_size

    # VoiceTextBlender SFT on the records' answers: the loss falls.
    vtb = _on_conversations(tiny_config("vtb", steps=10), conversations, teacher)
    result = trainer.train(vtb, tmp_path / "vtb", devices=jax.devices()[:1])
    losses = [r["loss"] for r in _metrics(tmp_path / "vtb") if r["split"] == "train"]
    assert result.step == 10 and np.mean(losses[-3:]) < 0.97 * np.mean(losses[:3]), losses
