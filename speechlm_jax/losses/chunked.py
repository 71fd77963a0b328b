"""Every logit loss from final hidden states, `[batch, chunk, vocab]` at a time, differentiated by autodiff.

Where this sits in the data flow: the jitted step's objective (`train/objectives.py`) runs
the student (LoRA on, speech input) and the teacher (LoRA off, the text twin) up to their
final-normed hidden states, moves the teacher's to the student's positions
(`common.gather_teacher`) and calls the fused form (`fused`) of one of these with the
unembedding; the fused forms run these functions when nothing is differentiated, and
evaluation (`evaluation/scoring.py`) scores options and SALAD's M and F with them. Each
function equals its from-logits definition in `reference` for every `chunk_size` (the
tests check values, metrics and gradients).

With a 128k-256k vocabulary the `[batch, seq, vocab]` float32 logits of student and
teacher do not fit together for long sequences. These forms take the hidden states
`[batch, seq, d_model]` and the unembedding `[d_model, vocab]` (`DecoderLLM.unembedding()`,
with `softcap` = `config.final_logit_softcapping`) and `lax.scan` over chunks of
`chunk_size` sequence positions, so at most `[batch, chunk_size, vocab]` logits of each
model live at once. Chunks run over the sequence axis, not a flattened token axis, so the
batch axis keeps its data/fsdp sharding. The per-chunk function is wrapped in
`jax.checkpoint`: the backward pass recomputes each chunk's logits instead of storing
them, so it stays chunked too (the price: the distillation forms do 6 unembedding matmuls
per chunk where the naive form does 4, as student and teacher logits are both
recomputed). Gradients flow to the student hidden states and to the unembedding; teacher
and student share the unembedding (one LLM, and LoRA never touches it), and the teacher's
use of it is under `stop_gradient`. The sequence is padded up to a multiple of
`chunk_size`; the padding is cut off before the mean, so any chunk size gives the same
result. The vocabulary is not chunked: `[batch, chunk, vocab]` is bounded by
`chunk_size` alone.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from speechlm_jax.losses.common import (
    Direction,
    Metrics,
    check_divergence_options,
    cross_entropy_from_parts,
    cross_entropy_parts,
    distillation_result,
    per_token_weights,
    salad_result,
    sequence_sums,
    token_divergence,
)


def soft_cap(logits: jax.Array, softcap: float | None) -> jax.Array:
    """Gemma's final-logit soft-capping, `softcap * tanh(logits / softcap)`; None = none."""
    return logits if softcap is None else softcap * jnp.tanh(logits / softcap)


def unembed(hidden: jax.Array, unembedding: jax.Array, softcap: float | None) -> jax.Array:
    """`[batch, chunk, d_model]` @ `[d_model, vocab]` -> float32 logits, soft-capped as Gemma."""
    accumulate = jnp.promote_types(jnp.result_type(hidden, unembedding), jnp.float32)
    return soft_cap(jnp.einsum("bcd,dv->bcv", hidden, unembedding, preferred_element_type=accumulate), softcap)


def teacher_unembed(hidden: jax.Array, unembedding: jax.Array, softcap: float | None) -> jax.Array:
    """`unembed` with no gradient to the teacher's hidden states or its use of the unembedding."""
    return unembed(jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(unembedding), softcap)


