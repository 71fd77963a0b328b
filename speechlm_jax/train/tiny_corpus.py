"""The tiny TTS corpus the `:tiny` recipe variants and the trainer tests train on.

    python -m speechlm_jax.train.tiny_corpus /tmp/speechlm_tiny_corpus

writes, with the espeak synthesizer (`speechlm_jax.data.tts`):

    manifest.jsonl + audio     a dozen toy-world training sentences, spoken
    heldout/manifest.jsonl     a few held-out sentences (the evaluation data)
    text_sft.jsonl             text-only chat examples of the toy tasks (VoiceTextBlender's text part)
    tokenizer/                 a word-level HF tokenizer covering every sentence, prompt and answer

Building is resumable (existing audio is kept), so calling it again is cheap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from speechlm_jax.data.tasks import TASKS
from speechlm_jax.data.tokenizer import build_word_tokenizer
from speechlm_jax.data.tts import Voice
from speechlm_jax.data.tts_corpus import synthesize_corpus
from speechlm_jax.toyworld import sentences as toy_sentences
from speechlm_jax.toyworld.tasks import all_words, register_toy_tasks

TEXT_TASKS = ("first_word", "last_word", "count_words")


def _spoken(texts: list[str], out_dir: Path, prefix: str) -> Path:
    items = [{"id": f"{prefix}{i:03d}", "text": text} for i, text in enumerate(texts)]
    return synthesize_corpus(items, out_dir, voices=[Voice(rate=200)], workers=1).manifest


def build_tiny_corpus(out_dir: str | Path, *, train_sentences: int = 12, heldout_sentences: int = 4, seed: int = 0) -> Path:
    """Writes the corpus into `out_dir` (see the module docstring); returns `out_dir`."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    register_toy_tasks()
    train = toy_sentences.sentences("train", train_sentences, seed=seed)
    heldout = toy_sentences.sentences("heldout", heldout_sentences, seed=seed)
    _spoken(train, out_dir, "train")
    _spoken(heldout, out_dir / "heldout", "heldout")

    with open(out_dir / "text_sft.jsonl", "w") as f:
        for i, sentence in enumerate(train):
            task = TASKS[TEXT_TASKS[i % len(TEXT_TASKS)]]
            prompt = task.prompts_train[i % len(task.prompts_train)].replace("{content}", sentence)
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": task.answer(sentence)}]
            f.write(json.dumps({"id": f"text{i:03d}", "messages": messages}) + "\n")

    prompts = [p.replace("{content}", "") for task in TASKS.values() for p in task.prompts_train + task.prompts_heldout]
    build_word_tokenizer([*all_words(), *train, *heldout, *prompts], out_dir / "tokenizer")
    return out_dir


if __name__ == "__main__":
    print(build_tiny_corpus(sys.argv[1] if len(sys.argv) > 1 else "/tmp/speechlm_tiny_corpus"))
