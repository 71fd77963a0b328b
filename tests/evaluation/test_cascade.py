"""The cascade baseline and the connector's CTC transcripts (`evaluation.cascade`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from speechlm_jax.data.tasks import get_task
from speechlm_jax.evaluation import cascade
from speechlm_jax.evaluation.gap import run_gap
from speechlm_jax.evaluation.items import task_items
from speechlm_jax.evaluation.scoring import OracleSpeech, Scorer
from speechlm_jax.losses.ctc import ctc_greedy_decode
from speechlm_jax.models.frontend import audio_token_count
from speechlm_jax.toyworld.sentences import sentences


@pytest.fixture(scope="module")
def tok(tmp_path_factory, toy_tokenizer):
    return toy_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture
def scorer(tok, toy_speechlm, toy_downsample):
    # Silent clips one audio frame per transcript token: a fixed, cheap speech source.
    return Scorer(
        toy_speechlm(tok),
        tok,
        downsample=toy_downsample,
        speech=OracleSpeech(tok, toy_downsample),
        batch_size=4,
        length_multiple=64,
    )


def _items():
    return [
        it
        for name in ("first_word", "has_place")
        for it in task_items(get_task(name), sentences("heldout", 3, seed=1), prompt_split="train")
    ]


def test_transcribe_is_the_greedy_ctc_decode_of_the_heads_logits(scorer, tok):
    waveforms = [scorer.speech.waveform(s, None) for s in sentences("heldout", 5, seed=2)]
    got = cascade.transcribe(scorer, waveforms, blank_id=0)
    samples = max(len(w) for w in waveforms)
    samples = -(-samples // scorer.sample_multiple) * scorer.sample_multiple
    audio = np.zeros((len(waveforms), samples), np.int16)
    for i, w in enumerate(waveforms):
        audio[i, : len(w)] = w
    lens = jnp.asarray([len(w) for w in waveforms])
    model = scorer.model
    embeds, mask = model.project_audio(jnp.asarray(audio), lens)
    logits = model.llm.logits(model.llm.norm(embeds))
    ids = np.asarray(
        ctc_greedy_decode(logits, mask, blank_id=0, max_labels=audio_token_count(samples, scorer.downsample))
    )
    assert got == [tok.decode([int(t) for t in row if t >= 0]).strip() for row in ids]


def test_a_perfect_transcript_makes_the_cascade_the_text_upper_bound(scorer, monkeypatch):
    items = _items()
    monkeypatch.setattr(cascade, "transcribe", lambda s, waveforms, blank_id: [it.question for it in items])
    result = cascade.run_cascade(scorer, items, blank_id=0, max_new_tokens=6)
    text = run_gap(scorer, items, max_new_tokens=6)
    assert result["overall"]["wer"] == 0.0
    assert result["overall"]["cascade"] == text["overall"]["text"]
    assert [r["cascade"] for r in result["items"]] == [r["text"] for r in text["items"]]
    assert all(r["transcript"] == r["reference"] for r in result["items"])


def test_an_empty_transcript_scores_every_word_as_deleted(scorer, monkeypatch):
    items = _items()[:3]
    monkeypatch.setattr(cascade, "transcribe", lambda s, waveforms, blank_id: [""] * len(waveforms))
    result = cascade.run_cascade(scorer, items, blank_id=0, max_new_tokens=4)
    assert result["overall"]["wer"] == 1.0 and result["overall"]["items"] == 3


def test_the_cascade_needs_a_speech_llm(tok, toy_base_llm):
    with pytest.raises(ValueError, match="needs a speech LLM"):
        cascade.transcribe(Scorer(toy_base_llm(tok), tok), [np.zeros(3200, np.int16)], blank_id=0)
