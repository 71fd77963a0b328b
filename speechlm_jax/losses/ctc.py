"""CTC: frame-level alignment of audio frames to a transcript (encoder pretraining, connector alignment).

Where this sits in the data flow: the `ctc` objective (`train/objectives.py`) reads each
audio slot's projector frames out through the LLM's final norm and unembedding, scored
against the slot's transcript (`audio_labels`). Two forms:

    ctc_loss          `[utterances, frames, vocab]` logits whole, through `optax.ctc_loss`:
                      the reference, and fine for a small vocabulary
    chunked_ctc_loss  from the frames' hidden states and the unembedding, what the trainer
                      runs: CTC only ever needs the log-probabilities of the blank and of the
                      transcript's own tokens, so the vocabulary enters through one
                      log-normaliser per frame, computed chunk by chunk over the frames and
                      rematerialised in the backward pass (`chunked.scan_chunks`). Memory:
                      `[utterances, chunk, vocab]` logits at a time plus
                      `[utterances, frames, 2 * labels + 1]` for the forward recursion, where
                      the whole form holds `[utterances, frames, vocab]`.

`ctc_greedy_decode` / `chunked_ctc_greedy` are the best-path readouts (the cascade's ASR and
the length adapter's labels).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from speechlm_jax.losses.chunked import scan_chunks, soft_cap, unembed
from speechlm_jax.losses.common import Metrics, upcast

NEG_INF = -1e30  # a log-probability no path takes (finite, so gradients stay finite)


def ctc_loss(
    logits: jax.Array,
    frame_mask: jax.Array,
    labels: jax.Array,
    *,
    blank_id: int,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Connectionist temporal classification of audio frames against their transcripts.

    logits `[utterances, frames, vocab]`; frame_mask `[utterances, frames]` (1 = a real
    frame); labels `[utterances, max_labels]` token ids, -1 after the transcript's end;
    `blank_id` a vocabulary entry no transcript contains (the pad token); weights
    `[utterances]` (0 = padding slot). The loss is -log p(transcript | frames) summed over
    utterances and divided by the number of transcript tokens, so it is a per-token figure
    like the cross-entropies. An utterance with no label, or with more labels (plus the
    blanks needed between repeats) than frames, has no alignment: it is left out and
    counted in `infeasible`. Metrics: loss, tokens (labels counted), utterances,
    infeasible, exact_match (the greedy decode spells the transcript, per utterance).
    """
    x = upcast(logits)
    label_mask = labels >= 0
    per_utterance = optax.ctc_loss(
        x,
        1.0 - (frame_mask > 0).astype(x.dtype),
        jnp.where(label_mask, labels, 0),
        1.0 - label_mask.astype(x.dtype),
        blank_id=blank_id,
    )
    best = jnp.argmax(x, axis=-1)
    return _ctc_result(per_utterance, best, frame_mask, labels, blank_id=blank_id, weights=weights)


def _ctc_result(
    per_utterance: jax.Array,
    best: jax.Array,
    frame_mask: jax.Array,
    labels: jax.Array,
    *,
    blank_id: int,
    weights: jax.Array | None,
) -> tuple[jax.Array, Metrics]:
    """The loss and metrics of both forms from -log p per utterance [U] and the best token per frame [U, F]."""
    label_mask = labels >= 0
    n_labels = jnp.sum(label_mask, axis=-1)
    n_frames = jnp.sum(frame_mask > 0, axis=-1)
    repeats = jnp.sum(label_mask[:, 1:] & (labels[:, 1:] == labels[:, :-1]), axis=-1)
    w = jnp.ones(labels.shape[0], jnp.float32) if weights is None else weights.astype(jnp.float32)
    present = (n_labels > 0) & (w > 0)
    feasible = present & (n_labels + repeats <= n_frames)
    token_weights = jnp.where(feasible, w, 0.0)
    total = jnp.sum(jnp.where(feasible, per_utterance * token_weights, 0.0))
    tokens = jnp.sum(token_weights * n_labels)
    loss = total / jnp.where(tokens > 0, tokens, 1.0)
    decoded = collapse_best_path(best, frame_mask, blank_id=blank_id, max_labels=labels.shape[-1])
    exact = jnp.all(decoded == jnp.where(label_mask, labels, -1), axis=-1)
    counted = jnp.sum(token_weights)
    return loss, {
        "loss": loss,
        "tokens": jnp.sum(jnp.where(feasible, n_labels, 0)).astype(jnp.float32),
        "utterances": jnp.sum(present).astype(jnp.float32),
        "infeasible": jnp.sum(present & ~feasible).astype(jnp.float32),
        "exact_match": jnp.sum(exact * token_weights) / jnp.where(counted > 0, counted, 1.0),
    }


