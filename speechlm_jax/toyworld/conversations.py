"""The toy world's two-turn task: a spoken sentence and a question, then a follow-up in text.

    user       "what is the first word of" + <the sentence, spoken>
    assistant  "the"
    user       "how many words"                       (about the same sentence, not repeated)
    assistant  "five"

Turn 1 asks a seen toy task (`first_word`, `colour`, ...) in one of its training phrasings,
with the sentence spoken where the phrasing says `{content}`; turn 2 asks a follow-up whose
phrasing names no sentence, so the answer needs the speech heard one turn earlier. Every
answer is computed from the sentence (`toyworld.tasks`), so the records' answers are right
and a recipe can be scored exactly; `speechlm-generate --conversations` gives the teacher's.
Every follow-up word is a word of a toy prompt, so the toy tokenizer covers them.

The file is a conversation JSONL (`data.conversations`) over a spoken manifest (`corpus.speak`):

    python -m speechlm_jax.toyworld.conversations SPEECH/train/manifest.jsonl OUT.jsonl

No demo mixture reads it; a recipe reads it through `data.conversation_sources`.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from collections.abc import Callable

from speechlm_jax import storage
from speechlm_jax.data.sources import manifest_source
from speechlm_jax.toyworld import tasks as toy_tasks


@dataclasses.dataclass(frozen=True)
class FollowUp:
    """A second-turn question about the sentence of the first turn (no `{content}`)."""

    phrasings: tuple[str, ...]
    answer: Callable[[str], str]


@dataclasses.dataclass(frozen=True)
class TwoTurnTask:
    """First turns from toy tasks (sentence spoken at `{content}`), second turns from follow-ups."""

    name: str
    first: tuple[str, ...]
    follow_ups: tuple[FollowUp, ...]

    def words(self) -> set[str]:
        """Every word of the follow-up phrasings."""
        return {w for f in self.follow_ups for p in f.phrasings for w in p.split()}


LAST_WORD = FollowUp(("what is the last word", "which word comes last"), toy_tasks.LAST_WORD.answer)
COUNT_WORDS = FollowUp(("how many words", "count the words"), toy_tasks.COUNT_WORDS.answer)
FIRST_WORD = FollowUp(("what is the first word", "which word comes first"), toy_tasks.FIRST_WORD.answer)

TWO_TURN = TwoTurnTask(
    name="two_turn",
    first=("first_word", "colour", "has_person", "count_words"),
    follow_ups=(LAST_WORD, COUNT_WORDS, FIRST_WORD),
)


def conversation(
    task: TwoTurnTask,
    record_id: str,
    audio: str,
    sentence: str,
    rng: random.Random,
    words: list[dict] | None = None,
) -> dict:
    """One two-turn conversation about `sentence` (spoken in `audio`, with its word timings
    `words` when known, for interleaving), phrasings drawn from `rng`."""
    first = toy_tasks.TASKS[rng.choice(task.first)]
    before, after = rng.choice(first.prompts_train).split("{content}")
    parts = [{"type": "text", "text": before.strip()}] if before.strip() else []
    parts.append({"type": "audio", "audio": audio, "transcript": sentence, **({"words": words} if words else {})})
    if after.strip():
        parts.append({"type": "text", "text": after.strip()})
    follow_up = rng.choice(task.follow_ups)
    return {
        "id": f"{record_id}-{task.name}",
        "messages": [
            {"role": "user", "content": parts},
            {"role": "assistant", "content": first.answer(sentence)},
            {"role": "user", "content": rng.choice(follow_up.phrasings)},
            {"role": "assistant", "content": follow_up.answer(sentence)},
        ],
    }


def write_two_turn(
    manifest: storage.PathLike, out: storage.PathLike, *, task: TwoTurnTask = TWO_TURN, seed: int = 0
) -> storage.epath.Path:
    """One conversation per utterance of a spoken manifest, written as conversation JSONL to `out`."""
    toy_tasks.register_toy_tasks()
    rng = random.Random(seed)
    rows = [
        conversation(task, r["id"], r["audio"], " ".join(r["text"].split()), rng, r.get("words"))
        for r in manifest_source(manifest).records
    ]
    storage.write_text(out, "".join(json.dumps(row) + "\n" for row in rows))
    return storage.path(out)


if __name__ == "__main__":
    print(write_two_turn(sys.argv[1], sys.argv[2]))
