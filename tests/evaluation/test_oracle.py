"""The oracle: speech embeddings that are the transcript's own token embeddings.

The student then sees exactly what the teacher reads, so a harness that measures what it
says must report gap 0 and M = 0 (and F = 0 while the adapter is the identity).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechlm_jax.data.tasks import get_task
from speechlm_jax.evaluation.diagnostics import run_diagnostics
from speechlm_jax.evaluation.gap import run_gap
from speechlm_jax.evaluation.items import Item, task_items
from speechlm_jax.evaluation.retention import run_retention
from speechlm_jax.evaluation.scoring import OracleSpeech, Scorer, oracle_audio
from speechlm_jax.toyworld.sentences import sentences


@pytest.fixture(scope="module")
def tok(tmp_path_factory, toy_tokenizer):
    return toy_tokenizer(tmp_path_factory.mktemp("tok"))


def oracle_scorer(tok, model, downsample, **kwargs):
    return Scorer(
        model,
        tok,
        downsample=downsample,
        speech=OracleSpeech(tok, downsample),
        embedder=oracle_audio,
        batch_size=4,
        length_multiple=64,
        **kwargs,
    )


def toy_items(n: int = 3) -> list[Item]:
    texts = sentences("heldout", n, seed=1)
    generative = [
        it for name in ("first_word", "has_place") for it in task_items(get_task(name), texts, prompt_split="train")
    ]
    choice = [
        Item(
            id=f"mc-{i}",
            task="mc_colour",
            question=s,
            choices=("red", "blue", "no colour at all"),
            answer="red",
            prompt="which colour is in {content}",
        )
        for i, s in enumerate(texts)
    ]
    return generative + choice


def test_oracle_gap_is_zero(tok, toy_speechlm, toy_downsample):
    scorer = oracle_scorer(tok, toy_speechlm(tok), toy_downsample)
    items = toy_items()
    result = run_gap(scorer, items, max_new_tokens=6)
    assert result["conditions"] == ["text", "speech"]
    assert result["overall"]["gap"] == 0.0
    assert all(scores["gap"] == 0.0 for scores in result["tasks"].values())
    assert set(result["tasks"]) == {"first_word", "has_place", "mc_colour"}
    for record in result["items"]:
        assert record["speech"] == record["text"]
    # The random model does answer something: the decoder ran and the MC picks differ by item.
    assert any(r["text"] for r in result["items"] if r["task"] == "first_word")


def test_oracle_option_logliks_match_and_equal_the_llm_reference(tok, toy_speechlm, toy_downsample):
    model = toy_speechlm(tok)
    scorer = oracle_scorer(tok, model, toy_downsample)
    items = toy_items(2)[-2:]
    out = scorer.option_logliks(items, ("text", "speech", "text_adapted"))
    for text, speech, adapted in zip(out["text"], out["speech"], out["text_adapted"]):
        np.testing.assert_allclose(speech, text, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(adapted, text, rtol=1e-5, atol=1e-5)
    # Reference: log-softmax of the plain LLM's logits over the option's tokens.
    item, choice = items[0], items[0].choices[2]
    example = scorer.prepare(scorer.segments(item, spoken=False, response=choice)).example
    logits = model.llm(jnp.asarray(example.teacher_tokens)[None], lora=False)[0]
    logp = jax.nn.log_softmax(logits, axis=-1)
    n = len(tok.encode(choice))
    mask = example.teacher_loss_mask > 0
    assert mask.sum() == n
    expected = float(
        jnp.sum(jnp.take_along_axis(logp, jnp.asarray(example.teacher_targets)[:, None], axis=1)[:, 0][mask])
    )
    np.testing.assert_allclose(out["text"][0][2], [expected, n], rtol=1e-5)


def test_oracle_misalignment_and_forgetting_are_zero(tok, toy_speechlm, toy_downsample):
    model = toy_speechlm(tok)
    texts = sentences("train", 5, seed=2)
    result = run_diagnostics(oracle_scorer(tok, model, toy_downsample), texts)
    assert result["misalignment"]["tokens"] > 0 and result["forgetting"]["tokens"] > 0
    assert abs(result["misalignment"]["per_token"]) < 1e-6
    assert abs(result["forgetting"]["per_token"]) < 1e-6
    # A non-zero adapter moves both (the diagnostics are not trivially zero).
    lora_b = model.llm.layers[0].mlp.up_proj.lora_b
    lora_b[...] = jnp.full_like(lora_b[...], 0.5)
    moved = run_diagnostics(oracle_scorer(tok, model, toy_downsample), texts)
    assert moved["misalignment"]["per_token"] > 1e-4
    assert moved["forgetting"]["per_token"] > 1e-4


def test_retention_of_an_identity_adapter_is_full(tok, toy_speechlm, toy_downsample):
    result = run_retention(oracle_scorer(tok, toy_speechlm(tok), toy_downsample), toy_items(2), max_new_tokens=4)
    assert result["overall"]["drop"] == 0.0


def test_base_llm_reports_text_only(tok, toy_base_llm):
    scorer = Scorer(toy_base_llm(tok), tok, batch_size=4, length_multiple=64)
    result = run_gap(scorer, toy_items(2), max_new_tokens=4)
    assert result["conditions"] == ["text"] and "gap" not in result["overall"]
    with pytest.raises(ValueError, match="SpeechLM"):
        scorer.option_logliks(toy_items(1)[-1:], ("speech",))
