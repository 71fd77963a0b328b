"""The objectives of every recipe, and SALAD's diagnostics, as pure functions of arrays.

Where this sits in the data flow (ARCHITECTURE.md): the jitted step runs the student
(LoRA on, speech input) and the teacher (LoRA off, the text twin), then hands arrays to
one of these functions: logits or final hidden states, the batch's `targets`, `loss_mask`,
`kl_mask`, `teacher_index` and `weight`. Nothing here sees a model, a config or a global,
so every function is safe under `jax.jit` and `jax.grad`.

Conventions shared by every function:
- Shapes: logits `[batch, seq, vocab]`; `targets` `[batch, seq]` hold the token predicted at
  position t (already shifted), any value at unsupervised positions; masks are float
  `[batch, seq]` (1 = supervised); `weights` `[batch]` per example (None = all ones, 0 for
  padding rows).
- The mean: loss = sum_{b,t} w_b m_bt l_bt / sum_{b,t} w_b m_bt, a mean over supervised
  tokens in which each token counts with its example's weight (a long answer counts more
  than a short one; a weight-2 example counts twice). An all-zero mask gives 0, not NaN.
  Values at positions with zero weight never reach the loss (not even inf/NaN), and finite
  values there get exactly zero gradient.
- Log-softmax runs in float32 whatever the input dtype: bf16 logits are upcast first
  (float64 inputs, used by the gradient checks, stay float64).
  With bf16 logits (or bf16 hidden states and unembedding in the chunked forms) the losses
  stay finite and lie within `BF16_ATOL + BF16_RTOL * |loss|` of the float32 computation on
  the same unrounded values (the error is the bf16 rounding of the logits themselves).
- The teacher is always under `stop_gradient`. Teacher logits or hidden states must
  already sit at the student's positions: `gather_teacher(x, batch["teacher_index"])`.
- Each function returns `(scalar loss, metrics)`, metrics a dict of float32 scalars
  (per-part losses, `tokens` = number of supervised positions with non-zero weight); the
  diagnostics `misalignment` / `forgetting` add per-sequence `[batch]` arrays.

Memory-bounded forms (`chunked_*`): with a 128k-256k vocabulary the `[batch, seq, vocab]`
float32 logits of student and teacher do not fit together for long sequences. The chunked
forms take the final-normed hidden states `[batch, seq, d_model]` and the unembedding
`[d_model, vocab]` (`DecoderLLM.unembedding()`, with `softcap` =
`config.final_logit_softcapping`) and `lax.scan` over chunks of `chunk_size` sequence
positions, so at most `[batch, chunk_size, vocab]` logits of each model live at once.
Chunks run over the sequence axis, not a flattened token axis, so the batch axis keeps its
data/fsdp sharding. The per-chunk function is wrapped in `jax.checkpoint`: the backward
pass recomputes each chunk's logits instead of storing them, so it stays chunked too (the
price: the distillation forms do 6 unembedding matmuls per chunk where the naive form does
4, as student and teacher logits are both recomputed). Gradients flow to the student hidden states and to
the unembedding; teacher and student share the unembedding (one LLM, and LoRA never
touches it), and the teacher's use of it is under `stop_gradient`. The sequence is padded
up to a multiple of `chunk_size`; the padding is cut off before the mean, so any chunk
size gives the same result. The vocabulary is not chunked: `[batch, chunk, vocab]` is
bounded by `chunk_size` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax

Metrics = dict[str, jax.Array]
Direction = Literal["forward", "reverse", "jsd"]

# Documented bf16 tolerance (see the module docstring); tests/test_losses.py checks it.
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


def _token_weights(mask: jax.Array, weights: jax.Array | None) -> jax.Array:
    mask = mask.astype(jnp.float32)
    return mask if weights is None else mask * weights.astype(jnp.float32)[:, None]


def _weighted_mean(values: jax.Array, token_weights: jax.Array) -> jax.Array:
    """sum(w * v) / sum(w) over `[batch, seq]`, 0 when nothing is selected."""
    total = jnp.sum(jnp.where(token_weights != 0, values * token_weights, 0.0))
    denom = jnp.sum(token_weights)
    return total / jnp.where(denom != 0, denom, 1.0)


def _count(token_weights: jax.Array) -> jax.Array:
    return jnp.sum(jnp.where(token_weights > 0, 1.0, 0.0))


def _upcast(x: jax.Array) -> jax.Array:
    """bf16/fp16 -> float32; float32 and float64 (the gradient checks) stay as they are."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _log_softmax(logits: jax.Array, temperature: float = 1.0) -> jax.Array:
    return jax.nn.log_softmax(_upcast(logits) / temperature, axis=-1)


