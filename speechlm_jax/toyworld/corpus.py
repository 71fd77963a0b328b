"""The toy world's corpora: sentences, a word-level tokenizer, text SFT data, and their speech.

    python -m speechlm_jax.toyworld.corpus /tmp/speechlm_tiny_corpus

One builder serves the demo (thousands of sentences, many voices) and the `:tiny` recipe
variants and tests (a dozen sentences, one voice). A corpus folder holds

    train.txt, heldout.txt       the sentences (hash-disjoint splits, `toyworld.sentences`)
    encoder.txt                  further training-split sentences, disjoint from train.txt, for
                                 the speech encoder's pretraining alone (`encoder_sentences`)
    tokenizer/                   a word-level HF tokenizer covering every word a sentence,
                                 a registered phrasing or an answer can contain
    text_sft.jsonl               chat examples of the toy tasks about the training sentences
                                 (a task asked `asks[task]` times, in distinct phrasings)
    copy_lm.jsonl                language modelling on word sequences that repeat (`copy_sequences`)

and `speak` adds `<split>/manifest.jsonl` with the audio and word timings (eSpeak NG through
`speechlm_jax.data.tts`). Building speech is resumable: existing audio is kept.
"""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from speechlm_jax.data.tasks import TASKS, TextTask
from speechlm_jax.data.tokenizer import build_word_tokenizer
from speechlm_jax.data.tts import Voice
from speechlm_jax.data.tts_corpus import synthesize_corpus
from speechlm_jax.toyworld import sentences as toy_sentences
from speechlm_jax.toyworld.tasks import TOY_TASKS, all_words, register_toy_tasks
from speechlm_jax.toyworld.vocab import sentence_words

SPLITS = ("train", "heldout")
# The speech splits `speak` writes: the two sentence splits, and the encoder's own sentences.
SPEECH_SPLITS = (*SPLITS, "encoder")
# The `:tiny` corpus's text SFT asks three tasks only: enough for VoiceTextBlender's text part.
TINY_TEXT_TASKS = ("first_word", "last_word", "count_words")


def build_corpus(
    folder: str | Path,
    *,
    train_sentences: int,
    heldout_sentences: int,
    seed: int = 0,
    tasks: Sequence[TextTask] = TOY_TASKS,
    asks: Mapping[str, int] | None = None,
    copy_sequences: int = 0,
    encoder_sentences: int = 0,
) -> Path:
    """Writes the sentences, the tokenizer, the text SFT data and `copy_sequences` copying
    sequences (`copy_lm.jsonl`, `write_copy_sequences`) into `folder`; returns it.

    `encoder_sentences`: that many more training-split sentences in `encoder.txt`, the ones drawn
    after the `train_sentences` (the same seeded stream), so no text SFT row, teacher target or
    recipe example is about them; only the encoder's pretraining hears them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    register_toy_tasks()
    stream = toy_sentences.sentences("train", train_sentences + encoder_sentences, seed=seed)
    train, encoder = stream[:train_sentences], stream[train_sentences:]
    heldout = toy_sentences.sentences("heldout", heldout_sentences, seed=seed)
    (folder / "train.txt").write_text("\n".join(train) + "\n")
    (folder / "heldout.txt").write_text("\n".join(heldout) + "\n")
    encoder_file = folder / "encoder.txt"
    if encoder:
        encoder_file.write_text("\n".join(encoder) + "\n")
    else:
        encoder_file.unlink(missing_ok=True)
    # Every registered phrasing (the built-in asr / continuation / spoken_qa ones too) must tokenize.
    prompts = [
        p.replace("{content}", " ").replace("{question}", " ")
        for task in TASKS.values()
        for p in task.prompts_train + task.prompts_heldout
    ]
    build_word_tokenizer([*all_words(), *prompts], folder / "tokenizer")
    rng = random.Random(seed)
    asks = dict(asks or {})
    with open(folder / "text_sft.jsonl", "w", encoding="utf-8") as f:
        for i, sentence in enumerate(train):
            for task in tasks:
                # Each ask of a task about a sentence in a different phrasing.
                for k, phrasing in enumerate(rng.sample(task.prompts_train, asks.get(task.name, 1))):
                    prompt = phrasing.replace("{content}", sentence)
                    messages = [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": task.answer(sentence)},
                    ]
                    f.write(json.dumps({"id": f"text{i:05d}-{task.name}-{k}", "messages": messages}) + "\n")
    write_copy_sequences(folder / "copy_lm.jsonl", copy_sequences, seed=seed)
    return folder


def write_copy_sequences(path: str | Path, n: int, *, seed: int = 0, min_words: int = 3, max_words: int = 12) -> Path:
    """`n` chat rows whose answer repeats the prompt, a random sequence of sentence words.

    A real LLM copies from pretraining (induction heads); a toy teacher trained from scratch on
    the tasks alone forms copying late and unreliably, and every spoken task that needs the
    words in order inherits its ceiling. With the loss on every token (`data.text_loss=all`)
    only copying predicts the second half of these rows: there is no grammar to guess from.
    Lengths are uniform in [`min_words`, `max_words`]: 3-12 reaches a little past the sentences' 3-10.
    """
    rng = random.Random(f"copy-{seed}")
    words = sentence_words()
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            sequence = " ".join(rng.choice(words) for _ in range(rng.randint(min_words, max_words)))
            messages = [{"role": "user", "content": sequence}, {"role": "assistant", "content": sequence}]
            f.write(json.dumps({"id": f"copy{i:06d}", "messages": messages}) + "\n")
    return Path(path)


def read_sentences(corpus: str | Path, split: str) -> list[str]:
    """The sentences of one split of a corpus folder."""
    return [t for t in (Path(corpus) / f"{split}.txt").read_text().split("\n") if t]


def speak(
    corpus: str | Path,
    out: str | Path,
    voices: Sequence[Voice],
    *,
    workers: int = 1,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Each split of the corpus (`SPEECH_SPLITS`; `encoder` only where the corpus has it) spoken into
    `out/<split>/manifest.jsonl`, one voice per utterance (hash of its id)."""
    out = Path(out)
    for split in SPEECH_SPLITS:
        if split == "encoder" and not (Path(corpus) / "encoder.txt").exists():
            continue
        items = [{"id": f"{split}{i:05d}", "text": t} for i, t in enumerate(read_sentences(corpus, split))]
        synthesize_corpus(items, out / split, voices=list(voices), workers=workers, seed=seed, progress=progress)
    return out


def build_tiny_corpus(
    out_dir: str | Path, *, train_sentences: int = 12, heldout_sentences: int = 4, seed: int = 0
) -> Path:
    """The `:tiny` variants' corpus in `out_dir`: a dozen sentences in one voice; returns `out_dir`."""
    register_toy_tasks()
    build_corpus(
        out_dir,
        train_sentences=train_sentences,
        heldout_sentences=heldout_sentences,
        seed=seed,
        tasks=[TASKS[name] for name in TINY_TEXT_TASKS],
    )
    return speak(out_dir, out_dir, [Voice(rate=200)], seed=seed)


if __name__ == "__main__":
    print(build_tiny_corpus(sys.argv[1] if len(sys.argv) > 1 else "/tmp/speechlm_tiny_corpus"))
