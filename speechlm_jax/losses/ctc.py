"""CTC: frame-level alignment of audio frames to a transcript (the encoder-pretraining objective).

Where this sits in the data flow: the `ctc` objective (`train/objectives.py`) reads each
audio slot's projector frames out through the LLM's final norm and unembedding and hands
the `[utterances, frames, vocab]` logits here, with the slot's frame mask and transcript
(`audio_labels`). Unlike the chunked forms this takes the logits whole, as
`optax.ctc_loss` does: fine for a small vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from speechlm_jax.losses.common import Metrics, upcast


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
    n_labels = jnp.sum(label_mask, axis=-1)
    n_frames = jnp.sum(frame_mask > 0, axis=-1)
    repeats = jnp.sum(label_mask[:, 1:] & (labels[:, 1:] == labels[:, :-1]), axis=-1)
    w = jnp.ones(x.shape[0], jnp.float32) if weights is None else weights.astype(jnp.float32)
    present = (n_labels > 0) & (w > 0)
    feasible = present & (n_labels + repeats <= n_frames)
    per_utterance = optax.ctc_loss(
        x, 1.0 - (frame_mask > 0).astype(x.dtype), jnp.where(label_mask, labels, 0), 1.0 - label_mask.astype(x.dtype),
        blank_id=blank_id,
    )
    token_weights = jnp.where(feasible, w, 0.0)
    total = jnp.sum(jnp.where(feasible, per_utterance * token_weights, 0.0))
    tokens = jnp.sum(token_weights * n_labels)
    loss = total / jnp.where(tokens > 0, tokens, 1.0)
    decoded = ctc_greedy_decode(x, frame_mask, blank_id=blank_id, max_labels=labels.shape[-1])
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
    best = jnp.argmax(logits, axis=-1)
    real = frame_mask > 0
    previous = jnp.concatenate([jnp.full_like(best[:, :1], -1), best[:, :-1]], axis=1)
    previous = jnp.where(jnp.concatenate([jnp.zeros_like(real[:, :1]), real[:, :-1]], axis=1), previous, -1)
    keep = real & (best != blank_id) & (best != previous)
    # Kept frames move to the front in order: their rank among kept frames is their slot.
    slot = jnp.where(keep, jnp.cumsum(keep, axis=1) - 1, max_labels)
    out = jnp.full((best.shape[0], max_labels + 1), -1, best.dtype)
    out = out.at[jnp.arange(best.shape[0])[:, None], jnp.minimum(slot, max_labels)].set(jnp.where(keep, best, -1))
    return out[:, :max_labels]
