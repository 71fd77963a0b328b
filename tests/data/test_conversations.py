"""Multi-turn conversations: the schema, the chat template around every turn, the loss on every
assistant turn, the KL alignment, bad lines, and the pipeline."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from speechlm_jax.data.config import PipelineConfig
from speechlm_jax.data.conversations import (
    conversation_segments,
    conversation_source,
    parse_conversation,
    turn_key,
)
from speechlm_jax.data.examples import Audio, build_example
from speechlm_jax.data.pipeline import build_pipeline

SILENCE = np.zeros(8000, np.int16)  # half a second: several audio frames at downsample 4

# Both user turns mix spoken and text parts (VoiceTextBlender's mixed-modal input).
RECORD = {
    "id": "c1",
    "messages": [
        {"role": "system", "content": "Answer the question ."},
        {
            "role": "user",
            "content": [
                {"type": "audio", "audio": "wav/a.wav", "transcript": "the cat sat on the mat"},
                {"type": "text", "text": "What is said ?"},
            ],
        },
        {"role": "assistant", "content": "the cat sat on the mat"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Repeat the words , please :"},
                {"type": "audio", "audio": "/abs/b.wav", "transcript": "hello world"},
            ],
        },
        {"role": "assistant", "content": "hello world"},
    ],
}


def _twin_messages(messages):
    """The conversation as text: every part joined by spaces, audio parts by their transcript."""
    return [
        {"role": m["role"], "content": " ".join(p.get("text", p.get("transcript")) for p in m["content"])}
        for m in messages
    ]


def _spoken(part, lead_space):
    return [Audio(SILENCE, (" " if lead_space else "") + part["transcript"])]


def _assistant_spans(rendered: str, messages, end_of_turn: str) -> list[tuple[int, int]]:
    """Character spans of each assistant content and the end-of-turn token after it, found in the
    template's own rendering of the conversation."""
    spans, at = [], 0
    for m in messages:
        content = m["content"]
        at = rendered.index(content, at)
        if m["role"] == "assistant":
            assert rendered.startswith(end_of_turn, at + len(content))
            spans.append((at, at + len(content) + len(end_of_turn)))
        at += len(content)
    return spans


@pytest.fixture(params=["llama3", "qwen", "word"])
def tokenizer(request):
    return request.getfixturevalue(f"{request.param}_tokenizer")


def test_every_assistant_turn_is_supervised_through_the_template(tokenizer):
    messages = parse_conversation(RECORD, folder="/data")
    assert messages[1]["content"][0]["audio"] == "/data/wav/a.wav"
    example = build_example(conversation_segments(tokenizer, messages, spoken=_spoken), tokenizer, downsample=4)
    assert len(example.audio) == 2

    twin = _twin_messages(messages)
    rendered = tokenizer.hf.apply_chat_template(twin, tokenize=False)
    # The teacher reads exactly the template's tokens of the conversation as text.
    assert example.teacher_tokens.tolist() == tokenizer.encode(rendered)[: example.num_teacher_tokens]
    assert tokenizer.decode(tokenizer.encode(rendered)[example.num_teacher_tokens :]).strip() == ""

    # The supervised tokens are those inside each assistant answer and its end-of-turn token.
    encoded = tokenizer.hf(rendered, add_special_tokens=False, return_offsets_mapping=True)
    spans = _assistant_spans(rendered, twin, tokenizer.chat_frame.end_of_turn)
    expected = [
        i
        for i, (lo, hi) in zip(encoded["input_ids"], encoded["offset_mapping"])
        if any(a <= lo and hi <= b for a, b in spans) and hi > lo
    ]
    supervised = example.teacher_targets[example.teacher_loss_mask > 0].tolist()
    assert supervised == expected
    end = tokenizer.encode(tokenizer.chat_frame.end_of_turn)
    assert supervised.count(end[0]) == 2 and len(supervised) >= len(tokenizer.encode("the cat sat on the mat")) + 4
    # The student predicts the same tokens, and each has its teacher position for the KL.
    student = example.targets[example.loss_mask > 0]
    assert student.tolist() == expected
    at = example.loss_mask > 0
    assert np.all(example.kl_mask[at] == 1)
    np.testing.assert_array_equal(example.teacher_targets[example.teacher_index[at]], student)
    # Every student position whose next token is text has the teacher position predicting it,
    # across both turns' audio slots.
    kl = example.kl_mask > 0
    assert kl.sum() == example.num_teacher_tokens - sum(len(labels) for labels in example.audio_labels) - 1
    np.testing.assert_array_equal(example.teacher_targets[example.teacher_index[kl]], example.targets[kl])
    assert np.all(example.teacher_loss_mask[example.teacher_index[at]] == 1)


