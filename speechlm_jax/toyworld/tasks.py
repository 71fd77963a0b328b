"""The toy world's text tasks: questions about a sentence whose answers are computable.

Each task is a `speechlm_jax.data.tasks.TextTask` with six training phrasings and two
held-out ones; the sentence goes where a phrasing says `{content}` (as text for the
teacher, as speech for the student). Answers are short (one word, or the sentence's
words for `repeat` / `reverse`) and computed from the sentence by `sentences.parse`, so
the teacher can be trained on them from text and every recipe can be scored exactly.

The tiny teacher LLM learns all tasks from text. `HELDOUT_TASKS` are never shown to
any speech-alignment recipe: they test whether a recipe that aligned speech on the
other tasks transfers to tasks that need the content understood (counting animals,
reversing, finding the verb or the place), not merely transcribed.

Prompts are lower case without punctuation, like the sentences; every word any prompt,
sentence or answer can contain is in `all_words()`, the word-level tokenizer's list.
Budget: at most 9 prompt words + 10 sentence words + 10 answer words, so a whole
example stays under 30 words before the chat template's few special tokens.
"""

from __future__ import annotations

from collections.abc import Callable

from speechlm_jax.data.tasks import TASKS, TextTask, register_task
from speechlm_jax.toyworld import vocab
from speechlm_jax.toyworld.sentences import parse

YES, NO = "yes", "no"
NONE = "none"
NOWHERE = "nowhere"


def _repeat(sentence: str) -> str:
    return " ".join(sentence.split())


def _count_words(sentence: str) -> str:
    return vocab.number_word(len(sentence.split()))


def _first_word(sentence: str) -> str:
    return sentence.split()[0]


def _second_word(sentence: str) -> str:
    return sentence.split()[1]


def _last_word(sentence: str) -> str:
    return sentence.split()[-1]


def _colour(sentence: str) -> str:
    """The first colour word, "none" without one."""
    return next((w for w in sentence.split() if w in vocab.COLOURS), NONE)


def _count_colours(sentence: str) -> str:
    return vocab.number_word(sum(w in vocab.COLOURS for w in sentence.split()))


def _has_kind(sentence: str, kind: str) -> str:
    return YES if any(p.kind == kind for p in parse(sentence).noun_phrases) else NO


def _has_place(sentence: str) -> str:
    return _has_kind(sentence, vocab.PLACE)


def _has_person(sentence: str) -> str:
    return _has_kind(sentence, vocab.PERSON)


def _first_animal(sentence: str) -> str:
    """The singular of the first animal noun ("two dogs" -> "dog"), "none" without one."""
    return next((p.lemma for p in parse(sentence).noun_phrases if p.kind == vocab.ANIMAL), NONE)


def _place(sentence: str) -> str:
    return parse(sentence).place or NOWHERE


def _action(sentence: str) -> str:
    """The subject's verb as written ("runs", or "run" after a plural subject)."""
    return parse(sentence).verb or NONE


def _count_animals(sentence: str) -> str:
    """Animals counted with their quantities: "a cat and two dogs" -> "three"."""
    phrases = parse(sentence).noun_phrases
    return vocab.number_word(sum(p.quantity for p in phrases if p.kind == vocab.ANIMAL))


def _reverse(sentence: str) -> str:
    return " ".join(reversed(sentence.split()))


def _ordinal_word_task(name: str, ordinal: str, answer: Callable[[str], str]) -> TextTask:
    """first_word / second_word / last_word share their phrasings but for the ordinal."""
    return TextTask(
        name=name,
        prompts_train=(
            f"what is the {ordinal} word of {{content}}",
            f"say the {ordinal} word {{content}}",
            f"{{content}} which word comes {ordinal}",
            f"give the {ordinal} word in {{content}}",
            f"name the {ordinal} word of this sentence {{content}}",
            f"tell me the {ordinal} word {{content}}",
        ),
        prompts_heldout=(
            f"{{content}} what is the {ordinal} word",
            f"which word is {ordinal} in {{content}}",
        ),
        answer=answer,
    )


def _count_task(name: str, things: str, answer: Callable[[str], str]) -> TextTask:
    """count_words / count_colours / count_animals share their phrasings but for the noun."""
    return TextTask(
        name=name,
        prompts_train=(
            f"how many {things} are in {{content}}",
            f"count the {things} in {{content}}",
            f"{{content}} how many {things}",
            f"what is the number of {things} in {{content}}",
            f"tell me how many {things} this sentence has {{content}}",
            f"give the count of {things} in {{content}}",
        ),
        prompts_heldout=(
            f"{{content}} count the {things}",
            f"please tell me the number of {things} in {{content}}",
        ),
        answer=answer,
    )


def _has_task(name: str, thing: str, answer: Callable[[str], str]) -> TextTask:
    """has_place / has_person: yes or no."""
    return TextTask(
        name=name,
        prompts_train=(
            f"is there a {thing} in {{content}}",
            f"does {{content}} mention a {thing}",
            f"{{content}} is a {thing} mentioned",
            f"does this sentence name a {thing} {{content}}",
            f"answer yes or no is there a {thing} in {{content}}",
            f"tell me if a {thing} is mentioned {{content}}",
        ),
        prompts_heldout=(
            f"{{content}} does it mention a {thing}",
            f"is a {thing} named in {{content}}",
        ),
        answer=answer,
    )


