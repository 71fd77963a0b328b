"""VoiceBench's scoring rules for the subsets scored without an API judge.

VoiceBench (Chen et al. 2024, "VoiceBench: Benchmarking LLM-Based Voice Assistants") asks a
voice assistant a spoken question and scores the free-form response. The rules here follow its
evaluators, written for this codebase:

    multiple choice  openbookqa, mmsu: the response's option letter is read off by answer
                     phrases ("the answer is (b)", "option c:", "**d**", a leading "a."), the
                     first match wins; a response with no letter is given a guessed letter, as
                     VoiceBench guesses at random, but seeded by the item id so a rerun scores
                     the same. Accuracy counts guesses; `fail` is the share guessed.
    bbh              four BIG-Bench Hard tasks, read off by task family (the item id names it):
                     hyperbaton (A)/(B), sports_understanding plausible/not, navigate
                     back-at-the-start or not, web_of_lies truth/lie; then a leading or final
                     yes/no; else a seeded guess between the two answers.
    ifeval           Google's IFEval checkers through the `if-verifiable` package: per item the
                     instructions followed under the strict and the loose reading (the loose
                     one also tries the response without its first/last line and without "*");
                     the subset's score is VoiceBench's: the mean of prompt-level and
                     instruction-level accuracy, strict and loose.

VoiceBench's phrase lists were mined from particular models' outputs and run to hundreds of
entries; the extraction here is a shorter set of patterns of the same kinds, so a response
that only one of VoiceBench's model-specific phrases recognises may be guessed here instead.
SD-QA is not scored. VoiceBench scores it by a gpt-4o-mini judge and by PEDANT from `qa-metrics`
0.2.17; every `qa-metrics` release requires scikit-learn==1.3.2, which requires numpy<2, and
PEDANT's classifier (fetched from GitHub when PEDANT starts) is a scikit-learn 1.3.2 pickle that
scikit-learn 1.9 cannot unpickle, so PEDANT cannot run beside JAX's numpy 2.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from speechlm_jax.evaluation.items import pick

LETTERS = ("A", "B", "C", "D")
BBH_TASKS = ("hyperbaton", "sports_understanding", "navigate", "web_of_lies")
# BBH references: yes/no tasks as 1/0, hyperbaton's options (A)/(B) as 0/1 (VoiceBench's mapping).
BBH_REFERENCES = {"yes": 1, "no": 0, "(a)": 0, "(b)": 1}
# IFEval checkers that read NLTK data files (the punkt sentence splitter, the word tokenizer).
NLTK_INSTRUCTIONS = {
    "length_constraints:number_sentences": "tokenizers/punkt",
    "change_case:capital_word_frequency": "tokenizers/punkt_tab",
}

_TURN_MARKS = ("<1>", "<2>", "<3>")


def _clean(response: str) -> str:
    """Lower case, without the turn markers some assistants prefix or append."""
    text = response.strip().lower()
    if text.startswith(_TURN_MARKS):
        text = text[3:].strip()
    if text.endswith("<|user|>"):
        text = text[: -len("<|user|>")].strip()
    return text.replace("<|turn_end|>", "")


# --- Multiple choice (openbookqa, mmsu).

_L = r"([abcd])"
_MARKED = r"[:\s]*(?:option\s*)?[\"'*(\[\s]*"  # ": option (", "**", a quote, before the letter
# In order of trust: an explicit answer statement, then a marked letter, then a bare letter
# followed by punctuation. Each pattern's group 1 is the letter.
_MCQ_PATTERNS = [
    re.compile(p)
    for p in (
        rf"answer(?: to (?:the|this) (?:multiple-choice )?question)? (?:is|would be|should be){_MARKED}{_L}\b",
        rf"correct (?:answer|option|choice) (?:is|would be){_MARKED}{_L}\b",
        rf"(?:would|i) (?:select|choose|pick|say)[:\s]*(?:option\s*)?[\"'*(\s]*{_L}\b",
        rf"\b{_L}\b (?:is|would be) (?:the )?(?:best|correct|right) (?:answer|option|choice)",
        rf"(?:option|choice)\s*[\"'*(]*{_L}\b",
        rf"\\boxed\{{(?:\\text\{{)?{_L}\b",
        rf"\*\*\(?{_L}\b",
        rf"\({_L}\)",
        rf"[\"']{_L}[\"'.,:)]",
        rf"(?:^|\s){_L}[.,:)]",
    )
]


def extract_choice(response: str) -> str | None:
    """The option letter ("A".."D") a multiple-choice response gives, or None when it names none."""
    text = _clean(response)
    if text in ("a", "b", "c", "d"):
        return text.upper()
    for pattern in _MCQ_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).upper()
    return None


def score_choice(response: str, reference: str, *, key: str, seed: int = 0) -> dict[str, Any]:
    """{"extracted", "guessed", "correct"} of a multiple-choice response against its letter."""
    extracted = extract_choice(response)
    answer = extracted if extracted is not None else pick(LETTERS, seed, f"voicebench|{key}")
    return {
        "extracted": extracted,
        "guessed": extracted is None,
        "correct": float(answer == reference.strip().upper()),
    }


# --- BBH.


def _normalize_bbh(response: str) -> str:
    # VoiceBench's normalisation: punctuation that splits words becomes a space.
    text = _clean(response)
    for mark in (":", "**", '"', "-", ",", ".", "：", "!", "?", "'", "’"):
        text = text.replace(mark, " ")
    return " ".join(text.split())


def bbh_task(item_id: str) -> str:
    """The BBH task an item id names (`navigate_12` -> navigate); ValueError for another task."""
    for task in BBH_TASKS:
        if task in item_id:
            return task
    raise ValueError(f"BBH item id {item_id!r} names none of the tasks {BBH_TASKS}")


_HYPERBATON = [
    re.compile(p)
    for p in (
        r"(?:answer|option|sentence|order|choice) (?:is|would be)(?: option)? \(?([ab])\b",
        r"option \(?([ab])\)? (?:is|has|uses|follows)",
        r"\(([ab])\)",
        r"^([ab])\b",
    )
]
# (pattern, answer) per yes/no family; negations come before the affirmations they contain.
_YES_NO: dict[str, list[tuple[re.Pattern[str], int]]] = {
    "sports_understanding": [
        (re.compile(r"\b(?:not|isn t|is not|wasn t) (?:entirely |very |quite |really )?plausible|implausible"), 0),
        (re.compile(r"\bunlikely\b"), 0),
        (re.compile(r"\bplausible\b"), 1),
    ],
    "navigate": [
        (
            re.compile(
                r"(?:not|never|don t|do not|won t|will not|cannot|can t|haven t|didn t|did not|doesn t|does not)"
                r" (?:\w+ ){0,3}(?:return|back|end up)"
            ),
            0,
        ),
        (re.compile(r"(?:return|returned|back|end up)(?: \w+){0,3} (?:starting point|where (?:you|we|i) started)"), 1),
    ],
    "web_of_lies": [
        (
            re.compile(
                r"(?:does not|doesn t|do not|don t|not|cannot|can t) (?:\w+ ){0,2}tell(?:ing|s)? the truth"
                r"|\b(?:lies|lying|liar|tells a lie|tells the lie)\b"
            ),
            0,
        ),
        (re.compile(r"tell(?:s|ing)? the truth|\btruthful\b"), 1),
    ],
}
_ANSWER_YES_NO = re.compile(r"\banswer (?:is|would be) (yes|no)\b")


def extract_bbh(response: str, task: str) -> int | None:
    """A BBH response's answer as VoiceBench codes it (1 yes / 0 no; hyperbaton 0 (A) / 1 (B)), or None."""
    text = _normalize_bbh(response)
    if task == "hyperbaton":
        for pattern in _HYPERBATON:
            match = pattern.search(text)
            if match:
                return "ab".index(match.group(1))
        return None
    match = _ANSWER_YES_NO.search(text)
    if match:
        return int(match.group(1) == "yes")
    words = text.split()
    if words and words[0] in ("yes", "no"):
        return int(words[0] == "yes")
    for pattern, answer in _YES_NO[task]:
        if pattern.search(text):
            return answer
    if words and words[-1] in ("yes", "no"):
        return int(words[-1] == "yes")
    return None