def _cross_entropy_parts(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, ...]:
    """Per-position (nll, uniform-smoothing CE, logsumexp, correct) of `[..., vocab]` logits."""
    x = _upcast(logits)
    lse = jax.nn.logsumexp(x, axis=-1)
    safe = jnp.clip(targets, 0, x.shape[-1] - 1)
    target_logit = jnp.take_along_axis(x, safe[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(x, axis=-1) == targets).astype(jnp.float32)
    return lse - target_logit, lse - jnp.mean(x, axis=-1), lse, correct


def _cross_entropy_from_parts(
    parts: tuple[jax.Array, ...], token_weights: jax.Array, label_smoothing: float, z_loss: float
) -> tuple[jax.Array, Metrics]:
    nll, smooth, lse, correct = parts
    per_token = (1.0 - label_smoothing) * nll + label_smoothing * smooth + z_loss * jnp.square(lse)
    loss = _weighted_mean(per_token, token_weights)
    return loss, {
        "loss": loss,
        "nll": _weighted_mean(nll, token_weights),
        "z_loss": z_loss * _weighted_mean(jnp.square(lse), token_weights),
        "accuracy": _weighted_mean(correct, token_weights),
        "tokens": _count(token_weights),
    }


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
    parts = _cross_entropy_parts(logits, targets)
    return _cross_entropy_from_parts(parts, _token_weights(mask, weights), label_smoothing, z_loss)


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
    cut after `eos_id`); see `place_response`, which also feeds `chunked_cross_entropy`.
    Metrics as `masked_cross_entropy`; `accuracy` is the rate at which the student's argmax
    reproduces the teacher's token.
    """
    targets, mask = place_response(
        response_tokens, response_mask, student_logits.shape[1], response_start=response_start, eos_id=eos_id
    )
    return masked_cross_entropy(student_logits, targets, mask, weights=weights, label_smoothing=label_smoothing)


def _check_divergence(direction: str, jsd_beta: float, temperature: float) -> None:
    if direction not in ("forward", "reverse", "jsd"):
        raise ValueError(f"direction must be forward, reverse or jsd, got {direction!r}")
    if direction == "jsd" and not 0.0 < jsd_beta < 1.0:
        raise ValueError(f"jsd_beta must lie in (0, 1), got {jsd_beta}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def _kl(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """sum_v p (log p - log q) over the last axis, with 0 log 0 = 0."""
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def _token_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    direction: Direction,
    jsd_beta: float,
) -> jax.Array:
    """Per-position T^2 * D(teacher, student) of `[..., vocab]` logits: `[...]`, the teacher under stop_gradient."""
    log_p = _log_softmax(jax.lax.stop_gradient(teacher_logits), temperature)
    log_q = _log_softmax(student_logits, temperature)
    if direction == "forward":
        divergence = _kl(log_p, log_q)
    elif direction == "reverse":
        divergence = _kl(log_q, log_p)
    else:
        log_m = jnp.logaddexp(math.log(jsd_beta) + log_p, math.log1p(-jsd_beta) + log_q)
        divergence = jsd_beta * _kl(log_p, log_m) + (1.0 - jsd_beta) * _kl(log_q, log_m)
    # Rounding can leave a divergence of equal distributions a hair below zero.
    return temperature**2 * jnp.maximum(divergence, 0.0)


def _logits_divergence(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    *,
    temperature: float,
    direction: Direction,
    jsd_beta: float,
) -> jax.Array:
    """Validated options, then `_token_divergence` [batch, seq]."""
    _check_divergence(direction, jsd_beta, temperature)
    return _token_divergence(student_logits, teacher_logits, temperature=temperature, direction=direction, jsd_beta=jsd_beta)


def _distillation_result(divergence: jax.Array, mask: jax.Array, weights: jax.Array | None) -> tuple[jax.Array, Metrics]:
    """The weighted mean of per-token divergences and the distillation metrics."""
    token_weights = _token_weights(mask, weights)
    loss = _weighted_mean(divergence, token_weights)
    return loss, {"loss": loss, "kl": loss, "tokens": _count(token_weights)}


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
    student positions (`gather_teacher`); `mask` `[batch, seq]` (the batch's `kl_mask`); `weights` `[batch]`.
    With p = softmax(teacher / T), q = softmax(student / T), the per-token value is
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
    return _distillation_result(divergence, mask, weights)


def _salad_combine(
    divergence: jax.Array,
    ce_parts: tuple[jax.Array, ...],
    kl_weights: jax.Array,
    nll_weights: jax.Array,
    alpha: float,
) -> tuple[jax.Array, Metrics]:
    kl = _weighted_mean(divergence, kl_weights)
    nll, _, _, correct = ce_parts
    nll_mean = _weighted_mean(nll, nll_weights)
    loss = alpha * kl + (1.0 - alpha) * nll_mean
    return loss, {
        "loss": loss,
        "kl": kl,
        "nll": nll_mean,
        "accuracy": _weighted_mean(correct, nll_weights),
        "kl_tokens": _count(kl_weights),
        "nll_tokens": _count(nll_weights),
    }


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
    Shapes as `kl_distillation`. Metrics: loss, kl, nll, accuracy, kl_tokens, nll_tokens.
    """
    divergence = _logits_divergence(
        student_logits, teacher_logits, temperature=temperature, direction=direction, jsd_beta=jsd_beta
    )
    ce_parts = _cross_entropy_parts(student_logits, targets)
    return _salad_combine(
        divergence, ce_parts, _token_weights(kl_mask, weights), _token_weights(nll_mask, weights), alpha
    )


