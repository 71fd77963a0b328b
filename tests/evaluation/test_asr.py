"""WER with jiwer after normalisation; generative metrics."""

import jiwer
import pytest

from speechlm_jax.evaluation.asr import normalize_text, word_error_rate
from speechlm_jax.evaluation.gap import score_answer


def test_normalize_text():
    assert normalize_text("  Hello, World!  It's   FINE. ") == "hello world it's fine"
    assert normalize_text("'quoted' — dash") == "quoted dash"
    assert normalize_text("ＦＵＬＬ width") == "full width"


def test_wer_equals_jiwer_on_normalised_text():
    refs = ["THE CAT SAT ON THE MAT", "A dog runs.", "two birds sing"]
    hyps = ["the cat sat on mat", "a dog, runs", "two words sing loudly"]
    out = word_error_rate(refs, hyps)
    expected = jiwer.wer([normalize_text(r) for r in refs], [normalize_text(h) for h in hyps])
    assert out["wer"] == pytest.approx(expected)
    assert out["words"] == 12 and out["deletions"] == 1 and out["substitutions"] == 1 and out["insertions"] == 1
    assert word_error_rate(["Same words."], ["same words"])["wer"] == 0.0
    with pytest.raises(ValueError, match="references but"):
        word_error_rate(["a"], [])


def test_score_answer_metrics():
    assert score_answer("Red.", "red", "exact_match") == 1.0
    assert score_answer("red car", "red", "exact_match") == 0.0
    assert score_answer("it is red car", "red car", "contains") == 1.0
    assert score_answer("bored", "red", "contains") == 0.0
    assert score_answer("the red car", "a red car", "word_f1") == pytest.approx(2 / 3)
    assert score_answer("", "", "word_f1") == 1.0