REPEAT = TextTask(
    name="repeat",
    prompts_train=(
        "repeat the sentence {content}",
        "say this again {content}",
        "{content} repeat this sentence",
        "please repeat {content}",
        "copy the sentence {content}",
        "write the sentence again {content}",
    ),
    prompts_heldout=(
        "{content} say the sentence again",
        "please write this sentence again {content}",
    ),
    answer=_repeat,
)
COUNT_WORDS = _count_task("count_words", "words", _count_words)
FIRST_WORD = _ordinal_word_task("first_word", "first", _first_word)
SECOND_WORD = _ordinal_word_task("second_word", "second", _second_word)
LAST_WORD = _ordinal_word_task("last_word", "last", _last_word)
COLOUR = TextTask(
    name="colour",
    prompts_train=(
        "which colour comes first in {content}",
        "what colour is in {content}",
        "{content} name the first colour",
        "give the first colour word in {content}",
        "tell me the colour in this sentence {content}",
        "what is the first colour of {content}",
    ),
    prompts_heldout=(
        "{content} which colour is mentioned first",
        "name the colour in {content}",
    ),
    answer=_colour,
)
COUNT_COLOURS = _count_task("count_colours", "colours", _count_colours)
HAS_PLACE = _has_task("has_place", "place", _has_place)
HAS_PERSON = _has_task("has_person", "person", _has_person)
FIRST_ANIMAL = TextTask(
    name="first_animal",
    prompts_train=(
        "which animal comes first in {content}",
        "name the first animal in {content}",
        "{content} which animal is mentioned first",
        "what is the first animal in this sentence {content}",
        "tell me the first animal {content}",
        "give the first animal named in {content}",
    ),
    prompts_heldout=(
        "{content} name the first animal",
        "what animal comes first in {content}",
    ),
    answer=_first_animal,
)
PLACE = TextTask(
    name="place",
    prompts_train=(
        "where does it happen {content}",
        "{content} where is this",
        "what is the place in {content}",
        "name the place in {content}",
        "tell me where it happens {content}",
        "which place is mentioned in {content}",
    ),
    prompts_heldout=(
        "{content} what place is named",
        "give the place in {content}",
    ),
    answer=_place,
)
ACTION = TextTask(
    name="action",
    prompts_train=(
        "what does the subject do in {content}",
        "what is the action in {content}",
        "{content} what happens",
        "name the action in {content}",
        "which verb is in {content}",
        "give the main verb of {content}",
    ),
    prompts_heldout=(
        "{content} what is the action",
        "tell me what the subject does in {content}",
    ),
    answer=_action,
)
COUNT_ANIMALS = _count_task("count_animals", "animals", _count_animals)
REVERSE = TextTask(
    name="reverse",
    prompts_train=(
        "reverse the sentence {content}",
        "say {content} backwards",
        "{content} reverse the words",
        "write the words of {content} in reverse order",
        "give the sentence backwards {content}",
        "reverse the order of the words in {content}",
    ),
    prompts_heldout=(
        "{content} say it backwards",
        "please write {content} backwards",
    ),
    answer=_reverse,
)

TOY_TASKS: tuple[TextTask, ...] = (
    REPEAT,
    COUNT_WORDS,
    FIRST_WORD,
    SECOND_WORD,
    LAST_WORD,
    COLOUR,
    COUNT_COLOURS,
    HAS_PLACE,
    HAS_PERSON,
    FIRST_ANIMAL,
    PLACE,
    ACTION,
    COUNT_ANIMALS,
    REVERSE,
)
# Learned by the teacher from text only; no speech-alignment recipe ever trains on them.
HELDOUT_TASKS: tuple[str, ...] = ("place", "action", "count_animals", "reverse")
SEEN_TASKS: tuple[str, ...] = tuple(t.name for t in TOY_TASKS if t.name not in HELDOUT_TASKS)

# Answers other than sentence words: yes/no, "none", "nowhere" and counts.
ANSWER_WORDS: tuple[str, ...] = (YES, NO, NONE, NOWHERE, *vocab.NUMBER_WORDS)


def register_toy_tasks() -> dict[str, TextTask]:
    """Registers every toy task in `speechlm_jax.data.tasks.TASKS` (idempotent); returns them by name."""
    for task in TOY_TASKS:
        register_task(task)
    return {task.name: TASKS[task.name] for task in TOY_TASKS}


def prompt_words() -> tuple[str, ...]:
    """Every word of every toy prompt (placeholder excluded), sorted."""
    words = {
        w
        for task in TOY_TASKS
        for prompt in task.prompts_train + task.prompts_heldout
        for w in prompt.split()
        if w != "{content}"
    }
    return tuple(sorted(words))


def all_words() -> tuple[str, ...]:
    """Every word a toy prompt, sentence or answer can contain, sorted: the tokenizer's vocabulary."""
    return tuple(sorted(set(vocab.sentence_words()) | set(prompt_words()) | set(ANSWER_WORDS)))


# A task module registers its tasks when imported (`data.task_modules`).
register_toy_tasks()
