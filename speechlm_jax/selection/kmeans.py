"""Balanced k-means on the accelerator: SALAD's K text clusters of near-equal size.

Lloyd's algorithm with a size-constrained assignment step. With N points, K clusters and
a tolerance `tol`, every cluster ends with between

    lower = floor(N / K * (1 - tol))   and   upper = max(ceil(N / K), floor(N / K * (1 + tol)))

points (`size_bounds`). The assignment is a capacity-constrained greedy by distance,
run as a few vectorised "proposal rounds" (a deferred-acceptance scheme):

    every unassigned point proposes to its nearest cluster that still has room;
    every cluster accepts its closest proposers up to its remaining room;
    repeat until no point is left (or, in the first phase, no cluster has room).

Each round either accepts every proposer or fills at least one cluster, so a phase ends
within K + 1 rounds. Phase 1 gives every cluster room `lower` (sum <= N: each cluster is
filled to its guaranteed minimum with its closest proposers); phase 2 places the rest
with room `upper - lower` (sum >= N). Sizes therefore always lie in [lower, upper].

Distances are squared Euclidean from one matmul ([N, D] x [D, K]) under `jax.jit`;
ties fall to the lower index (stable sorts), and the initial centroids come from
k-means++ seeded by `seed`, so a fit is deterministic under its seed on a given backend.
Points may be placed sharded over the mesh's batch axes (`batch_sharding`); XLA then
partitions the distance matmul and gathers for the sorts.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from speechlm_jax.sharding import batch_sharding


@dataclasses.dataclass(frozen=True)
class KMeansResult:
    """centroids [K, D] float32, assignments [N] int32, sizes [K], the iterations run, the final inertia."""

    centroids: np.ndarray
    assignments: np.ndarray
    sizes: np.ndarray
    iterations: int
    inertia: float


def size_bounds(num_points: int, num_clusters: int, tolerance: float) -> tuple[int, int]:
    """(lower, upper) cluster sizes that a balanced fit guarantees (see the module docstring)."""
    if num_clusters < 1 or num_points < num_clusters:
        raise ValueError(f"need at least one point per cluster: {num_points} points, {num_clusters} clusters")
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    mean = num_points / num_clusters
    lower = math.floor(mean * (1.0 - tolerance) + 1e-9) if tolerance < 1 else 0
    upper = max(math.ceil(mean - 1e-9), math.floor(mean * (1.0 + tolerance) + 1e-9))
    return max(lower, 0), upper


def sq_distances(points: jax.Array, centroids: jax.Array) -> jax.Array:
    """Squared Euclidean distances [N, K] of points [N, D] to centroids [K, D]."""
    p2 = jnp.sum(points * points, axis=1, keepdims=True)
    c2 = jnp.sum(centroids * centroids, axis=1)[None, :]
    return jnp.maximum(p2 - 2.0 * points @ centroids.T + c2, 0.0)


def _fill(dist: jax.Array, assign: jax.Array, room: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Proposal rounds until every point is placed or no cluster has room: (assign [N], room [K])."""
    n, k = dist.shape
    index = jnp.arange(n)

    def pending(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
        assign, room, rounds = state
        return jnp.any(assign < 0) & jnp.any(room > 0) & (rounds <= k + 1)

    def round_(state: tuple[jax.Array, jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array, jax.Array]:
        assign, room, rounds = state
        free = assign < 0
        masked = jnp.where(room[None, :] > 0, dist, jnp.inf)
        choice = jnp.where(free, jnp.argmin(masked, axis=1), k)  # k: not proposing
        choice_dist = jnp.take_along_axis(masked, jnp.minimum(choice, k - 1)[:, None], axis=1)[:, 0]
        order = jnp.lexsort((index, choice_dist, choice))  # by cluster, then distance, then index
        sorted_choice = choice[order]
        rank = jnp.arange(n) - jnp.searchsorted(sorted_choice, sorted_choice, side="left")
        room_of = jnp.concatenate([room, jnp.zeros((1,), room.dtype)])[sorted_choice]
        accepted_sorted = (sorted_choice < k) & (rank < room_of)
        accepted = jnp.zeros((n,), bool).at[order].set(accepted_sorted)
        assign = jnp.where(accepted, choice, assign)
        taken = jnp.zeros((k + 1,), room.dtype).at[choice].add(accepted.astype(room.dtype))[:k]
        return assign, room - taken, rounds + 1

    assign, room, _ = jax.lax.while_loop(pending, round_, (assign, room, jnp.int32(0)))
    return assign, room


@jax.jit
def balanced_assign(
    points: jax.Array, centroids: jax.Array, lower: jax.Array | int, upper: jax.Array | int
) -> jax.Array:
    """Cluster of every point [N] int32, each cluster holding between `lower` and `upper` points.

    The bounds are traced, not static: one compiled program serves every tolerance.
    """
    dist = sq_distances(points, centroids)
    n, k = dist.shape
    assign = jnp.full((n,), -1, jnp.int32)
    lower = jnp.asarray(lower, jnp.int32)
    assign, _ = _fill(dist, assign, jnp.full((k,), lower, jnp.int32))
    assign, _ = _fill(dist, assign, jnp.full((k,), jnp.asarray(upper, jnp.int32) - lower, jnp.int32))
    return assign


@partial(jax.jit, static_argnames=("num_clusters",))
def update_centroids(points: jax.Array, assign: jax.Array, previous: jax.Array, *, num_clusters: int) -> jax.Array:
    """Mean of each cluster's points [K, D]; a cluster left empty keeps its previous centroid."""
    sums = jax.ops.segment_sum(points, assign, num_segments=num_clusters)
    counts = jax.ops.segment_sum(jnp.ones_like(assign, points.dtype), assign, num_segments=num_clusters)
    return jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], previous)


