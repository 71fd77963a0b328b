"""Balanced k-means: sizes within the tolerance, deterministic under a seed, mesh-invariant, and
equal to scikit-learn's k-means where balance costs nothing."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from speechlm_jax.selection import kmeans
from speechlm_jax.sharding import make_mesh


def _blobs(sizes: list[int], dim: int = 8, seed: int = 0, spread: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(len(sizes), dim)) * spread
    points = np.concatenate([c + rng.normal(size=(n, dim)) for c, n in zip(centers, sizes)]).astype(np.float32)
    labels = np.repeat(np.arange(len(sizes)), sizes)
    return points, labels


@pytest.mark.parametrize("tolerance", [0.0, 0.1, 0.3])
def test_sizes_within_tolerance_on_unbalanced_data(tolerance):
    points, _ = _blobs([8, 20, 40, 60, 100, 172])  # very unequal natural clusters
    result = kmeans.balanced_kmeans(points, 8, tolerance=tolerance, seed=1)
    lower, upper = kmeans.size_bounds(len(points), 8, tolerance)
    assert lower >= int(400 / 8 * (1 - tolerance)) - 1 and upper <= int(np.ceil(400 / 8 * (1 + tolerance)))
    assert result.sizes.sum() == len(points) and np.all(result.assignments >= 0)
    assert result.sizes.min() >= lower and result.sizes.max() <= upper, (result.sizes, lower, upper)
    np.testing.assert_array_equal(result.sizes, np.bincount(result.assignments, minlength=8))


def test_bounds_with_uneven_division():
    assert kmeans.size_bounds(10, 4, 0.0) == (2, 3)
    points, _ = _blobs([3, 3, 4], dim=4)
    result = kmeans.balanced_kmeans(points, 4, tolerance=0.0, seed=0)
    assert sorted(result.sizes) == [2, 2, 3, 3]


def test_deterministic_under_a_seed():
    points, _ = _blobs([30, 50, 70, 50], seed=3)
    a = kmeans.balanced_kmeans(points, 6, tolerance=0.1, seed=7)
    b = kmeans.balanced_kmeans(points, 6, tolerance=0.1, seed=7)
    np.testing.assert_array_equal(a.assignments, b.assignments)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    c = kmeans.balanced_kmeans(points, 6, tolerance=0.1, seed=8)
    assert c.sizes.max() <= kmeans.size_bounds(200, 6, 0.1)[1]


def test_equals_sklearn_kmeans_on_separated_equal_blobs():
    points, labels = _blobs([50, 50, 50, 50], seed=2, spread=10.0)
    ours = kmeans.balanced_kmeans(points, 4, tolerance=0.0, seed=0)
    reference = KMeans(4, n_init=10, random_state=0).fit(points)
    assert adjusted_rand_score(reference.labels_, ours.assignments) == 1.0
    assert adjusted_rand_score(labels, ours.assignments) == 1.0
    np.testing.assert_allclose(ours.inertia, reference.inertia_, rtol=1e-4)


def test_assignment_is_nearest_centroid_when_capacity_allows():
    points, _ = _blobs([40, 40], dim=4, seed=5)
    centroids = points[[0, 79]]
    assign = np.asarray(kmeans.balanced_assign(points, centroids, 0, len(points)))
    nearest = np.argmin(((points[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(assign, nearest)


def test_sharded_points_give_the_single_device_result():
    points, _ = _blobs([24, 40, 16, 48], seed=4)
    one = kmeans.balanced_kmeans(points, 4, tolerance=0.05, seed=3)
    mesh = make_mesh({"data": 8}, jax.devices()[:8])
    eight = kmeans.balanced_kmeans(points, 4, tolerance=0.05, seed=3, mesh=mesh)
    np.testing.assert_array_equal(one.assignments, eight.assignments)
    np.testing.assert_allclose(one.centroids, eight.centroids, rtol=1e-5, atol=1e-5)
