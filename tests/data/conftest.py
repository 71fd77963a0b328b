"""Data fixtures: tiny word and BPE (Llama 3 / Qwen chat template) tokenizers, a manifest of WAV
files, a synthesized LibriSpeech folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer

SR = 16000
SENTENCES = [
    "the cat sat on the mat",
    "a quick brown fox jumps",
    "she sells sea shells by the sea shore",
    "hello world",
    "good morning to you all",
    "it is raining again today",
    "we went to the market early",
    "the lazy dog sleeps",
    "red green and blue",
    "one more sentence for the corpus",
]
WORDS = [
    "Transcribe",
    "Repeat",
    "Continue",
    "Answer",
    "question",
    "yes",
    "no",
    "What",
    "is",
    "said",
    "?",
    ".",
    ":",
]


LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BPE_CORPUS = SENTENCES + ["Transcribe the audio.", "Repeat the words, please: hello world, how are you?"]


def _bpe(tmp_path, template: str, specials: list[str], bos: str | None, eos: str, pad: str | None):
    """A small byte-level BPE tokenizer with a real chat template, saved and reloaded."""
    model = Tokenizer(models.BPE(unk_token=None))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    model.train_from_iterator(BPE_CORPUS * 10, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=model, bos_token=bos, eos_token=eos, pad_token=pad)
    hf.chat_template = template
    hf.save_pretrained(str(tmp_path))
    return load_tokenizer(tmp_path)


@pytest.fixture(scope="session")
def llama3_tokenizer(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("llama3")
    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ]
    return _bpe(tmp_path, LLAMA3_TEMPLATE, specials, "<|begin_of_text|>", "<|end_of_text|>", None)


@pytest.fixture(scope="session")
def qwen_tokenizer(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("qwen")
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return _bpe(tmp_path, QWEN_TEMPLATE, specials, None, "<|im_end|>", "<|endoftext|>")


@pytest.fixture(scope="session")
def sentences() -> list[str]:
    return list(SENTENCES)


@pytest.fixture(scope="session")
def word_tokenizer(tmp_path_factory):
    from speechlm_jax.data.tasks import TASKS

    prompts = [p for task in TASKS.values() for p in task.prompts_train + task.prompts_heldout]
    folder = build_word_tokenizer(SENTENCES + WORDS + prompts, tmp_path_factory.mktemp("word_tokenizer"))
    return load_tokenizer(folder)


def write_utterance(path, text: str, rng: np.random.Generator, word_s: float = 0.25, gap_s: float = 0.05) -> list[dict]:
    """Writes a 16 kHz noise WAV with one burst per word; returns the word timings."""
    words = text.split()
    audio = np.zeros(int((gap_s + len(words) * (word_s + gap_s)) * SR), np.int16)
    timings = []
    for k, w in enumerate(words):
        start = gap_s + k * (word_s + gap_s)
        lo, hi = int(start * SR), int((start + word_s) * SR)
        audio[lo:hi] = rng.integers(-8000, 8000, hi - lo)
        timings.append({"w": w, "start": round(start, 4), "end": round(start + word_s, 4)})
    sf.write(path, audio, SR, subtype="PCM_16")
    return timings


@pytest.fixture(scope="session")
def wav_manifest(tmp_path_factory):
    """A manifest of the ten SENTENCES as noise WAVs with word timings."""
    root = tmp_path_factory.mktemp("wav_corpus")
    rng = np.random.default_rng(0)
    rows = []
    for i, text in enumerate(SENTENCES):
        (root / "wav").mkdir(exist_ok=True)
        words = write_utterance(root / "wav" / f"u{i}.wav", text, rng)
        rows.append(
            {
                "id": f"u{i}",
                "audio": f"wav/u{i}.wav",
                "text": text,
                "words": words,
                "speaker": "s0",
                "duration": words[-1]["end"] + 0.05,
            }
        )
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


@pytest.fixture(scope="session")
def librispeech_corpus(tmp_path_factory):
    """A small LibriSpeech-layout folder made by the synth tool (espeak-ng)."""
    from speechlm_jax.data.tts import Voice
    from speechlm_jax.data.tts_corpus import synthesize_corpus

    root = tmp_path_factory.mktemp("librispeech")
    items = [{"id": f"s{i}", "text": text} for i, text in enumerate(SENTENCES[:4])]
    manifest = synthesize_corpus(items, root, voices=[Voice()], workers=1, layout="librispeech").manifest
    return root, manifest