@jax.jit
def inertia(points: jax.Array, centroids: jax.Array, assign: jax.Array) -> jax.Array:
    """Sum of squared distances of the points to their centroids."""
    return jnp.sum((points - centroids[assign]) ** 2)


@partial(jax.jit, static_argnames=("num_clusters",))
def kmeans_plus_plus(points: jax.Array, key: jax.Array, *, num_clusters: int) -> jax.Array:
    """k-means++ initial centroids [K, D]: each next one drawn with probability ∝ squared distance."""
    n = points.shape[0]
    first = jax.random.randint(jax.random.fold_in(key, 0), (), 0, n)
    centroids = jnp.zeros((num_clusters, points.shape[1]), points.dtype).at[0].set(points[first])
    nearest = jnp.sum((points - points[first]) ** 2, axis=1)

    def body(i: jax.Array, state: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        centroids, nearest = state
        total = jnp.sum(nearest)
        logits = jnp.where(total > 0, jnp.log(jnp.maximum(nearest, 1e-30)), 0.0)
        pick = jax.random.categorical(jax.random.fold_in(key, i), logits)
        centroids = centroids.at[i].set(points[pick])
        nearest = jnp.minimum(nearest, jnp.sum((points - points[pick]) ** 2, axis=1))
        return centroids, nearest

    centroids, _ = jax.lax.fori_loop(1, num_clusters, body, (centroids, nearest))
    return centroids


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (spherical k-means on text embeddings)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def balanced_kmeans(
    points: np.ndarray,
    num_clusters: int,
    *,
    tolerance: float = 0.05,
    iterations: int = 25,
    seed: int = 0,
    mesh: Mesh | None = None,
) -> KMeansResult:
    """Fits balanced k-means to points [N, D]: sizes within `size_bounds(N, K, tolerance)`.

    Stops early when an iteration changes no assignment. `mesh` places the points sharded
    over its batch axes (N must divide by their size); otherwise on the default device.
    """
    points_np = np.asarray(points, np.float32)
    lower, upper = size_bounds(len(points_np), num_clusters, tolerance)
    x = jax.device_put(points_np, batch_sharding(mesh, 2)) if mesh is not None else jnp.asarray(points_np)
    centroids = kmeans_plus_plus(x, jax.random.key(seed), num_clusters=num_clusters)
    assign = balanced_assign(x, centroids, lower, upper)
    done = 0
    for _ in range(iterations):
        done += 1
        centroids = update_centroids(x, assign, centroids, num_clusters=num_clusters)
        new = balanced_assign(x, centroids, lower, upper)
        changed = bool(jnp.any(new != assign))
        assign = new
        if not changed:
            break
    else:
        # Out of iterations: the centroids follow the last assignment, as they do on convergence.
        centroids = update_centroids(x, assign, centroids, num_clusters=num_clusters)
    assign_np = np.asarray(jax.device_get(assign), np.int32)
    return KMeansResult(
        centroids=np.asarray(jax.device_get(centroids), np.float32),
        assignments=assign_np,
        sizes=np.bincount(assign_np, minlength=num_clusters),
        iterations=done,
        inertia=float(inertia(x, centroids, assign)),
    )