def split_chunks(x: jax.Array, chunk: int) -> jax.Array:
    """`[batch, seq, ...]` -> `[n_chunks, batch, chunk, ...]`, the sequence zero-padded to a multiple of `chunk`."""
    batch, seq = x.shape[:2]
    n_chunks = -(-seq // chunk)
    x = jnp.pad(x, [(0, 0), (0, n_chunks * chunk - seq)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape((batch, n_chunks, chunk) + x.shape[2:]), 1, 0)


def join_chunks(x: jax.Array, seq: int) -> jax.Array:
    """`[n_chunks, batch, chunk, ...]` -> `[batch, seq, ...]`: `split_chunks` undone, the padding cut off."""
    n_chunks, batch, chunk = x.shape[:3]
    return jnp.moveaxis(x, 0, 1).reshape((batch, n_chunks * chunk) + x.shape[3:])[:, :seq]


def chunk_length(seq: int, chunk_size: int) -> int:
    """The chunk length `scan_chunks` uses: `chunk_size`, or the whole sequence when that is shorter."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    return min(chunk_size, seq)


def scan_chunks(
    per_chunk: Callable[..., tuple[jax.Array, ...]],
    unembedding: jax.Array,
    seq_inputs: tuple[jax.Array, ...],
    chunk_size: int,
) -> tuple[jax.Array, ...]:
    """Applies `per_chunk(unembedding, *[batch, chunk, ...])` -> `[batch, chunk]` outputs over the sequence.

    Returns the outputs stitched back to `[batch, seq]`. The chunk function is
    rematerialised in the backward pass, so only one chunk's logits exist at a time.
    """
    seq = seq_inputs[0].shape[1]
    chunk = chunk_length(seq, chunk_size)
    body = jax.checkpoint(per_chunk)

    def step(carry: None, xs: tuple[jax.Array, ...]) -> tuple[None, tuple[jax.Array, ...]]:
        return carry, body(unembedding, *xs)

    _, outputs = jax.lax.scan(step, None, tuple(split_chunks(x, chunk) for x in seq_inputs))
    return tuple(join_chunks(o, seq) for o in outputs)


def chunked_cross_entropy(
    hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int,
    softcap: float | None = None,
    weights: jax.Array | None = None,
    z_loss: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """`masked_cross_entropy` of `unembed(hidden)` without materialising `[batch, seq, vocab]`.

    `hidden` `[batch, seq, d_model]` (final-normed), `unembedding` `[d_model, vocab]`,
    `targets`/`mask` `[batch, seq]`, `weights` `[batch]`; `softcap` = the model's final
    logit soft-capping. Equals `masked_cross_entropy(softcap(hidden @ unembedding), ...)`
    for every `chunk_size`; options and metrics as there.
    """

    def per_chunk(w: jax.Array, h: jax.Array, t: jax.Array) -> tuple[jax.Array, ...]:
        return cross_entropy_parts(unembed(h, w, softcap), t)

    parts = scan_chunks(per_chunk, unembedding, (hidden, targets), chunk_size)
    return cross_entropy_from_parts(parts, per_token_weights(mask, weights), label_smoothing, z_loss)


def chunked_kl_distillation(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    unembedding: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int,
    temperature: float = 1.0,
    direction: Direction = "forward",
    jsd_beta: float = 0.5,
    softcap: float | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """`kl_distillation` from hidden states: teacher and student logits exist one chunk at a time.

    `student_hidden`, `teacher_hidden` `[batch, seq, d_model]` (teacher already at student
    positions, `gather_teacher`), `unembedding` `[d_model, vocab]` shared by both,
    `mask` `[batch, seq]`, `weights` `[batch]`. Equals `kl_distillation` of the unembedded
    logits for every `chunk_size`; options and metrics as there.
    """
    check_divergence_options(direction, jsd_beta, temperature)

    def per_chunk(w: jax.Array, hs: jax.Array, ht: jax.Array) -> tuple[jax.Array]:
        divergence = token_divergence(
            unembed(hs, w, softcap),
            teacher_unembed(ht, w, softcap),
            temperature=temperature,
            direction=direction,
            jsd_beta=jsd_beta,
        )
        return (divergence,)

    (divergence,) = scan_chunks(per_chunk, unembedding, (student_hidden, teacher_hidden), chunk_size)
    return distillation_result(divergence, mask, weights)


def chunked_salad_objective(
    student_hidden: jax.Array,
    teacher_hidden: jax.Array,
    unembedding: jax.Array,
    targets: jax.Array,
    kl_mask: jax.Array,
    nll_mask: jax.Array,
    *,
    alpha: float,
    chunk_size: int,
    temperature: float = 1.0,
    direction: Direction = "forward",
    jsd_beta: float = 0.5,
    softcap: float | None = None,
    weights: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """`salad_objective` from hidden states; KL and NLL share each chunk's student logits.

    One student and one teacher unembedding matmul per chunk in the forward pass (both
    recomputed in the backward pass), instead of a separate pass for each term. Shapes as
    `chunked_kl_distillation` plus `targets`, `nll_mask` `[batch, seq]`; metrics as
    `salad_objective`.
    """
    check_divergence_options(direction, jsd_beta, temperature)

    def per_chunk(w: jax.Array, hs: jax.Array, ht: jax.Array, t: jax.Array) -> tuple[jax.Array, ...]:
        student = unembed(hs, w, softcap)
        divergence = token_divergence(
            student, teacher_unembed(ht, w, softcap), temperature=temperature, direction=direction, jsd_beta=jsd_beta
        )
        return (divergence,) + cross_entropy_parts(student, t)

    divergence, *ce_parts = scan_chunks(per_chunk, unembedding, (student_hidden, teacher_hidden, targets), chunk_size)
    return salad_result(
        divergence, tuple(ce_parts), per_token_weights(kl_mask, weights), per_token_weights(nll_mask, weights), alpha
    )


def _chunked_sequence_kl(
    model_hidden: jax.Array,
    reference_hidden: jax.Array,
    unembedding: jax.Array,
    mask: jax.Array,
    chunk_size: int,
    softcap: float | None,
) -> tuple[jax.Array, Metrics]:
    """Masked per-sequence sums of KL(reference || model) from `[batch, seq, d_model]` hidden states."""

    def per_chunk(w: jax.Array, h: jax.Array, r: jax.Array) -> tuple[jax.Array]:
        return (
            token_divergence(
                unembed(h, w, softcap),
                teacher_unembed(r, w, softcap),
                temperature=1.0,
                direction="forward",
                jsd_beta=0.5,
            ),
        )

    (per_token,) = scan_chunks(per_chunk, unembedding, (model_hidden, reference_hidden), chunk_size)
    return sequence_sums(per_token, mask)


def chunked_misalignment(
    speech_hidden: jax.Array,
    text_hidden: jax.Array,
    unembedding: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int,
    softcap: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """`misalignment` from `[batch, seq, d_model]` hidden states and the `[d_model, vocab]` unembedding.

    `mask` `[batch, seq]`; returns the sum over sequences and the metrics of `misalignment`.
    """
    return _chunked_sequence_kl(speech_hidden, text_hidden, unembedding, mask, chunk_size, softcap)


def chunked_forgetting(
    adapted_hidden: jax.Array,
    original_hidden: jax.Array,
    unembedding: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int,
    softcap: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """`forgetting` from `[batch, seq, d_model]` hidden states and the `[d_model, vocab]` unembedding.

    `mask` `[batch, seq]`; returns the sum over sequences and the metrics of `forgetting`.
    """
    return _chunked_sequence_kl(adapted_hidden, original_hidden, unembedding, mask, chunk_size, softcap)
