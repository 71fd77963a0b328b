"""The example builder: sequences, labels, masks and the student-teacher KL alignment."""

from __future__ import annotations

import numpy as np
import pytest

from speechlm_jax.data.examples import (
    Audio,
    ExampleError,
    Text,
    build_example,
    chat_segments,
    leading_space,
    prompt_segments,
)
from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from speechlm_jax.models.frontend import audio_token_count


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    folder = build_word_tokenizer(["Repeat the cat sat on a mat", "hello world"], tmp_path_factory.mktemp("tok"))
    return load_tokenizer(folder)


def _clip(frames: int, downsample: int) -> np.ndarray:
    # The shortest clip giving `frames` audio tokens.
    samples = 160 * (2 * frames * downsample - 1)
    assert audio_token_count(samples, downsample) == frames
    return np.arange(samples, dtype=np.int16)


def _check_alignment(ex) -> None:
    """Where kl_mask is 1, the teacher position predicts the same token as the student's."""
    on = ex.kl_mask > 0
    np.testing.assert_array_equal(ex.targets[on], ex.teacher_targets[ex.teacher_index[on]])
    # Every text token after the first has a student predecessor with its teacher counterpart.
    next_is_text = np.concatenate([ex.audio_slot[1:] < 0, [False]])
    np.testing.assert_array_equal(on, next_is_text)


def test_docstring_worked_example(tok):
    segments = [
        Text("<bos> Repeat"),
        Text(" the"),
        Audio(_clip(2, 4), " cat"),
        Text(" sat"),
        Text(" <assistant> "),
        Text("the cat sat", supervised=True),
        Text(" <eos>", supervised=True),
    ]
    ex = build_example(segments, tok, downsample=4)
    ids = tok.hf.convert_tokens_to_ids
    a = tok.audio_token_id
    assert ex.tokens.tolist() == [
        ids("<bos>"),
        ids("Repeat"),
        ids("the"),
        a,
        a,
        ids("sat"),
        ids("<assistant>"),
        ids("the"),
        ids("cat"),
        ids("sat"),
        ids("<eos>"),
    ]
    assert tok.decode(ex.teacher_tokens) == "Repeat the cat sat the cat sat"
    assert ex.kl_mask.tolist() == [1, 1, 0, 0, 1, 1, 1, 1, 1, 1, 0]
    assert ex.teacher_index.tolist() == [0, 1, 0, 0, 3, 4, 5, 6, 7, 8, 0]
    assert ex.loss_mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert ex.teacher_loss_mask.tolist() == [0, 0, 0, 0, 0, 1, 1, 1, 1, 0]
    assert ex.audio_slot.tolist() == [-1, -1, -1, 0, 0, -1, -1, -1, -1, -1, -1]
    assert ex.audio_frame.tolist() == [-1, -1, -1, 0, 1, -1, -1, -1, -1, -1, -1]
    assert ex.targets[-1] == tok.pad_id and ex.targets[:-1].tolist() == ex.tokens[1:].tolist()
    _check_alignment(ex)


def test_several_slots_and_adjacent_slots(tok):
    segments = [
        Text("<bos>"),
        Audio(_clip(3, 2), "hello"),
        Audio(_clip(1, 2), " world"),
        Text(" the"),
        Audio(_clip(2, 2), " cat"),
        Text(" <eos>", supervised=True),
    ]
    ex = build_example(segments, tok, downsample=2)
    assert [len(a) for a in ex.audio] == [len(_clip(3, 2)), len(_clip(1, 2)), len(_clip(2, 2))]
    assert ex.audio_slot.tolist() == [-1, 0, 0, 0, 1, -1, 2, 2, -1]
    assert tok.decode(ex.teacher_tokens) == "hello world the cat"
    assert [a.tolist() for a in ex.audio_labels] == [tok.encode(t) for t in ("hello", " world", " cat")]
    _check_alignment(ex)
    # The last frame of slot 1 predicts "the" like the teacher's "world" does.
    assert tok.hf.convert_ids_to_tokens(int(ex.teacher_tokens[ex.teacher_index[4]])) == "world"


