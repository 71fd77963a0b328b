"""The objectives from whole `[batch, seq, vocab]` logits: the definitions the trained forms must equal.

The trainer never materialises these logits (`chunked` computes the same losses from
hidden states one sequence chunk at a time); these forms state each objective on logits
directly, so the tests check `chunked_* == *` for every chunk size and against float64
NumPy references, and `benchmarks/losses.py` measures the memory the chunking saves.
`behavior_imitation_loss` / `place_response` state MTBI's objective on a teacher response
not yet aligned to the student (greedy decoding's output); in training the data pipeline
delivers it aligned, as `targets` / `loss_mask`, to `chunked_cross_entropy`. Shapes and
the weighted mean are the package's conventions (`speechlm_jax.losses`).
"""

from __future__ import annotations

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


def masked_cross_entropy(
    logits: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Answer-only cross-entropy (VoiceTextBlender SFT, ASR), weighted mean over supervised tokens.

    logits `[batch, seq, vocab]`, targets `[batch, seq]`, mask `[batch, seq]`, weights `[batch]`.
    Per token: (1 - eps) * -log p(y) + eps * -mean_v log p(v) (uniform label smoothing, the
    same as smoothed one-hot targets eps / vocab) + z_loss * logsumexp(logits)^2 (PaLM's
    auxiliary term keeping the softmax normaliser near 1). Metrics: loss, nll (unsmoothed),
    z_loss (its term), accuracy (argmax = target), tokens.
    """
    parts = cross_entropy_parts(logits, targets)
    return cross_entropy_from_parts(parts, per_token_weights(mask, weights), label_smoothing, z_loss)


def place_response(
    response_tokens: jax.Array,
    response_mask: jax.Array,
    seq_len: int,
    *,
    response_start: jax.Array | None = None,
    eos_id: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Turns a teacher's response into student `targets` and `mask`, `[batch, seq_len]` each.

    `response_tokens` / `response_mask` `[batch, response_len]` are the teacher's response
    (from the data pipeline, or from its greedy decoding). With `response_start` `[batch]`
    (the student position whose next token is the first response token), token r goes to
    position `response_start + r`; positions past `seq_len` are dropped. Without it the
    response is already aligned to the student (`response_len == seq_len`). With `eos_id`,
    tokens after the first EOS (what greedy decoding emits after stopping) are unsupervised;
    the EOS itself stays supervised.
    """
    mask = response_mask.astype(jnp.float32)
    if eos_id is not None:
        is_eos = response_tokens == eos_id
        eos_before = jnp.cumsum(is_eos, axis=1) - is_eos
        mask = jnp.where(eos_before > 0, 0.0, mask)
    if response_start is None:
        if response_tokens.shape[1] != seq_len:
            raise ValueError(f"aligned response needs length {seq_len}, got {response_tokens.shape[1]}")
        return response_tokens, mask
    batch, length = response_tokens.shape
    positions = response_start[:, None] + jnp.arange(length)[None, :]
    rows = jnp.broadcast_to(jnp.arange(batch)[:, None], positions.shape)
    targets = jnp.zeros((batch, seq_len), response_tokens.dtype).at[rows, positions].set(response_tokens, mode="drop")
    placed_mask = jnp.zeros((batch, seq_len), jnp.float32).at[rows, positions].set(mask, mode="drop")
    return targets, placed_mask


def behavior_imitation_loss(
    student_logits: jax.Array,
    response_tokens: jax.Array,
    response_mask: jax.Array,
    *,
    response_start: jax.Array | None = None,
    eos_id: int | None = None,
    weights: jax.Array | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Cross-entropy on the teacher's own response given the student's speech input (MTBI, BLSP).

    The target is what the LLM answers to `prompt + transcript`; the student sees
    `prompt + speech` (teacher-forced on that same response) and learns to answer it
    identically. `student_logits` `[batch, seq, vocab]`; `response_tokens`/`response_mask`
    `[batch, response_len]` come from the data pipeline (already aligned, as `targets` /
    `loss_mask`) or from the teacher's greedy decoding (placed at `response_start` `[batch]`,
    cut after `eos_id`); see `place_response`. Metrics as `masked_cross_entropy`; `accuracy`
    is the rate at which the student's argmax reproduces the teacher's token.
    """
    targets, mask = place_response(
        response_tokens, response_mask, student_logits.shape[1], response_start=response_start, eos_id=eos_id
    )
    return masked_cross_entropy(student_logits, targets, mask, weights=weights, label_smoothing=label_smoothing)


def _logits_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    direction: Direction,
    jsd_beta: float,
) -> jax.Array:
    """Validated options, then `token_divergence` of `[batch, seq, vocab]` logits: `[batch, seq]`."""
    check_divergence_options(direction, jsd_beta, temperature)
    return token_divergence(
        student_logits, teacher_logits, temperature=temperature, direction=direction, jsd_beta=jsd_beta
    )


def kl_distillation(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    mask: jax.Array,
    *,
    weights: jax.Array | None = None,
    temperature: float = 1.0,
    direction: Direction = "forward",
    jsd_beta: float = 0.5,
) -> tuple[jax.Array, Metrics]:
    """Token-level distillation on the positions `mask` selects (SALAD: next token is text).

    `student_logits` `[batch, seq, vocab]`; `teacher_logits` `[batch, seq, vocab]` already at
    student positions (`gather_teacher`); `mask` `[batch, seq]` (the batch's `kl_mask`);
    `weights` `[batch]`. With p = softmax(teacher / T), q = softmax(student / T), the
    per-token value is
    - forward: T^2 KL(p || q) (SALAD, Hinton distillation; mode-covering),
    - reverse: T^2 KL(q || p) (mode-seeking, MiniLLM),
    - jsd: T^2 [b KL(p || m) + (1 - b) KL(q || m)], m = b p + (1 - b) q, b = `jsd_beta`
      (GKD's generalised JSD; b = 0.5 is the symmetric Jensen-Shannon divergence).
    The T^2 factor (Hinton et al. 2015) keeps the gradient scale independent of T, since
    softening the logits by T shrinks their gradients by 1/T^2. Metrics: loss, kl, tokens.
    """
    divergence = _logits_divergence(
        student_logits, teacher_logits, temperature=temperature, direction=direction, jsd_beta=jsd_beta
    )
    return distillation_result(divergence, mask, weights)


def salad_objective(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    targets: jax.Array,
    kl_mask: jax.Array,
    nll_mask: jax.Array,
    *,
    alpha: float,
    weights: jax.Array | None = None,
    temperature: float = 1.0,
    direction: Direction = "forward",
    jsd_beta: float = 0.5,
) -> tuple[jax.Array, Metrics]:
    """SALAD's loss: alpha * KL(teacher || student) + (1 - alpha) * NLL, alpha from the config.

    The KL term is `kl_distillation` on `kl_mask`; the NLL is the student's cross-entropy on
    `targets` over `nll_mask` (the batch's `loss_mask`); each is its own weighted mean.
    Shapes as `kl_distillation` plus `targets` `[batch, seq]`. Metrics: loss, kl, nll,
    accuracy, kl_tokens, nll_tokens.
    """
    divergence = _logits_divergence(
        student_logits, teacher_logits, temperature=temperature, direction=direction, jsd_beta=jsd_beta
    )
    ce_parts = cross_entropy_parts(student_logits, targets)
    return salad_result(
        divergence, ce_parts, per_token_weights(kl_mask, weights), per_token_weights(nll_mask, weights), alpha
    )


def _sequence_kl(model_logits: jax.Array, reference_logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """Masked per-sequence sums of KL(reference || model) of `[batch, seq, vocab]` logits."""
    per_token = token_divergence(model_logits, reference_logits, temperature=1.0, direction="forward", jsd_beta=0.5)
    return sequence_sums(per_token, mask)


def misalignment(speech_logits: jax.Array, text_logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """SALAD's misalignment M = sum_t KL(P(w | text prefix) || P(w | speech prefix)).

    `speech_logits` `[batch, seq, vocab]` from the speech (or interleaved) input,
    `text_logits` from the text twin at the same positions (`gather_teacher`), `mask`
    `[batch, seq]` (the `kl_mask`). Returns the sum over sequences and metrics: total,
    per_token (total / tokens), per_sequence `[batch]`, tokens_per_sequence `[batch]`.
    """
    return _sequence_kl(speech_logits, text_logits, mask)


def forgetting(adapted_logits: jax.Array, original_logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
    """SALAD's forgetting F = sum_t KL(Q_original(w | text) || P_adapted(w | text)).

    Both `[batch, seq, vocab]` on the same text input: `adapted_logits` with LoRA on,
    `original_logits` from the base LLM (LoRA off). `mask` `[batch, seq]` selects the scored
    positions. Returns the sum over sequences; metrics as `misalignment`.
    """
    return _sequence_kl(adapted_logits, original_logits, mask)
