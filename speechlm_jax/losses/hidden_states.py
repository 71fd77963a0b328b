"""DiVA's mean-squared-error terms between vectors: no vocabulary, so nothing to chunk.

These compare `[batch, seq, d_model]` vectors directly (a student's hidden states with the
teacher's, or projector outputs with the transcript's token embeddings), so unlike the
logit losses they need no chunked form. No recipe's objective (`train/objectives.py`)
calls them; the tests check them against float64 references. Shapes and the weighted
mean are the package's conventions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from speechlm_jax.losses.common import Metrics, count_tokens, per_token_weights, upcast, weighted_mean


def _mean_squared_distance(
    x: jax.Array, target: jax.Array, mask: jax.Array, weights: jax.Array | None
) -> tuple[jax.Array, Metrics]:
    """Weighted mean over positions of the MSE over d_model of `[batch, seq, d_model]` vectors."""
    x = upcast(x)
    target = upcast(jax.lax.stop_gradient(target))
    per_position = jnp.mean(jnp.square(x - target), axis=-1)
    norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(target, axis=-1)
    cosine = jnp.sum(x * target, axis=-1) / jnp.where(norms > 0, norms, 1.0)
    token_weights = per_token_weights(mask, weights)
    loss = weighted_mean(per_position, token_weights)
    return loss, {"loss": loss, "cosine": weighted_mean(cosine, token_weights), "tokens": count_tokens(token_weights)}


def hidden_state_distillation(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    mask: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """L2 distillation of hidden states at chosen positions (DiVA's response-position term).

    `student_hidden`, `teacher_hidden` `[batch, seq, d_model]` (teacher already at student
    positions, under stop_gradient); `mask` `[batch, seq]` selects the positions (DiVA: the
    position where the response starts). Per position: the squared L2 distance divided by
    d_model (mean squared error), so the scale does not grow with the model width.
    Metrics: loss, cosine (mean cosine similarity), tokens.
    """
    return _mean_squared_distance(student_hidden, teacher_hidden, mask, weights)


def embedding_alignment(
    audio_embeds: jax.Array,
    token_embeds: jax.Array,
    mask: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """DiVA's token-embedding alignment: projector outputs pulled onto the transcript's embeddings.

    `audio_embeds` `[batch, n, d_model]` (the first n projector outputs of each clip),
    `token_embeds` `[batch, n, d_model]` (the LLM's input embeddings of the n transcript
    tokens; the frozen table, under stop_gradient), `mask` `[batch, n]` (1 for real tokens).
    Per position the mean squared error over d_model. Metrics: loss, cosine, tokens.
    """
    return _mean_squared_distance(audio_embeds, token_embeds, mask, weights)