def test_text_only_teacher_equals_student(tok):
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    ex = build_example(chat_segments(tok, messages), tok, downsample=4)
    np.testing.assert_array_equal(ex.tokens, ex.teacher_tokens)
    np.testing.assert_array_equal(ex.loss_mask, ex.teacher_loss_mask)
    np.testing.assert_array_equal(ex.teacher_index[:-1], np.arange(len(ex.tokens) - 1))
    assert ex.kl_mask[:-1].all() and not ex.audio
    assert ex.tokens.tolist() == tok.encode(tok.hf.apply_chat_template(messages, tokenize=False))
    # Supervised: "world" and the end-of-turn EOS.
    assert tok.hf.convert_ids_to_tokens(ex.targets[ex.loss_mask > 0].tolist()) == ["world", "<eos>"]
    # Language modelling over the whole conversation: every next token after <bos>.
    lm = build_example(chat_segments(tok, messages, supervise_prompt=True), tok, downsample=4)
    np.testing.assert_array_equal(lm.tokens, ex.tokens)
    assert lm.loss_mask[:-1].all() and lm.loss_mask[-1] == 0


def test_prompt_segments_match_the_chat_template(tok):
    prompt = "Repeat {content}"
    assert leading_space(prompt) and not leading_space("{content} Repeat")
    segments = prompt_segments(tok, prompt, [Text(" the cat")], "the cat")
    ex = build_example(segments, tok, downsample=4)
    messages = [{"role": "user", "content": "Repeat the cat"}, {"role": "assistant", "content": "the cat"}]
    reference = tok.hf.apply_chat_template(messages, tokenize=False)
    assert ex.tokens.tolist() == tok.encode(reference)


def test_too_short_clip_is_an_example_error(tok):
    with pytest.raises(ExampleError) as info:
        build_example([Text("hello"), Audio(np.zeros(100, np.int16), " world")], tok, downsample=4)
    assert info.value.reason == "too_short"


@pytest.mark.parametrize("family", ["llama3", "qwen"])
def test_teacher_twin_is_the_chat_templates_text_version(family, request):
    """With a byte-level BPE tokenizer and a real chat template, the teacher twin of an
    interleaved example is exactly the tokenized text conversation."""
    from speechlm_jax.data import interleave

    tok = request.getfixturevalue(f"{family}_tokenizer")
    sentence = "she sells sea shells by the sea shore"
    n = len(sentence.split())
    record = {
        "text": sentence,
        "words": [{"w": w, "start": 0.4 * k + 0.05, "end": 0.4 * k + 0.35} for k, w in enumerate(sentence.split())],
    }
    words = interleave.record_words(record)
    waveform = np.ones(int(0.4 * n * 16000), np.int16)
    prompt = "Transcribe the audio. {content}"
    spans = [
        interleave.Span(0, 2, False),
        interleave.Span(2, 4, True),
        interleave.Span(4, 6, False),
        interleave.Span(6, 8, True),
    ]
    content = interleave.content_segments(
        waveform,
        words,
        spans,
        lead_space=leading_space(prompt),
        max_samples=16000 * 10,
        split_long=False,
        sample_rate=16000,
        margin_s=0.02,
    )
    ex = build_example(prompt_segments(tok, prompt, content, "yes"), tok, downsample=4)
    messages = [{"role": "user", "content": prompt.format(content=sentence)}, {"role": "assistant", "content": "yes"}]
    reference = tok.hf.apply_chat_template(messages, tokenize=False)
    end = reference.rindex(tok.chat_frame.end_of_turn) + len(tok.chat_frame.end_of_turn)
    assert ex.teacher_tokens.tolist() == tok.encode(reference[:end])
    assert len(ex.audio) == 2
    _check_alignment(ex)
