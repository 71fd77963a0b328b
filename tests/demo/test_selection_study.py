"""The selection study's parts: the under-covered domain, the paired statistics and the tables."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from speechlm_jax import cli
from speechlm_jax.demo import build
from speechlm_jax.demo import selection_study as study
from speechlm_jax.toyworld.sentences import sentences

METRICS = [k for k, _ in study.METRICS]


def test_about_reads_the_kind_of_every_noun():
    assert study.about("the old girl holds three grey apples", "food")
    assert study.about("the old girl holds three grey apples", "person")
    assert not study.about("a donkey runs near the river", "food")


def test_speech_without_a_domain_keeps_the_rest_pointing_at_their_audio(tmp_path):
    folder = tmp_path / "speech"
    (folder / "audio").mkdir(parents=True)
    rows = [
        {"id": "a", "audio": "audio/a.flac", "text": "the cat eats a cake"},
        {"id": "b", "audio": "audio/b.flac", "text": "the dog runs"},
        {"id": "c", "audio": str(folder / "audio" / "c.flac"), "text": "two pigs sleep"},
    ]
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "subset" / "manifest.jsonl"
    assert study.write_speech_without(manifest, out, "food") == {"kept": 2, "dropped": 1}
    kept = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in kept] == ["b", "c"]
    assert [r["audio"] for r in kept] == [str(folder / "audio" / "b.flac"), str(folder / "audio" / "c.flac")]
    with pytest.raises(cli.UsageError, match="need some of each"):
        study.write_speech_without(manifest, out, "thing")


def test_web_corpus_leaves_out_the_stage1_transcripts(tmp_path, monkeypatch):
    seen = set(sentences("train", 20, seed=4)[:10])
    path = build.write_web_corpus(tmp_path / "web.jsonl", seen, 30, seed=4)
    texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    assert len(texts) == len(set(texts)) == 30 and not seen & set(texts)
    # A world with fewer sentences than asked: refused, nothing written.
    monkeypatch.setattr(build.toy_sentences, "sentences", lambda split, n, seed: sorted(seen))
    with pytest.raises(ValueError, match="ask fewer"):
        build.write_web_corpus(tmp_path / "small.jsonl", {sorted(seen)[0]}, 10)
    assert not (tmp_path / "small.jsonl").exists()


def test_paired_test_is_scipys_paired_t_test():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=8), rng.normal(size=8) + 0.5
    t = study.paired_test(a, b, lower_is_better=True)
    assert t["p"] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert t["mean_difference"] == pytest.approx(float(np.mean(a - b)))
    assert t["wins"] == int((a < b).sum()) and t["wins"] + t["losses"] == 8
    # Against one value for every seed: the one-sample test; accuracies count higher as better.
    one = study.paired_test(a, 0.1, lower_is_better=False)
    assert one["p"] == pytest.approx(stats.ttest_1samp(a, 0.1).pvalue, rel=1e-12)
    assert one["wins"] == int((a > 0.1).sum())
    assert math.isnan(study.paired_test([1.0, 2.0], [0.0, 1.0], lower_is_better=True)["p"])  # no spread


def _arms(seeds: int, shift: float) -> dict[str, dict[str, list[float]]]:
    rng = np.random.default_rng(1)
    arms = {}
    for gamma, delta in ((0.0, 0.0), (1.0, shift / 2), (5.0, shift)):
        arms[f"gamma={gamma:g}"] = {
            "heldout_M": list(3.0 - delta + 0.01 * rng.normal(size=seeds)),
            "heldout_M_under_covered": list(3.5 - delta + 0.01 * rng.normal(size=seeds)),
            "heldout_F": list(0.05 + 0.001 * rng.normal(size=seeds)),
            "speech_acc_heldout_tasks": list(0.7 + delta / 10 + 0.002 * rng.normal(size=seeds)),
            "speech_acc_seen": list(0.8 + 0.002 * rng.normal(size=seeds)),
        }
    return arms


def test_analyse_finds_a_real_difference_and_not_a_null_one():
    none = {"heldout_M": 3.1, "heldout_M_under_covered": 3.6, "heldout_F": 0.04}
    none |= {"speech_acc_heldout_tasks": 0.69, "speech_acc_seen": 0.8}
    better = study.analyse(none, _arms(8, 0.2), [0.0, 1.0, 5.0])
    assert better["seeds"] == 8 and better["target_met"]
    t = better["tests"]["heldout_M"]["active_vs_uniform"]
    assert t["mean_difference"] == pytest.approx(-0.2, abs=0.02) and t["p"] < 1e-6 and t["wins"] == 8
    assert better["arms"]["gamma=5"]["heldout_M"]["sd"] == pytest.approx(
        np.std(better["arms"]["gamma=5"]["heldout_M"]["values"], ddof=1)
    )
    null = study.analyse(none, _arms(8, 0.0), [0.0, 1.0, 5.0])
    assert not null["target_met"] and null["tests"]["heldout_M"]["active_vs_uniform"]["p"] > 0.01

    text = study.markdown(better | {"steps": 100, "budget_fraction": 0.1, "under_covered": "food"})
    assert "| uniform (gamma=0) |" in text and "| active (gamma=5) |" in text and "| gamma=1 |" in text
    assert "| no stage 2 | 3.1000 |" in text and "8 of 8" in text


def test_the_command_refuses_a_demo_folder_that_is_not_built(tmp_path: Path):
    """As a user runs it: a clear message and exit status 2, and nothing written."""
    out = tmp_path / "study"
    done = subprocess.run(
        [sys.executable, "-m", "speechlm_jax.demo.selection_study", "--demo", str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr
    assert "is not built (run `make demo` first)" in done.stderr and not out.exists()
    bad = subprocess.run(
        [sys.executable, "-m", "speechlm_jax.demo.selection_study", "--out", str(out), "--gammas", "1,5"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert bad.returncode == 2 and "need 0 (uniform)" in bad.stderr and not out.exists()