def test_the_generation_prompt_of_a_turn_is_the_conversation_so_far(tokenizer):
    messages = parse_conversation(RECORD)
    twin = _twin_messages(messages)
    for turn in (2, 4):
        segments = conversation_segments(tokenizer, messages, until=turn)
        text = "".join(s.text for s in segments)
        assert text == tokenizer.hf.apply_chat_template(twin[:turn], tokenize=False, add_generation_prompt=True)
    # The teacher's answers replace the record's, and earlier ones stay supervised.
    segments = conversation_segments(tokenizer, messages, responses={2: "hello", 4: "world"}, until=4)
    assert [s.text for s in segments if s.supervised] == ["hello", tokenizer.chat_frame.end_of_turn]
    with pytest.raises(ValueError, match="not an assistant turn"):
        conversation_segments(tokenizer, messages, until=3)


def test_without_a_chat_template_turns_are_framed_by_lines_and_eos(tmp_path, sentences):
    from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer

    tok = load_tokenizer(build_word_tokenizer(sentences, tmp_path / "tok"), use_chat_template=False)
    messages = parse_conversation({"messages": [{"role": "user", "content": "hello world"}] + RECORD["messages"][2:]})
    text = "".join(s.text for s in conversation_segments(tok, messages))
    assert (
        text == "<bos>hello world\nthe cat sat on the mat<eos>Repeat the words , please : hello world\nhello world<eos>"
    )


BAD_LINES = [
    ("bad_json", "{not json"),
    ("bad_json", "[1, 2]"),
    ("bad_record", json.dumps({"id": "x", "messages": []})),
    ("no_assistant_turn", json.dumps({"messages": [{"role": "user", "content": "hello"}]})),
    (
        "bad_message",
        json.dumps({"messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "a"}]}),
    ),
    (
        "bad_message",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "audio", "audio": "a.wav"}]},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
    ),
    (
        "bad_message",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": [{"type": "audio", "audio": "a.wav", "transcript": "t"}]},
                ]
            }
        ),
    ),
    ("bad_message", json.dumps({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "a"}]})),
    (
        "bad_message",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": [{"type": "audio", "audio": "a.wav", "transcript": "t", "words": [1]}]},
                    {"role": "assistant", "content": "a"},
                ]
            }
        ),
    ),
    (
        "bad_message",
        json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]}),
    ),
]


def test_bad_lines_are_named_counted_and_the_rest_kept(tmp_path, caplog):
    path = tmp_path / "conversations.jsonl"
    good = {
        "id": "g",
        "messages": RECORD["messages"] + [{"role": "user", "content": "and then"}],  # a trailing question
    }
    lines = [json.dumps(good)] + [line for _, line in BAD_LINES] + ["", json.dumps({**good, "id": "h"})]
    path.write_text("\n".join(lines) + "\n")
    with caplog.at_level(logging.WARNING, logger="speechlm_jax.data.conversations"):
        source = conversation_source(path)
    assert [r["id"] for r in source.records] == ["g", "h"]
    assert len(source.records[0]["conversation"]) == 5  # the unanswered last question is left out
    assert source.records[0]["conversation"][1]["content"][0]["audio"] == str(tmp_path / "wav" / "a.wav")
    expected: dict[str, int] = {}
    for reason, _ in BAD_LINES:
        expected[reason] = expected.get(reason, 0) + 1
    assert dict(source.skipped) == expected
    # Every line is a record or one count: nothing is lost silently.
    assert len(source) + sum(source.skipped.values()) == len([line for line in lines if line.strip()])
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == len(BAD_LINES)
    for line_number, ((reason, _), message) in enumerate(zip(BAD_LINES, warned), start=2):
        assert message.startswith(f"{path}:{line_number}: conversation skipped ({reason})")
    assert "messages[0].content[0]: an audio part needs its 'transcript'" in warned[5]
    assert "messages[1]: only user turns may hold audio" in warned[6]