def ctc_greedy_decode(logits: jax.Array, frame_mask: jax.Array, *, blank_id: int, max_labels: int) -> jax.Array:
    """Best-path CTC decoding: argmax per frame, repeats merged, blanks dropped.

    logits `[utterances, frames, vocab]`, frame_mask `[utterances, frames]` -> token ids
    `[utterances, max_labels]`, left-aligned, -1 after the last (longer outputs are cut).
    """
    return collapse_best_path(jnp.argmax(logits, axis=-1), frame_mask, blank_id=blank_id, max_labels=max_labels)


def kept_frames(best: jax.Array, frame_mask: jax.Array, *, blank_id: int) -> jax.Array:
    """Frames that start a token of the best path [U, F] bool: real, not blank, not a repeat of the frame before."""
    real = frame_mask > 0
    previous = jnp.concatenate([jnp.full_like(best[:, :1], -1), best[:, :-1]], axis=1)
    previous = jnp.where(jnp.concatenate([jnp.zeros_like(real[:, :1]), real[:, :-1]], axis=1), previous, -1)
    return real & (best != blank_id) & (best != previous)


def collapse_best_path(best: jax.Array, frame_mask: jax.Array, *, blank_id: int, max_labels: int) -> jax.Array:
    """The best token per frame [U, F] -> the transcript ids [U, max_labels], -1 after the end."""
    real = frame_mask > 0
    previous = jnp.concatenate([jnp.full_like(best[:, :1], -1), best[:, :-1]], axis=1)
    previous = jnp.where(jnp.concatenate([jnp.zeros_like(real[:, :1]), real[:, :-1]], axis=1), previous, -1)
    keep = real & (best != blank_id) & (best != previous)
    # Kept frames move to the front in order: their rank among kept frames is their slot.
    slot = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, max_labels)
    out = jnp.full((best.shape[0], max_labels + 1), -1, best.dtype)
    out = out.at[jnp.arange(best.shape[0])[:, None], jnp.minimum(slot, max_labels)].set(jnp.where(keep, best, -1))
    return out[:, :max_labels]