def score_bbh(response: str, reference: str, *, key: str, seed: int = 0) -> dict[str, Any]:
    """{"extracted", "guessed", "correct"} of a BBH response; `key` is the item id (it names the task)."""
    extracted = extract_bbh(response, bbh_task(key))
    answer = extracted if extracted is not None else pick((0, 1), seed, f"voicebench|{key}")
    return {
        "extracted": extracted,
        "guessed": extracted is None,
        "correct": float(answer == BBH_REFERENCES[reference.strip().lower()]),
    }


# --- IFEval.


def missing_nltk_data(instruction_ids: Sequence[str]) -> list[str]:
    """The NLTK data packages that the checkers of `instruction_ids` need and this machine lacks."""
    import nltk

    missing = []
    for name, resource in NLTK_INSTRUCTIONS.items():
        if name in instruction_ids:
            try:
                nltk.data.find(resource)
            except LookupError:
                missing.append(resource.rsplit("/", 1)[-1])
    return sorted(set(missing))


def score_ifeval(
    response: str, *, prompt: str, instruction_ids: Sequence[str], kwargs: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Per item: instructions followed under the strict and loose readings, and whether all were.

    The response is cleaned of turn markers as VoiceBench does; an unknown instruction id is an
    error (the checker registry must know every instruction of the subset).
    """
    from if_verifiable.common import evaluate_instructions
    from if_verifiable.ifeval.instructions_registry import INSTRUCTION_DICT

    unknown = [i for i in instruction_ids if i not in INSTRUCTION_DICT]
    if unknown:
        raise ValueError(f"IFEval instruction ids unknown to if-verifiable: {unknown}")
    text = response.strip()
    if text.startswith(_TURN_MARKS):
        text = text[3:].strip()
    if text.endswith("<|user|>"):
        text = text[: -len("<|user|>")].strip()
    results, _ = evaluate_instructions(
        response=text,
        instruction_id_list=list(instruction_ids),
        kwargs_list=[dict(k) for k in kwargs],
        prompt=prompt,
        instruction_registry=INSTRUCTION_DICT,
    )
    n = len(instruction_ids)
    strict = sum(r.strict_pass for r in results)
    loose = sum(r.loose_pass for r in results)
    return {
        "instructions": n,
        "strict_followed": strict,
        "loose_followed": loose,
        "strict_prompt": float(strict == n),
        "loose_prompt": float(loose == n),
        # One number per item for per-item comparisons; the subset score is `ifeval_summary`'s.
        "correct": (float(strict == n) + float(loose == n) + strict / n + loose / n) / 4,
    }


def ifeval_summary(scores: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """VoiceBench's IFEval numbers over items: prompt- and instruction-level accuracy, strict and
    loose, and "score", their mean (fractions, not percentages)."""
    instructions = sum(s["instructions"] for s in scores)
    out = {
        "prompt_strict": sum(s["strict_prompt"] for s in scores) / len(scores),
        "instruction_strict": sum(s["strict_followed"] for s in scores) / instructions,
        "prompt_loose": sum(s["loose_prompt"] for s in scores) / len(scores),
        "instruction_loose": sum(s["loose_followed"] for s in scores) / instructions,
    }
    out["score"] = sum(out.values()) / 4
    return out
