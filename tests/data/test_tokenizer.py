"""The tokenizer wrapper against transformers' own chat-template rendering."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from speechlm_jax.data.tokenizer import AUDIO_TOKEN, SpeechTokenizer, build_word_tokenizer, load_tokenizer

CORPUS = ["the quick brown fox jumps over the lazy dog", "Transcribe the audio.", "hello world, how are you?"]


def test_word_tokenizer_loads_with_autotokenizer(tmp_path):
    folder = build_word_tokenizer(CORPUS, tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(folder))
    tok = SpeechTokenizer(hf)
    ids = tok.encode("hello world, how are you?")
    assert tok.decode(ids) == "hello world, how are you?"
    assert hf.convert_ids_to_tokens([0, 1, 2, 3, 4]) == ["<pad>", "<bos>", "<eos>", "<unk>", AUDIO_TOKEN]
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.audio_token_id) == (0, 1, 2, 4)
    assert tok.encode("zebra") == [3]


@pytest.mark.parametrize("family", ["llama3", "qwen", "word"])
def test_chat_frame_concatenation_equals_the_template(family, request, tmp_path):
    if family == "word":
        tok = load_tokenizer(build_word_tokenizer(CORPUS, tmp_path / "tok"))
    else:
        tok = request.getfixturevalue(f"{family}_tokenizer")
    user, answer = "Transcribe the audio. hello world", "the quick brown fox"
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    reference = tok.hf.apply_chat_template(messages, tokenize=False)
    frame = tok.chat_frame
    ours = frame.prefix + user + frame.assistant_header + answer + frame.end_of_turn
    assert reference.startswith(ours)
    assert reference[len(ours) :].strip() == ""
    generation = tok.hf.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert generation == frame.prefix + user + frame.assistant_header
    # Segments tokenized one by one give the template's tokens: special tokens split them.
    pieces = [frame.prefix, user, frame.assistant_header, answer, frame.end_of_turn]
    assert sum((tok.encode(p) for p in pieces), []) == tok.encode(ours)


def test_llama3_end_of_turn_and_audio_fallback(llama3_tokenizer):
    llama3 = llama3_tokenizer
    assert llama3.chat_frame.end_of_turn == "<|eot_id|>"
    eot = llama3.hf.convert_tokens_to_ids("<|eot_id|>")
    assert eot in llama3.stop_ids and llama3.eos_id in llama3.stop_ids
    # No <audio> token and no pad token: the placeholder reuses EOS, the vocabulary is unchanged.
    assert llama3.audio_token_id == llama3.eos_id
    assert len(llama3) == len(llama3.hf.get_vocab())


def test_qwen_end_of_turn(qwen_tokenizer):
    qwen = qwen_tokenizer
    assert qwen.chat_frame.end_of_turn == "<|im_end|>"
    assert qwen.audio_token_id == qwen.pad_id == qwen.hf.convert_tokens_to_ids("<|endoftext|>")


def test_without_chat_template(tmp_path):
    folder = build_word_tokenizer(CORPUS, tmp_path / "tok")
    tok = load_tokenizer(folder, use_chat_template=False)
    assert tok.chat_frame.prefix == "<bos>" and tok.chat_frame.end_of_turn == "<eos>"
