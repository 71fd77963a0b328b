"""VoiceBench's answer extraction and scoring (`evaluation.voicebench_rules`), IFEval through if-verifiable."""

import pytest

from speechlm_jax.evaluation import voicebench_rules as rules


@pytest.mark.parametrize(
    "response, letter",
    [
        ("B", "B"),
        ("c.", "C"),
        ("The answer is (D).", "D"),
        ("the correct answer is b, because plants need light", "B"),
        ("I would choose option A: the sun.", "A"),
        ("After thinking about it, **C** is right.", "C"),
        ("Answer: \\boxed{D}", "D"),
        ("<1> a) the moon", "A"),
        ("Option B is the best answer here.", "B"),
        ("I am not sure which one applies.", None),
        ("", None),
    ],
)
def test_multiple_choice_letter_is_read_off_the_response(response, letter):
    assert rules.extract_choice(response) == letter


def test_a_response_without_a_letter_is_guessed_the_same_on_every_run():
    first = rules.score_choice("no idea", "A", key="openbookqa/7", seed=0)
    assert first["guessed"] and first["extracted"] is None
    assert rules.score_choice("no idea", "A", key="openbookqa/7", seed=0) == first
    guesses = {rules.score_choice("no idea", "A", key=f"mmsu/law/{i}")["correct"] for i in range(40)}
    assert guesses == {0.0, 1.0}  # a guess, not always wrong (VoiceBench guesses at random)
    assert rules.score_choice("The answer is A.", "a", key="x") == {"extracted": "A", "guessed": False, "correct": 1.0}


@pytest.mark.parametrize(
    "response, task, answer",
    [
        ("The answer is (B).", "hyperbaton", 1),
        ("(A) follows the usual adjective order.", "hyperbaton", 0),
        ("a", "hyperbaton", 0),
        ("No, that sentence is not plausible.", "sports_understanding", 0),
        ("This sentence is implausible since he plays hockey", "sports_understanding", 0),
        ("The sentence is plausible.", "sports_understanding", 1),
        ("Following these steps, you do not return to the starting point.", "navigate", 0),
        ("After all moves we end up back at the starting point", "navigate", 1),
        ("So Delfina lies.", "web_of_lies", 0),
        ("Therefore, Osvaldo does not tell the truth.", "web_of_lies", 0),
        ("Hence Millie tells the truth.", "web_of_lies", 1),
        ("Let me think ... so the answer is yes", "navigate", 1),
        ("I cannot decide.", "web_of_lies", None),
    ],
)
def test_bbh_answers_are_read_off_by_task_family(response, task, answer):
    assert rules.extract_bbh(response, task) == answer


def test_bbh_scores_against_voicebench_references_and_names_the_task_from_the_id():
    assert rules.score_bbh("(B)", "(B)", key="hyperbaton_3")["correct"] == 1.0
    assert rules.score_bbh("Yes.", "no", key="sports_understanding_1")["correct"] == 0.0
    assert rules.score_bbh("yes", "Yes", key="web_of_lies_9")["correct"] == 1.0
    with pytest.raises(ValueError, match="names none of the tasks"):
        rules.bbh_task("date_understanding_1")


def test_ifeval_strict_and_loose_readings_with_the_real_checkers():
    ids = ("detectable_format:json_format", "punctuation:no_comma")
    kwargs = ({}, {})
    # A preamble line breaks the JSON for the strict reading; the loose one drops the first line.
    got = rules.score_ifeval('Sure here it is\n{"name": "cat"}', prompt="p", instruction_ids=ids, kwargs=kwargs)
    assert (got["strict_followed"], got["loose_followed"], got["instructions"]) == (1, 2, 2)
    assert (got["strict_prompt"], got["loose_prompt"]) == (0.0, 1.0)
    followed = rules.score_ifeval('{"name": "cat"}', prompt="p", instruction_ids=ids, kwargs=kwargs)
    failed = rules.score_ifeval('{"name": "cat", "a": 1}', prompt="p", instruction_ids=ids, kwargs=kwargs)
    assert followed["correct"] == 1.0 and failed["strict_followed"] == 1  # the comma breaks no_comma
    keyword = rules.score_ifeval(
        "The ocean is wide.",
        prompt="p",
        instruction_ids=("keywords:existence",),
        kwargs=({"keywords": ["ocean"]},),
    )
    assert keyword["strict_prompt"] == 1.0
    assert rules.score_ifeval("   ", prompt="p", instruction_ids=ids, kwargs=kwargs)["loose_followed"] == 0


def test_ifeval_summary_is_voicebench_mean_of_prompt_and_instruction_accuracy():
    scores = [
        {"instructions": 2, "strict_followed": 1, "loose_followed": 2, "strict_prompt": 0.0, "loose_prompt": 1.0},
        {"instructions": 1, "strict_followed": 1, "loose_followed": 1, "strict_prompt": 1.0, "loose_prompt": 1.0},
    ]
    got = rules.ifeval_summary(scores)
    assert got["prompt_strict"] == 0.5 and got["instruction_strict"] == pytest.approx(2 / 3)
    assert got["prompt_loose"] == 1.0 and got["instruction_loose"] == 1.0
    assert got["score"] == pytest.approx((0.5 + 2 / 3 + 1 + 1) / 4)


def test_an_unknown_ifeval_instruction_is_an_error():
    with pytest.raises(ValueError, match="unknown to if-verifiable"):
        rules.score_ifeval("x", prompt="p", instruction_ids=("nope:never",), kwargs=({},))