def _mean_squared_distance(
    x: jax.Array, target: jax.Array, mask: jax.Array, weights: jax.Array | None
) -> tuple[jax.Array, Metrics]:
    x = _upcast(x)
    target = _upcast(jax.lax.stop_gradient(target))
    per_position = jnp.mean(jnp.square(x - target), axis=-1)
    norms = jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(target, axis=-1)
    cosine = jnp.sum(x * target, axis=-1) / jnp.where(norms > 0, norms, 1.0)
    token_weights = _token_weights(mask, weights)
    loss = _weighted_mean(per_position, token_weights)
    return loss, {"loss": loss, "cosine": _weighted_mean(cosine, token_weights), "tokens": _count(token_weights)}


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


def _sequence_kl(model_logits: jax.Array, reference_logits: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
    per_token = _token_divergence(model_logits, reference_logits, temperature=1.0, direction="forward", jsd_beta=0.5)
    return _sequence_sums(per_token, mask)


def _sequence_sums(per_token: jax.Array, mask: jax.Array) -> tuple[jax.Array, Metrics]:
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


def _unembed(hidden: jax.Array, unembedding: jax.Array, softcap: float | None) -> jax.Array:
    """`[batch, chunk, d_model]` @ `[d_model, vocab]` -> float32 logits, soft-capped as Gemma."""
    accumulate = jnp.promote_types(jnp.result_type(hidden, unembedding), jnp.float32)
    logits = jnp.einsum("bcd,dv->bcv", hidden, unembedding, preferred_element_type=accumulate)
    if softcap is not None:
        logits = softcap * jnp.tanh(logits / softcap)
    return logits


def _teacher_unembed(hidden: jax.Array, unembedding: jax.Array, softcap: float | None) -> jax.Array:
    return _unembed(jax.lax.stop_gradient(hidden), jax.lax.stop_gradient(unembedding), softcap)


def _scan_chunks(
    per_chunk: Callable[..., tuple[jax.Array, ...]],
    unembedding: jax.Array,
    seq_inputs: tuple[jax.Array, ...],
    chunk_size: int,
) -> tuple[jax.Array, ...]:
    """Applies `per_chunk(unembedding, *[batch, chunk, ...])` -> `[batch, chunk]` outputs over the sequence.

    Returns the outputs stitched back to `[batch, seq]`. The chunk function is
    rematerialised in the backward pass, so only one chunk's logits exist at a time.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    batch, seq = seq_inputs[0].shape[:2]
    chunk = min(chunk_size, seq)
    n_chunks = -(-seq // chunk)
    pad = n_chunks * chunk - seq

    def split(x: jax.Array) -> jax.Array:
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape((batch, n_chunks, chunk) + x.shape[2:]), 1, 0)

    body = jax.checkpoint(per_chunk)

    def step(carry: None, xs: tuple[jax.Array, ...]) -> tuple[None, tuple[jax.Array, ...]]:
        return carry, body(unembedding, *xs)

    _, outputs = jax.lax.scan(step, None, tuple(split(x) for x in seq_inputs))
    return tuple(jnp.moveaxis(o, 0, 1).reshape(batch, n_chunks * chunk)[:, :seq] for o in outputs)


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
    for every `chunk_size`; metrics as there.
    """

    def per_chunk(w: jax.Array, h: jax.Array, t: jax.Array) -> tuple[jax.Array, ...]:
        return _cross_entropy_parts(_unembed(h, w, softcap), t)

    parts = _scan_chunks(per_chunk, unembedding, (hidden, targets), chunk_size)
    return _cross_entropy_from_parts(parts, _token_weights(mask, weights), label_smoothing, z_loss)


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
    `mask` `[batch, seq]`. Equals `kl_distillation` of the unembedded logits for every
    `chunk_size`; options and metrics as there.
    """
    _check_divergence(direction, jsd_beta, temperature)

    def per_chunk(w: jax.Array, hs: jax.Array, ht: jax.Array) -> tuple[jax.Array]:
        teacher = _teacher_unembed(ht, w, softcap)
        divergence = _token_divergence(
            _unembed(hs, w, softcap), teacher, temperature=temperature, direction=direction, jsd_beta=jsd_beta
        )
        return (divergence,)

    (divergence,) = _scan_chunks(per_chunk, unembedding, (student_hidden, teacher_hidden), chunk_size)
    return _distillation_result(divergence, mask, weights)


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
    `chunked_kl_distillation` plus `targets` `[batch, seq]`; metrics as `salad_objective`.
    """
    _check_divergence(direction, jsd_beta, temperature)

    def per_chunk(w: jax.Array, hs: jax.Array, ht: jax.Array, t: jax.Array) -> tuple[jax.Array, ...]:
        student = _unembed(hs, w, softcap)
        teacher = _teacher_unembed(ht, w, softcap)
        divergence = _token_divergence(
            student, teacher, temperature=temperature, direction=direction, jsd_beta=jsd_beta
        )
        return (divergence,) + _cross_entropy_parts(student, t)

    divergence, *ce_parts = _scan_chunks(per_chunk, unembedding, (student_hidden, teacher_hidden, targets), chunk_size)
    return _salad_combine(
        divergence, tuple(ce_parts), _token_weights(kl_mask, weights), _token_weights(nll_mask, weights), alpha
    )


def _chunked_sequence_kl(
    model_hidden: jax.Array,
    reference_hidden: jax.Array,
    unembedding: jax.Array,
    mask: jax.Array,
    chunk_size: int,
    softcap: float | None,
) -> tuple[jax.Array, Metrics]:
    def per_chunk(w: jax.Array, h: jax.Array, r: jax.Array) -> tuple[jax.Array]:
        reference = _teacher_unembed(r, w, softcap)
        return (
            _token_divergence(_unembed(h, w, softcap), reference, temperature=1.0, direction="forward", jsd_beta=0.5),
        )

    (per_token,) = _scan_chunks(per_chunk, unembedding, (model_hidden, reference_hidden), chunk_size)
    return _sequence_sums(per_token, mask)


def chunked_misalignment(
    speech_hidden: jax.Array,
    text_hidden: jax.Array,
    unembedding: jax.Array,
    mask: jax.Array,
    *,
    chunk_size: int,
    softcap: float | None = None,
) -> tuple[jax.Array, Metrics]:
    """`misalignment` from `[batch, seq, d_model]` hidden states and the `[d_model, vocab]` unembedding."""
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
    """`forgetting` from `[batch, seq, d_model]` hidden states and the `[d_model, vocab]` unembedding."""
    return _chunked_sequence_kl(adapted_hidden, original_hidden, unembedding, mask, chunk_size, softcap)


# --- CTC: frame-level alignment of audio frames to a transcript


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
    x = _upcast(logits)
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
