"""Probing: per-cluster misalignment from TTS probe sets equals the evaluation harness's M on
each cluster's texts, is 0 under the oracle speech, and resumes cluster by cluster."""

from __future__ import annotations

import json

import numpy as np
import pytest

from speechlm_jax.evaluation.diagnostics import run_diagnostics
from speechlm_jax.evaluation.scoring import OracleSpeech, Scorer, oracle_audio
from speechlm_jax.selection import probe
from speechlm_jax.toyworld.sentences import sentences

TEXTS = sentences("train", 8, seed=4)
ASSIGNMENTS = np.array([0, 1, 2, 0, 1, 2, 0, 1])


@pytest.fixture(scope="module")
def tok(tmp_path_factory, toy_tokenizer):
    return toy_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def model(tok, toy_speechlm):
    return toy_speechlm(tok, seed=3)


def _scorer(model, tok, speech, downsample, **kwargs):
    return Scorer(model, tok, downsample=downsample, speech=speech, batch_size=4, length_multiple=32, **kwargs)


def test_choose_probes_is_seeded_and_inside_clusters():
    a = probe.choose_probes(ASSIGNMENTS, 3, 2, seed=0)
    assert a == probe.choose_probes(ASSIGNMENTS, 3, 2, seed=0)
    assert all(len(v) == 2 and all(ASSIGNMENTS[i] == c for i in v) for c, v in a.items())
    assert probe.choose_probes(ASSIGNMENTS, 3, 10, seed=0)[2] == [2, 5]


def test_cluster_misalignment_equals_the_harness_per_cluster(model, tok, toy_downsample, tmp_path):
    probes = probe.choose_probes(ASSIGNMENTS, 3, 2, seed=1)
    manifest = probe.synthesize_probes(
        {i: TEXTS[i] for v in probes.values() for i in v}, tmp_path / "speech", prefix_fraction=0.5
    )
    speech = probe.ManifestSpeech(manifest)
    scores = probe.score_clusters(
        _scorer(model, tok, speech, toy_downsample), probes, TEXTS, tmp_path, prefix_fraction=0.5, clusters_per_chunk=2
    )
    assert speech.misses == 0  # every spoken prefix came from the synthesised probe set
    ours = probe.cluster_misalignment(scores, 3)
    # The harness on the same recorded probes: eSpeak NG's output depends on the voice state earlier
    # callers in the process left (rate, pitch), so speaking the texts anew is not bitwise the same audio.
    live = _scorer(model, tok, probe.ManifestSpeech(manifest), toy_downsample)
    for c, indices in probes.items():
        # Batched with other texts (other padding), the float32 sums agree to 1e-4 (or 1e-6 absolute).
        reference = run_diagnostics(live, [TEXTS[i] for i in indices], prefix_fraction=0.5)
        np.testing.assert_allclose(
            ours["misalignment"][c], reference["misalignment"]["per_token"], rtol=1e-4, atol=1e-6
        )
        np.testing.assert_allclose(
            ours["misalignment_per_sequence"][c], reference["misalignment"]["per_sequence"], rtol=1e-4, atol=1e-6
        )
        assert ours["misalignment"][c] > 0
    assert ours["probes"] == [2, 2, 2]


def test_oracle_speech_gives_zero_misalignment(model, tok, toy_downsample, tmp_path):
    probes = probe.choose_probes(ASSIGNMENTS, 3, 2, seed=1)
    scorer = _scorer(model, tok, OracleSpeech(tok, toy_downsample), toy_downsample, embedder=oracle_audio)
    result = probe.cluster_misalignment(probe.score_clusters(scorer, probes, TEXTS, tmp_path), 3)
    np.testing.assert_allclose(result["misalignment"], 0.0, atol=1e-6)


def test_scoring_resumes_with_the_first_unscored_cluster(model, tok, toy_downsample, tmp_path):
    probes = probe.choose_probes(ASSIGNMENTS, 3, 2, seed=1)
    scorer = _scorer(model, tok, OracleSpeech(tok, toy_downsample), toy_downsample, embedder=oracle_audio)
    path = probe.score_clusters(
        scorer, {0: probes[0]}, TEXTS, tmp_path, clusters_per_chunk=1
    )  # interrupted after cluster 0
    calls = []
    original = scorer.divergences
    scorer.divergences = lambda prepared: calls.append(len(prepared)) or original(prepared)
    probe.score_clusters(scorer, probes, TEXTS, tmp_path, clusters_per_chunk=1)
    assert calls == [2, 2]
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert sorted((r["cluster"], r["index"]) for r in rows) == sorted((c, i) for c, v in probes.items() for i in v)


def test_spoken_prefix_matches_the_harness_segments(tok, toy_speechlm, toy_downsample):
    scorer = _scorer(toy_speechlm(tok), tok, OracleSpeech(tok, toy_downsample), toy_downsample)
    from speechlm_jax.data.examples import Audio
    from speechlm_jax.evaluation.diagnostics import corpus_segments

    for text in TEXTS:
        for fraction in (0.3, 0.5, 1.0):
            audio = [s for s in corpus_segments(scorer, text, fraction) if isinstance(s, Audio)]
            assert " ".join(s.transcript.strip() for s in audio) == probe.spoken_prefix(text, fraction)
