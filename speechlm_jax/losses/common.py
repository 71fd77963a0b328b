"""What every loss shares: the masked weighted mean, the per-token divergences, the metrics.

The trained forms (`chunked`) and their from-logits references (`reference`) both reduce
per-position values with the functions here, so the two compute the same numbers by the
same code and differ only in how the logits come to exist. Conventions (see the package
docstring): `mask` float `[batch, seq]`, `weights` `[batch]` or None, per-position values
`[batch, seq]`, logits `[..., vocab]`; log-softmax in float32 whatever the input dtype.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

Metrics = dict[str, jax.Array]
Direction = Literal["forward", "reverse", "jsd"]

# Documented bf16 tolerance (see the package docstring); tests/losses/test_common.py checks it.
BF16_ATOL = 3e-2
BF16_RTOL = 2e-2


def gather_teacher(teacher_x: jax.Array, teacher_index: jax.Array) -> jax.Array:
    """Moves teacher values to student positions.

    `teacher_x` is `[batch, teacher_seq, ...]` (logits or hidden states); `teacher_index`
    `[batch, seq]` is the batch's `teacher_index` (the teacher position that predicts the
    same next token as student position t). Returns `[batch, seq, ...]`.
    """
    index = teacher_index.reshape(teacher_index.shape + (1,) * (teacher_x.ndim - 2))
    return jnp.take_along_axis(teacher_x, index, axis=1)


def per_token_weights(mask: jax.Array, weights: jax.Array | None) -> jax.Array:
    """w_b m_bt as float32 `[batch, seq]` from `mask` `[batch, seq]` and `weights` `[batch]`."""
    mask = mask.astype(jnp.float32)
    return mask if weights is None else mask * weights.astype(jnp.float32)[:, None]


def weighted_mean(values: jax.Array, token_weights: jax.Array) -> jax.Array:
    """sum(w * v) / sum(w) over `[batch, seq]`, 0 when nothing is selected."""
    total = jnp.sum(jnp.where(token_weights != 0, values * token_weights, 0.0))
    denom = jnp.sum(token_weights)
    return total / jnp.where(denom != 0, denom, 1.0)


def count_tokens(token_weights: jax.Array) -> jax.Array:
    """The number of positions of `[batch, seq]` token weights with a positive weight."""
    return jnp.sum(jnp.where(token_weights > 0, 1.0, 0.0))


def upcast(x: jax.Array) -> jax.Array:
    """bf16/fp16 -> float32; float32 and float64 (the gradient checks) stay as they are."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _log_softmax(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    """log softmax(logits / T) over the last axis of `[..., vocab]`, in at least float32."""
    return jax.nn.log_softmax(upcast(logits) / temperature, axis=-1)


def cross_entropy_parts(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
    """Per-position (nll, uniform-smoothing CE, logsumexp, correct), each `[...]`.

    `logits` `[..., vocab]`, `targets` `[...]` (any value at unsupervised positions).
    """
    x = upcast(logits)
    lse = jax.nn.logsumexp(x, axis=-1)
    safe = jnp.clip(targets, 0, x.shape[-1] - 1)
    target_logit = jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(x, axis=-1) == targets).astype(jnp.float32)
    return lse - target_logit, lse - jnp.mean(x, axis=-1), lse, correct


def cross_entropy_from_parts(
    parts: tuple[jax.Array, ...], token_weights: jax.Array, label_smoothing: float, z_loss: float
) -> tuple[jax.Array, Metrics]:
    """The smoothed, z-regularised mean of `[batch, seq]` `cross_entropy_parts` and its metrics.

    Per token: (1 - eps) * nll + eps * smoothing CE + z_loss * logsumexp^2. Metrics: loss,
    nll (unsmoothed), z_loss (its term), accuracy (argmax = target), tokens.
    """
    nll, smooth, lse, correct = parts
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth + z_loss * jnp.square(lse)
    loss = weighted_mean(per_token, token_weights)
    return loss, {
        "loss": loss,
        "nll": weighted_mean(nll, token_weights),
        "z_loss": z_loss * weighted_mean(jnp.square(lse), token_weights),
        "accuracy": weighted_mean(correct, token_weights),
        "tokens": count_tokens(token_weights),
    }


def check_divergence_options(direction: str, jsd_beta: float, temperature: float) -> None:
    """Raises ValueError for a direction, `jsd_beta` or temperature no divergence has."""
    if direction not in ("forward", "reverse", "jsd"):
        raise ValueError(f"direction must be forward, reverse or jsd, got {direction!r}")
    if direction == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must lie in (0, 1), got {jsd_beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _kl_divergence(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """sum_v p (log p - log q) over the last axis of `[..., vocab]`, with 0 log 0 = 0: `[...]`."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def divergence_terms(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    direction: Direction,
    jsd_beta: float,
) -> tuple[jax.Array, jax.Array, jax.Array | None, jax.Array]:
    """(log p, log q, log m, D) of `[..., vocab]` logits: what `token_divergence` reduces.

    p = softmax(teacher / T) (under `stop_gradient`), q = softmax(student / T), both
    `[..., vocab]`; m = b p + (1 - b) q for `jsd` (None otherwise); D `[...]` the raw
    divergence, before the T^2 factor and the clamp at 0. The fused forms (`fused`) build
    their gradients from these same values.
    """
    log_p = _log_softmax(jax.lax.stop_gradient(teacher_logits), temperature)
    log_q = _log_softmax(student_logits, temperature)
    log_m = None
    if direction == "forward":
        divergence = _kl_divergence(log_p, log_q)
    elif direction == "reverse":
        divergence = _kl_divergence(log_q, log_p)
    else:
        log_m = jnp.logaddexp(math.log(jsd_beta) + log_p, math.log1p(-jsd_beta) + log_q)
        divergence = jsd_beta * _kl_divergence(log_p, log_m) + (1.0 - jsd_beta) * _kl_divergence(log_q, log_m)
    return log_p, log_q, log_m, divergence