def _conversations(wav_manifest, path, count=4, timed=False):
    """Two-turn conversations over the manifest's WAVs: a spoken sentence, then a text follow-up."""
    rows = [json.loads(line) for line in wav_manifest.read_text().splitlines()][:count]
    with open(path, "w") as f:
        for row in rows:
            words = row["text"].split()
            messages = [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Repeat"},
                        {
                            "type": "audio",
                            "audio": str(wav_manifest.parent / row["audio"]),
                            "transcript": row["text"],
                            **({"words": row["words"]} if timed else {}),
                        },
                    ],
                },
                {"role": "assistant", "content": row["text"]},
                {"role": "user", "content": "What is said ?"},
                {"role": "assistant", "content": words[0]},
            ]
            f.write(json.dumps({"id": row["id"], "messages": messages}) + "\n")
    return rows


def _config(conversations, **overrides) -> PipelineConfig:
    values = dict(
        conversation_sources=(str(conversations),),
        conversation_weight=1.0,
        buckets=((16000 * 4, 64),),
        max_slots=2,
        teacher_tokens=64,
        batch_size=2,
        downsample=4,
        num_threads=1,
        prefetch_buffer_size=2,
    )
    values.update(overrides)
    return PipelineConfig(**values)


def _drain(iterator):
    batches = []
    for batch in iterator:
        batches.append(batch)
    return batches


def test_conversations_flow_through_the_pipeline_with_record_or_teacher_answers(wav_manifest, word_tokenizer, tmp_path):
    path = tmp_path / "conversations.jsonl"
    rows = _conversations(wav_manifest, path)
    config = _config(path)
    assert config.task_names[-1] == "conversation"
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval")
    batches = _drain(iterator)
    assert stats.as_dict()["examples"] == len(rows) and stats.as_dict()["skipped"] == 0
    answers = []
    for batch in batches:
        for i in np.flatnonzero(batch["weight"] > 0):
            assert batch["task_id"][i] == config.task_names.index("conversation")
            assert (batch["audio_lens"][i] > 0).sum() == 1
            answers.append(word_tokenizer.decode(batch["targets"][i][batch["loss_mask"][i] > 0]))
    assert sorted(answers) == sorted(f"{r['text']} {r['text'].split()[0]}" for r in rows)

    # The teacher's answers, one targets row per assistant turn; a conversation missing one is skipped.
    targets = tmp_path / "targets.jsonl"
    with open(targets, "w") as f:
        for k, r in enumerate(rows):
            for turn in (1, 3) if k else (1,):
                f.write(
                    json.dumps({"id": r["id"], "task": "conversation", "prompt": turn_key(turn), "response": "yes"})
                )
                f.write("\n")
    config = _config(path, conversation_responses="teacher", targets=(str(targets),))
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval")
    batches = _drain(iterator)
    counts = stats.as_dict()
    assert counts["examples"] == len(rows) - 1 and counts["skipped/no_target"] == 1
    for batch in batches:
        for i in np.flatnonzero(batch["weight"] > 0):
            assert word_tokenizer.decode(batch["targets"][i][batch["loss_mask"][i] > 0]) == "yes yes"


