"""Text tasks and their prompt pools: what the LLM is asked to do with a sentence.

A `TextTask` is a pool of prompt phrasings, each with a `{content}` placeholder where the
sentence goes: as speech (one or several audio slots) for the student, as the transcript
for the teacher. The pool is split into `train` and `heldout` phrasings so evaluation can
measure whether the speech LLM generalises to instructions it never saw. `answer`, when
given, computes the reference response (the toy world's tasks have one); otherwise the
response is the teacher's own generation, read from a targets file.

The pipeline's example kinds (`asr`, `continuation`, `imitation`, `spoken_qa`,
`mixed_modal`, `text_sft`) pick their prompts from the tasks registered here: `asr`,
`continuation` and `spoken_qa` are built in. Other tasks live in task modules that call
`register_task` when imported, named by the config (`data.task_modules`) or by the
`--task_modules` flag of `speechlm-generate`, `speechlm-eval` and `speechlm-select`; the toy
world's `speechlm_jax.toyworld.tasks` is one such module.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence

PROMPT_SPLITS = ("train", "heldout")


@dataclasses.dataclass(frozen=True)
class TextTask:
    """A named task: prompt phrasings (train / held-out) and an optional answer function."""

    name: str
    prompts_train: tuple[str, ...]
    prompts_heldout: tuple[str, ...]
    answer: Callable[[str], str] | None = None

    def __post_init__(self):
        if not self.prompts_train or not self.prompts_heldout:
            raise ValueError(f"task {self.name!r} needs train and held-out prompts")
        for prompt in self.prompts_train + self.prompts_heldout:
            if prompt.count("{content}") != 1:
                raise ValueError(f"task {self.name!r}: prompt {prompt!r} must contain {{content}} exactly once")
        overlap = set(self.prompts_train) & set(self.prompts_heldout)
        if overlap:
            raise ValueError(f"task {self.name!r}: prompts in both splits: {sorted(overlap)}")

    def prompts(self, split: str) -> tuple[str, ...]:
        """The prompt pool of `split` ("train" or "heldout")."""
        if split not in PROMPT_SPLITS:
            raise ValueError(f"prompt split must be one of {PROMPT_SPLITS}, got {split!r}")
        return self.prompts_train if split == "train" else self.prompts_heldout


TASKS: dict[str, TextTask] = {}


def register_task(task: TextTask, *, replace: bool = False) -> TextTask:
    """Adds `task` to `TASKS`; re-registering the identical task is a no-op."""
    existing = TASKS.get(task.name)
    if existing is not None and existing != task and not replace:
        raise ValueError(f"a different task named {task.name!r} is already registered")
    TASKS[task.name] = task
    return task


def import_task_modules(modules: Sequence[str]) -> None:
    """Imports each named module (`data.task_modules`, `--task_modules`); a task module registers on import."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as error:
            raise ValueError(f"task module {name!r} cannot be imported ({error})") from error


def get_task(name: str) -> TextTask:
    if name not in TASKS:
        raise KeyError(f"unknown task {name!r}; registered: {sorted(TASKS)}")
    return TASKS[name]


def _transcript(sentence: str) -> str:
    return sentence


ASR = register_task(
    TextTask(
        name="asr",
        prompts_train=(
            "Transcribe the audio. {content}",
            "Write down what is said. {content}",
            "{content} Transcribe this speech.",
            "Repeat exactly what you hear: {content}",
            "Convert the speech to text. {content}",
        ),
        prompts_heldout=(
            "What are the words spoken here? {content}",
            "{content} Please write out the spoken words.",
        ),
        answer=_transcript,
    )
)

# BLSP's continuation task: the response is the LLM's own continuation of the transcript.
CONTINUATION = register_task(
    TextTask(
        name="continuation",
        prompts_train=(
            "Continue the following text in a coherent and engaging style with less than 40 words. {content}",
            "Continue this text. {content}",
            "{content} Go on with the text.",
        ),
        prompts_heldout=("Write what comes next after this: {content}",),
    )
)

# Spoken-content QA: the passage is spoken, the question is text (`{question}` is filled
# from the record before the content is placed).
SPOKEN_QA = register_task(
    TextTask(
        name="spoken_qa",
        prompts_train=(
            "{content} Answer the question about what was said. {question}",
            "Listen: {content} Question: {question}",
            "{question} Answer using this passage. {content}",
        ),
        prompts_heldout=("Here is a passage. {content} Now answer: {question}",),
    )
)