def token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    direction: Direction,
    jsd_beta: float,
) -> jax.Array:
    """Per-position T^2 * D(teacher, student) of `[..., vocab]` logits: `[...]`.

    The teacher is under `stop_gradient`; `kl_distillation` (`reference`) defines D for
    each direction.
    """
    *_, divergence = divergence_terms(
        student_logits, teacher_logits, temperature=temperature, direction=direction, jsd_beta=jsd_beta
    )
    # Rounding can leave a divergence of equal distributions a hair below zero.
    return temperature**2 * jnp.maximum(divergence, 0.0)


def distillation_result(divergence: jax.Array, mask: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, Metrics]:
    """The weighted mean of `[batch, seq]` per-token divergences and the distillation metrics."""
    token_weights = per_token_weights(mask, weights)
    loss = weighted_mean(divergence, token_weights)
    return loss, {"loss": loss, "kl": loss, "tokens": count_tokens(token_weights)}


def salad_result(
    divergence: jax.Array,
    ce_parts: tuple[jax.Array, ...],
    kl_weights: jax.Array,
    nll_weights: jax.Array,
    alpha: float,
) -> tuple[jax.Array, Metrics]:
    """alpha * mean KL + (1 - alpha) * mean NLL of `[batch, seq]` parts, and SALAD's metrics.

    `ce_parts` from `cross_entropy_parts`; `kl_weights` / `nll_weights` `[batch, seq]` from
    `per_token_weights`. Metrics: loss, kl, nll, accuracy, kl_tokens, nll_tokens.
    """
    kl = weighted_mean(divergence, kl_weights)
    nll, _, _, correct = ce_parts
    nll_mean = weighted_mean(nll, nll_weights)
    loss = alpha * kl + (1.0 - alpha) * nll_mean
    return loss, {
        "loss": loss,
        "kl": kl,
        "nll": nll_mean,
        "accuracy": weighted_mean(correct, nll_weights),
        "kl_tokens": count_tokens(kl_weights),
        "nll_tokens": count_tokens(nll_weights),
    }


def sequence_sums(per_token: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """SALAD's diagnostics from `[batch, seq]` per-token KLs: their masked sum and its metrics.

    Metrics: total, per_token (total / tokens), per_sequence `[batch]`, tokens_per_sequence
    `[batch]`.
    """
    mask = mask.astype(jnp.float32)
    per_sequence = jnp.sum(jnp.where(mask != 0, per_token * mask, 0.0), axis=1)
    tokens = jnp.sum(mask, axis=1)
    total = jnp.sum(per_sequence)
    denom = jnp.sum(tokens)
    return total, {
        "total": total,
        "per_token": total / jnp.where(denom != 0, denom, 1.0),
        "per_sequence": per_sequence,
        "tokens_per_sequence": tokens,
    }