def test_conversations_mix_with_speech_by_weight(wav_manifest, word_tokenizer, tmp_path):
    path = tmp_path / "conversations.jsonl"
    _conversations(wav_manifest, path)
    speech = ({"type": "manifest", "path": str(wav_manifest)},)
    config = _config(path, speech_sources=speech, conversation_weight=0.5)
    iterator, _ = build_pipeline(config, tokenizer=word_tokenizer, seed=3)
    ids = np.concatenate([next(iterator)["task_id"] for _ in range(12)])
    share = np.mean(ids == config.task_names.index("conversation"))
    assert 0.25 < share < 0.75
    with pytest.raises(ValueError, match="conversation_weight"):
        _config(path, text_weight=0.5, conversation_weight=0.6)


def test_a_missing_conversation_file_is_named_before_anything_is_built(tmp_path):
    import ml_collections

    from speechlm_jax.configs.base import base_config
    from speechlm_jax.data.preflight import DataSourceError, check_sources

    config = base_config()
    config.data.tokenizer = ""
    config.data.conversation_sources = (str(tmp_path / "chats.jsonl"),)
    config.data.eval_conversation_sources = (str(tmp_path / "heldout_chats.jsonl"),)
    config.train = ml_collections.ConfigDict({"eval_every": 0})
    with pytest.raises(DataSourceError, match=r"data.conversation_sources\[0\]: .*chats.jsonl does not exist"):
        check_sources(config)
    (tmp_path / "chats.jsonl").write_text("")
    check_sources(config)  # the held-out file counts only when the run evaluates
    config.train.eval_every = 10
    with pytest.raises(DataSourceError, match=r"data.eval_conversation_sources\[0\]"):
        check_sources(config)


def test_timed_audio_parts_are_interleaved_and_the_teacher_reads_them_whole(wav_manifest, word_tokenizer, tmp_path):
    path = tmp_path / "conversations.jsonl"
    rows = _conversations(wav_manifest, path, count=10, timed=True)
    config = _config(path, interleave_prob=1.0, interleave_ratio=0.5, span_max=2)
    iterator, stats = build_pipeline(config, tokenizer=word_tokenizer, split="eval")
    written = []
    for batch in _drain(iterator):
        for i in np.flatnonzero(batch["weight"] > 0):
            teacher = word_tokenizer.decode(batch["teacher_tokens"][i][batch["teacher_input_mask"][i] > 0])
            row = next(r for r in rows if f"Repeat {r['text']} " in teacher)  # the whole transcript
            words = len(row["text"].split())
            text_positions = int(((batch["input_mask"][i] > 0) & (batch["audio_index"][i] < 0)).sum())
            # Transcript words the student reads as text: none when the whole part is spoken.
            written.append(text_positions - (int(batch["teacher_input_mask"][i].sum()) - words))
            assert 0 <= written[-1] < words and (batch["audio_lens"][i] > 0).sum() >= 1
    assert stats.as_dict()["examples"] == len(rows) and stats.as_dict()["skipped"] == 0
    assert max(written) > 0, written


def test_unreadable_audio_and_refused_templates_are_skipped_by_cause(wav_manifest, word_tokenizer, tmp_path):
    import copy

    from speechlm_jax.data.tokenizer import SpeechTokenizer

    path = tmp_path / "conversations.jsonl"
    rows = _conversations(wav_manifest, path)
    lines = path.read_text().splitlines()
    broken = json.loads(lines[0])
    broken["id"] = "missing"
    broken["messages"][0]["content"][1]["audio"] = str(tmp_path / "nowhere.wav")
    with_system = json.loads(lines[1])
    with_system["id"] = "system"
    with_system["messages"].insert(0, {"role": "system", "content": "Answer the question ."})
    path.write_text("\n".join(lines + [json.dumps(broken), json.dumps(with_system)]) + "\n")

    # A template that refuses system turns, as some chat templates do.
    hf = copy.deepcopy(word_tokenizer.hf)
    hf.chat_template = (
        "{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}" + hf.chat_template
    )
    iterator, stats = build_pipeline(_config(path), tokenizer=SpeechTokenizer(hf), split="eval")
    kept = sum(int(b["weight"].sum()) for b in _drain(iterator))
    counts = stats.as_dict()
    assert kept == len(rows) and counts["skipped/missing_file"] == 1 and counts["skipped/template_refused"] == 1