def _frame_log_normalizer(
    hidden: jax.Array,
    unembedding: jax.Array,
    *,
    chunk_size: int,
    softcap: float | None,
    blank_id: int,
    blank: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """logsumexp over the vocabulary [U, F] and the best token [U, F] of every frame, chunk by chunk.

    `blank` [D] (a learned blank vector) replaces column `blank_id` of the unembedding.
    """

    def per_chunk(w: jax.Array, h: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = unembed(h, w, softcap)
        if blank is not None:
            logits = logits.at[..., blank_id].set(
                soft_cap(h.astype(logits.dtype) @ blank.astype(logits.dtype), softcap)
            )
        return jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1)

    return scan_chunks(per_chunk, unembedding, (hidden,), chunk_size)


def chunked_ctc_greedy(
    hidden: jax.Array,
    unembedding: jax.Array,
    *,
    chunk_size: int,
    softcap: float | None = None,
    blank_id: int = 0,
    blank: jax.Array | None = None,
) -> jax.Array:
    """The best token of every frame [U, F] from hidden states [U, F, D], never holding [U, F, vocab].

    With `blank` [D], the learned blank vector stands in for column `blank_id` (`chunked_ctc_loss`).
    """
    _, best = _frame_log_normalizer(
        jax.lax.stop_gradient(hidden),
        jax.lax.stop_gradient(unembedding),
        chunk_size=chunk_size,
        softcap=softcap,
        blank_id=blank_id,
        blank=None if blank is None else jax.lax.stop_gradient(blank),
    )
    return best


def _ctc_forward(
    emissions: jax.Array, extended: jax.Array, frame_mask: jax.Array, n_labels: jax.Array, blank_id: int
) -> jax.Array:
    """-log p(transcript) [U] by the CTC forward recursion over the blank-extended transcript.

    emissions [U, F, S] log p of each extended position's token at each frame, extended [U, S]
    (blank, l1, blank, l2, ..., blank; S = 2K + 1), frame_mask [U, F]; frames past the mask
    leave the forward variables as they are.
    """
    u, _, s = emissions.shape
    # A path may skip the blank between two labels unless they are the same token.
    skip = jnp.concatenate(
        [jnp.zeros((u, 2), bool), (extended[:, 2:] != blank_id) & (extended[:, 2:] != extended[:, :-2])], axis=1
    )
    first = jnp.full((u, s), NEG_INF).at[:, :2].set(emissions[:, 0, :2])

    def shifted(alpha: jax.Array, k: int) -> jax.Array:
        return jnp.concatenate([jnp.full((u, k), NEG_INF), alpha[:, :-k]], axis=1)

    def step(alpha: jax.Array, xs: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
        emit, real = xs
        stay_or_advance = jnp.logaddexp(alpha, shifted(alpha, 1))
        moved = jnp.where(skip, jnp.logaddexp(stay_or_advance, shifted(alpha, 2)), stay_or_advance) + emit
        return jnp.where(real[:, None], moved, alpha), None

    alpha, _ = jax.lax.scan(
        step, first, (jnp.moveaxis(emissions[:, 1:], 1, 0), jnp.moveaxis(frame_mask[:, 1:] > 0, 1, 0))
    )
    last = 2 * n_labels
    end_blank = jnp.take_along_axis(alpha, last[:, None], axis=1)[:, 0]
    end_label = jnp.take_along_axis(alpha, jnp.maximum(last - 1, 0)[:, None], axis=1)[:, 0]
    return -jnp.logaddexp(end_blank, jnp.where(n_labels > 0, end_label, NEG_INF))


def chunked_ctc_loss(
    hidden: jax.Array,
    unembedding: jax.Array,
    frame_mask: jax.Array,
    labels: jax.Array,
    *,
    blank_id: int,
    chunk_size: int,
    weights: jax.Array | None = None,
    softcap: float | None = None,
    blank: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """`ctc_loss(softcap(hidden @ unembedding), ...)` without the `[utterances, frames, vocab]` logits.

    hidden `[utterances, frames, d_model]` (the final-normed projector frames), unembedding
    `[d_model, vocab]`, the rest as `ctc_loss`; the same loss and metrics. `blank` `[d_model]`
    (the connector's learned blank, `models.projector`): column `blank_id` of the unembedding
    is replaced by it, so the blank's logit is `hidden @ blank` (trainable) rather than the
    LLM's own row for that token.
    """
    log_z, best = _frame_log_normalizer(
        hidden, unembedding, chunk_size=chunk_size, softcap=softcap, blank_id=blank_id, blank=blank
    )
    label_mask = labels >= 0
    u, k = labels.shape
    extended = jnp.full((u, 2 * k + 1), blank_id, labels.dtype).at[:, 1::2].set(jnp.where(label_mask, labels, blank_id))
    # Logits of the extended transcript's tokens only: [U, F, 2K + 1] from its unembedding columns.
    columns = jnp.moveaxis(jnp.take(unembedding, extended, axis=1), 0, -1)  # [U, 2K + 1, D]
    if blank is not None:
        columns = jnp.where((extended == blank_id)[..., None], blank.astype(columns.dtype), columns)
    accumulate = jnp.promote_types(jnp.result_type(hidden, columns), jnp.float32)
    logits = soft_cap(jnp.einsum("ufd,usd->ufs", hidden, columns, preferred_element_type=accumulate), softcap)
    emissions = logits - log_z[..., None]
    per_utterance = _ctc_forward(emissions, extended, frame_mask, jnp.sum(label_mask, axis=-1), blank_id)
    return _ctc_result(
        per_utterance, jax.lax.stop_gradient(best), frame_mask, labels, blank_id=blank_id, weights=weights
    )
