"""The teacher's answers to multi-turn conversations (`speechlm-generate --conversations`).

For each conversation (`data.conversations`), the text LLM (LoRA off) answers every
assistant turn in order, reading the text twin of the conversation before it (audio parts
as their transcripts) through the chat template, with its own earlier answers in place of
the record's. The answers are decoded round by round: round r answers the r-th assistant
turn of every conversation of the shard that has one, in large batches.

Why the teacher's own earlier answers and not the record's: a training example supervises
every assistant turn, so its sequence must be a context in which each supervised answer is
what the teacher says. With the record's earlier answers as context, the teacher's second
answer would follow a first answer the training sequence does not hold (the teacher's), and
behaviour imitation would ask the student to imitate the teacher in a context the teacher
never answered in. A rollout of the teacher has no such mismatch. The cost is a follow-up
question that refers to the record's own wording of an earlier answer; the toy world's
follow-ups ask about the user's content, which a rollout leaves intact.

Rows are `{"id", "task": "conversation", "prompt": "messages[i]", "response"}`, one per
assistant turn, read by `data.sources.TargetTable` with `data.conversation_responses =
"teacher"`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax

from speechlm_jax.data.conversations import CONVERSATION_TASK, assistant_turns, conversation_segments, turn_key
from speechlm_jax.evaluation.scoring import Scorer


def count_turns(records: Sequence[dict[str, Any]]) -> int:
    """Assistant turns of the conversation records: the rows they give."""
    return sum(len(assistant_turns(r["conversation"])) for r in records)


def conversation_rows(
    scorer: Scorer,
    records: Sequence[dict[str, Any]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    progress: Callable[[int], object] | None = None,
) -> tuple[list[dict[str, str]], int]:
    """The teacher's answer to every assistant turn of `records` (in record and turn order), and
    the number of tokens generated. Round r folds r into `rng` for sampling."""
    turns = [assistant_turns(r["conversation"]) for r in records]
    answers: list[dict[int, str]] = [{} for _ in records]
    generated = 0
    for r in range(max((len(t) for t in turns), default=0)):
        asked = [k for k, t in enumerate(turns) if len(t) > r]
        prepared = [
            scorer.prepare(
                conversation_segments(
                    scorer.tokenizer, records[k]["conversation"], responses=answers[k], until=turns[k][r]
                )
            )
            for k in asked
        ]
        texts, tokens = scorer.generate_prepared(
            prepared,
            "text",
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            rng=None if rng is None else jax.random.fold_in(rng, r),
            progress=progress,
        )
        generated += tokens
        for k, text in zip(asked, texts):
            answers[k][turns[k][r]] = text
    rows = [
        {"id": str(record["id"]), "task": CONVERSATION_TASK, "prompt": turn_key(i), "response": answers[k][i]}
        for k, record in enumerate(records)
        for i in turns[k]
    ]
    return rows, generated
