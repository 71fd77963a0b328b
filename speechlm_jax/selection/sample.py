"""Active selection: which texts to speak with the TTS, given each cluster's misalignment.

SALAD's target distribution over the K text clusters is

    P(c) ∝ P_web(c) · M(c)^gamma

with P_web(c) the cluster's share of the text corpus and M(c) the current model's
misalignment on the cluster's probe set (`probe.py`); gamma = 5 in the paper, and
gamma = 0 gives uniform sampling over the corpus (the baseline). Texts are drawn one at
a time: a cluster from P, then a text uniformly among that cluster's texts not yet drawn
(without replacement; an exhausted cluster leaves P, which is renormalised). Drawing
stops before the estimated audio of the selection would exceed the budget, given in
audio seconds directly or as a fraction of the stage-1 speech data (1% in the paper).

The audio duration of a text is not known before synthesis; it is estimated as
words x seconds-per-word measured on speech from the same TTS (the probe set).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np


def target_distribution(sizes: np.ndarray, misalignment: np.ndarray, gamma: float) -> np.ndarray:
    """P(c) ∝ P_web(c) · M(c)^gamma over clusters [K] (sizes [K] give P_web)."""
    sizes = np.asarray(sizes, np.float64)
    m = np.asarray(misalignment, np.float64)
    if sizes.shape != m.shape:
        raise ValueError(f"sizes {sizes.shape} and misalignment {m.shape} differ in shape")
    if np.any(m < 0) or not np.all(np.isfinite(m)):
        raise ValueError("misalignment must be finite and >= 0")
    web = sizes / sizes.sum()
    # Scaled by the largest M first so that M^gamma neither under- nor overflows.
    weight = web * (m / m.max()) ** gamma if m.max() > 0 else web
    if weight.sum() <= 0:
        weight = web
    return weight / weight.sum()


@dataclasses.dataclass(frozen=True)
class Selection:
    """Indices into the corpus in draw order, their clusters, and the estimated audio seconds."""

    indices: np.ndarray
    clusters: np.ndarray
    seconds: float


def draw(
    assignments: np.ndarray,
    probabilities: np.ndarray,
    seconds: np.ndarray,
    budget_seconds: float,
    *,
    seed: int = 0,
    exclude: Sequence[int] = (),
) -> Selection:
    """Draws texts (see the module docstring) until the next one would exceed `budget_seconds`.

    assignments [N]: cluster of each text; probabilities [K]: P(c); seconds [N]: the
    estimated audio of each text; `exclude`: corpus indices never drawn (the probe texts).
    """
    assignments = np.asarray(assignments)
    k = len(probabilities)
    rng = np.random.default_rng(seed)
    available = np.ones(len(assignments), bool)
    available[np.asarray(exclude, np.int64)] = False
    pools = []
    for c in range(k):
        members = np.flatnonzero((assignments == c) & available)
        pools.append(list(rng.permutation(members)))  # popping a random permutation = uniform without replacement
    p = np.asarray(probabilities, np.float64).copy()
    chosen, clusters, total = [], [], 0.0
    while True:
        p[[c for c in range(k) if not pools[c]]] = 0.0
        if p.sum() <= 0:
            break
        c = int(rng.choice(k, p=p / p.sum()))
        index = int(pools[c][-1])
        if total + seconds[index] > budget_seconds:
            break
        pools[c].pop()
        chosen.append(index)
        clusters.append(c)
        total += float(seconds[index])
    return Selection(np.asarray(chosen, np.int64), np.asarray(clusters, np.int64), total)


def estimated_seconds(texts: Sequence[str], seconds_per_word: float) -> np.ndarray:
    """Estimated audio seconds [N] of each text: words x seconds per word."""
    return np.asarray([len(t.split()) * seconds_per_word for t in texts], np.float64)


def budget_seconds(*, hours: float = 0.0, fraction: float = 0.0, stage1_seconds: float = 0.0) -> float:
    """The synthetic-speech budget in seconds: `hours` of audio, or `fraction` of the stage-1 speech."""
    if (hours > 0) == (fraction > 0):
        raise ValueError("give exactly one budget: hours > 0 or fraction > 0")
    if hours > 0:
        return hours * 3600.0
    if stage1_seconds <= 0:
        raise ValueError("a fractional budget needs the stage-1 speech duration")
    return fraction * stage1_seconds
