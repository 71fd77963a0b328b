"""Active sampling: draws follow P_web · M^gamma (chi-square), texts are uniform inside a cluster,
and the audio budget holds."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import chisquare

from speechlm_jax.selection import sample


def test_target_distribution():
    sizes = np.array([100, 300, 600])
    m = np.array([0.2, 0.1, 0.05])
    p = sample.target_distribution(sizes, m, gamma=5.0)
    expected = sizes * m**5 / np.sum(sizes * m**5)
    np.testing.assert_allclose(p, expected, rtol=1e-12)
    np.testing.assert_allclose(sample.target_distribution(sizes, m, gamma=0.0), sizes / sizes.sum())
    with pytest.raises(ValueError):
        sample.target_distribution(sizes, np.array([0.1, -1.0, 0.2]), 5.0)


def test_draws_follow_pweb_times_m_to_the_gamma():
    rng = np.random.default_rng(0)
    k = 6
    assignments = rng.integers(0, k, size=60_000)
    sizes = np.bincount(assignments, minlength=k)
    m = np.array([0.30, 0.25, 0.20, 0.28, 0.15, 0.22])
    p = sample.target_distribution(sizes, m, gamma=5.0)
    seconds = np.ones(len(assignments))
    selection = sample.draw(assignments, p, seconds, budget_seconds=4000, seed=1)
    counts = np.bincount(selection.clusters, minlength=k)
    assert counts.sum() == 4000
    # No cluster ran out, so every draw came from P: the chi-square test must not reject.
    assert np.all(counts < sizes)
    assert chisquare(counts, p * counts.sum()).pvalue > 0.01
    # ... and it does reject the corpus distribution (uniform sampling), which differs.
    assert chisquare(counts, sizes / sizes.sum() * counts.sum()).pvalue < 1e-6
    np.testing.assert_array_equal(assignments[selection.indices], selection.clusters)


def test_texts_uniform_inside_a_cluster_and_without_replacement():
    assignments = np.zeros(20, np.int64)
    firsts = np.zeros(20)
    for seed in range(2000):
        selection = sample.draw(assignments, np.array([1.0]), np.ones(20), budget_seconds=1, seed=seed)
        firsts[selection.indices[0]] += 1
    assert chisquare(firsts).pvalue > 0.01
    everything = sample.draw(assignments, np.array([1.0]), np.ones(20), budget_seconds=100, seed=0)
    assert sorted(everything.indices.tolist()) == list(range(20))


def test_budget_is_respected_and_exclusions_never_drawn():
    rng = np.random.default_rng(3)
    assignments = rng.integers(0, 4, size=500)
    seconds = rng.uniform(1.0, 6.0, size=500)
    exclude = list(range(0, 500, 7))
    p = np.array([0.1, 0.2, 0.3, 0.4])
    selection = sample.draw(assignments, p, seconds, budget_seconds=300.0, seed=2, exclude=exclude)
    assert selection.seconds <= 300.0
    np.testing.assert_allclose(selection.seconds, seconds[selection.indices].sum())
    assert selection.seconds > 300.0 - 6.0  # it stops only when the next text would not fit
    assert not set(selection.indices.tolist()) & set(exclude)
    assert len(set(selection.indices.tolist())) == len(selection.indices)


def test_exhausted_clusters_leave_the_distribution():
    assignments = np.array([0] * 3 + [1] * 50)
    selection = sample.draw(assignments, np.array([0.99, 0.01]), np.ones(53), budget_seconds=20, seed=0)
    assert np.sum(selection.clusters == 0) == 3 and len(selection.indices) == 20


def test_budget_in_hours_or_as_a_fraction():
    assert sample.budget_seconds(hours=0.5) == 1800.0
    assert sample.budget_seconds(fraction=0.01, stage1_seconds=360_000.0) == 3600.0
    with pytest.raises(ValueError):
        sample.budget_seconds(hours=1.0, fraction=0.01, stage1_seconds=10.0)
    np.testing.assert_allclose(sample.estimated_seconds(["a b c", "d"], 0.4), [1.2, 0.4])
