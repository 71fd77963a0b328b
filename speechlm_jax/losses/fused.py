"""The fused forms: every trained logit loss and its gradients in one chunked pass, under `jax.custom_vjp`.

Where this sits in the data flow: the same place as `chunked` (the objectives of
`train/objectives.py` hand final hidden states and the unembedding to one of these), with
the same signatures and the same numbers. `chunked` rematerialises each chunk's logits in
the backward pass, so a distillation step does 6 unembedding matmuls per chunk where the
naive form does 4. These forms do the naive form's 4 (3 for cross-entropy) without ever
holding more than one chunk's logits:

- the forward pass scans over chunks of `chunk_size` sequence positions; per chunk it
  computes the student's and the teacher's `[batch, chunk, vocab]` logits in one product
  (one pass over the unembedding: on a CPU, and for short chunks anywhere, reading the
  `[d_model, vocab]` matrix costs as much as the arithmetic), the per-token
  values the loss reduces, and the gradient of the loss with respect to those logits in
  closed form (below), scaled by each token's share of the weighted mean; it multiplies
  that gradient back through the unembedding into the chunk's `[batch, chunk, d_model]`
  gradient of the student hidden states and adds `hidden^T @ grad` into one
  `[d_model, vocab]` float32 accumulator for the unembedding;
- the custom VJP saves only those two gradients (`[batch, seq, d_model]` and
  `[d_model, vocab]`), and the backward pass multiplies them by the loss's cotangent.

Each gradient is computed only when it is asked for (`symbolic_zeros`: the forward pass
knows which inputs are differentiated), so a frozen unembedding costs no `[d_model, vocab]`
accumulator and no matmul; without any differentiation (evaluation) the loss runs as
`chunked` does. The teacher's hidden states and its use of the unembedding get no gradient
(the `stop_gradient` of `chunked`); the masks, weights and targets are data and get none
either. The metrics carry no gradient (they leave under `stop_gradient`). Only
first-order reverse mode is defined: `jax.grad` and `jax.vjp` work, `jax.jvp` and
second derivatives do not.

Closed forms, per token, of the gradient with respect to the student's logits x (after
soft-capping; the cap's derivative 1 - tanh^2 is applied afterwards), p = softmax(x):
- cross-entropy: (1 + 2 z lse) p - (1 - eps) onehot(target) - eps / vocab, for label
  smoothing eps and z-loss weight z;
- distillation, with q = softmax(x / T), p_t = softmax(teacher / T), D the raw divergence:
  T (q - p_t) (forward); T q (log q - log p_t - D) (reverse); T q (g - E_q g) with
  g = (1 - b)(log q - log m) (jsd); times 1, 1/2 or 0 as D > 0, D = 0 or D < 0 (the
  derivative of the clamp max(D, 0) as JAX defines it).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from speechlm_jax.losses.chunked import (
    chunk_length,
    chunked_cross_entropy,
    chunked_kl_distillation,
    chunked_salad_objective,
    join_chunks,
    split_chunks,
)
from speechlm_jax.losses.common import (
    Direction,
    Metrics,
    check_divergence_options,
    cross_entropy_from_parts,
    cross_entropy_parts,
    distillation_result,
    divergence_terms,
    per_token_weights,
    salad_result,
    upcast,
)


class _Spec(NamedTuple):
    """The static options of one fused loss (hashable: a `nondiff_argnums` argument)."""

    kind: str  # "cross_entropy" | "kl" | "salad"
    chunk_size: int
    softcap: float | None
    label_smoothing: float = 0.0
    z_loss: float = 0.0
    temperature: float = 1.0
    direction: Direction = "forward"
    jsd_beta: float = 0.5
    alpha: float = 1.0


def _mean_coefficients(token_weights: jax.Array | None) -> jax.Array | None:
    """d weighted_mean / d value: `where(w != 0, w, 0) / sum(w)` per token, `[batch, seq]`."""
    if token_weights is None:
        return None
    denom = jnp.sum(token_weights)
    return jnp.where(token_weights != 0, token_weights, 0.0) / jnp.where(denom != 0, denom, 1.0)


def _cross_entropy_grad(
    logits: jax.Array, targets: jax.Array, lse: jax.Array, coef: jax.Array, label_smoothing: float, z_loss: float
) -> jax.Array:
    """coef * d[(1 - eps) nll + eps smooth + z lse^2] / d logits, `[batch, chunk, vocab]`."""
    vocab = logits.shape[-1]
    p = jnp.exp(logits - lse[..., None])
    safe = jnp.clip(targets, 0, vocab - 1)
    onehot = jnp.arange(vocab) == safe[..., None]
    grad = (1.0 + 2.0 * z_loss * lse)[..., None] * p - jnp.where(onehot, 1.0 - label_smoothing, 0.0)
    if label_smoothing:
        grad = grad - label_smoothing / vocab
    return coef[..., None] * grad


def _divergence_grad(
    log_p: jax.Array,
    log_q: jax.Array,
    log_m: jax.Array | None,
    divergence: jax.Array,
    coef: jax.Array,
    spec: _Spec,
) -> jax.Array:
    """coef * d[T^2 max(D, 0)] / d student logits, `[batch, chunk, vocab]`."""
    q = jnp.exp(log_q)
    if spec.direction == "forward":
        grad = q - jnp.exp(log_p)
    elif spec.direction == "reverse":
        grad = q * (log_q - log_p - divergence[..., None])
    else:
        g = (1.0 - spec.jsd_beta) * (log_q - log_m)
        grad = q * (g - jnp.sum(q * g, axis=-1, keepdims=True))
    clamp = jnp.where(divergence > 0, 1.0, jnp.where(divergence == 0, 0.5, 0.0))
    return (coef * spec.temperature * clamp)[..., None] * grad


def _reduce(
    spec: _Spec, outputs: tuple[jax.Array, ...], kl_weights: jax.Array | None, nll_weights: jax.Array | None
) -> tuple[jax.Array, Metrics]:
    """The loss and metrics of `[batch, seq]` per-token outputs, by `common`'s reducers."""
    if spec.kind == "cross_entropy":
        return cross_entropy_from_parts(outputs, nll_weights, spec.label_smoothing, spec.z_loss)
    if spec.kind == "kl":
        return distillation_result(outputs[0], kl_weights, None)
    return salad_result(outputs[0], outputs[1:], kl_weights, nll_weights, spec.alpha)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(
    spec: _Spec,
    student_hidden: jax.Array,
    teacher_hidden: jax.Array | None,
    unembedding: jax.Array,
    targets: jax.Array | None,
    kl_weights: jax.Array | None,
    nll_weights: jax.Array | None,
) -> tuple[jax.Array, Metrics]:
    """The loss without its gradients: exactly the `chunked` form (token weights as its mask)."""
    if spec.kind == "cross_entropy":
        return chunked_cross_entropy(
            student_hidden,
            unembedding,
            targets,
            nll_weights,
            chunk_size=spec.chunk_size,
            softcap=spec.softcap,
            z_loss=spec.z_loss,
            label_smoothing=spec.label_smoothing,
        )
    options = dict(temperature=spec.temperature, direction=spec.direction, jsd_beta=spec.jsd_beta)
    if spec.kind == "kl":
        return chunked_kl_distillation(
            student_hidden,
            teacher_hidden,
            unembedding,
            kl_weights,
            chunk_size=spec.chunk_size,
            softcap=spec.softcap,
            **options,
        )
    return chunked_salad_objective(
        student_hidden,
        teacher_hidden,
        unembedding,
        targets,
        kl_weights,
        nll_weights,
        alpha=spec.alpha,
        chunk_size=spec.chunk_size,
        softcap=spec.softcap,
        **options,
    )


def _fused_fwd(spec: _Spec, student_hidden, teacher_hidden, unembedding, targets, kl_weights, nll_weights):
    """One scan: per chunk the per-token values and the gradients of the hidden states and the unembedding."""
    want_hidden, want_unembedding = student_hidden.perturbed, unembedding.perturbed
    hidden, w = student_hidden.value, unembedding.value
    teacher = None if teacher_hidden is None else teacher_hidden.value
    targets = None if targets is None else targets.value
    kl_weights = None if kl_weights is None else kl_weights.value
    nll_weights = None if nll_weights is None else nll_weights.value
    seq = hidden.shape[1]
    chunk = chunk_length(seq, spec.chunk_size)
    has_kl, has_ce = spec.kind in ("kl", "salad"), spec.kind in ("cross_entropy", "salad")
    kl_coef, nll_coef = _mean_coefficients(kl_weights), _mean_coefficients(nll_weights)
    if spec.kind == "salad":
        kl_coef, nll_coef = spec.alpha * kl_coef, (1.0 - spec.alpha) * nll_coef
    accumulate = jnp.promote_types(jnp.result_type(hidden, w), jnp.float32)
    compute = jnp.result_type(hidden, w)
    seq_inputs = {"h": hidden, "ht": teacher, "t": targets, "ckl": kl_coef, "cnll": nll_coef}
    seq_inputs = {k: split_chunks(v, chunk) for k, v in seq_inputs.items() if v is not None}

    def step(grad_w: jax.Array | None, xs: dict[str, jax.Array]) -> tuple[jax.Array | None, tuple[jax.Array, ...]]:
        h = xs["h"]
        if has_kl:
            # Student and teacher rows in one product: one pass over the unembedding, not two.
            both = jnp.einsum("sbcd,dv->sbcv", jnp.stack([h, xs["ht"]]), w, preferred_element_type=accumulate)
            raw, teacher = both[0], both[1]
        else:
            raw = jnp.einsum("bcd,dv->bcv", h, w, preferred_element_type=accumulate)
        if spec.softcap is None:
            logits = raw
        else:
            capped = jnp.tanh(raw / spec.softcap)
            logits = spec.softcap * capped
            if has_kl:
                teacher = spec.softcap * jnp.tanh(teacher / spec.softcap)
        outputs: tuple[jax.Array, ...] = ()
        grad = None
        if has_kl:
            log_p, log_q, log_m, divergence = divergence_terms(
                logits, teacher, temperature=spec.temperature, direction=spec.direction, jsd_beta=spec.jsd_beta
            )
            outputs += (spec.temperature**2 * jnp.maximum(divergence, 0.0),)
            grad = _divergence_grad(log_p, log_q, log_m, divergence, xs["ckl"], spec)
        if has_ce:
            parts = cross_entropy_parts(logits, xs["t"])
            outputs += parts
            ce_grad = _cross_entropy_grad(logits, xs["t"], parts[2], xs["cnll"], spec.label_smoothing, spec.z_loss)
            grad = ce_grad if grad is None else grad + ce_grad
        if spec.softcap is not None:
            grad = grad * (1.0 - jnp.square(capped))
        grad = grad.astype(compute)
        if want_hidden:
            grad_h = jnp.einsum("bcv,dv->bcd", grad, w, preferred_element_type=accumulate).astype(hidden.dtype)
            outputs += (grad_h,)
        if want_unembedding:
            grad_w = grad_w + jnp.einsum("bcd,bcv->dv", h, grad, preferred_element_type=accumulate)
        return grad_w, outputs

    init = jnp.zeros(w.shape, accumulate) if want_unembedding else None
    grad_w, outputs = jax.lax.scan(step, init, seq_inputs)
    outputs = tuple(join_chunks(o, seq) for o in outputs)
    grad_h = None
    if want_hidden:
        *outputs, grad_h = outputs
    if grad_w is not None:
        grad_w = grad_w.astype(w.dtype)
    return _reduce(spec, tuple(outputs), kl_weights, nll_weights), (grad_h, grad_w)


def _fused_bwd(spec: _Spec, residuals, cotangents):
    """Scales the saved gradients by the loss's cotangent (the metrics' is zero: `stop_gradient`)."""
    grad_h, grad_w = residuals
    g = cotangents[0]
    if isinstance(g, SymbolicZero):
        return (None,) * 6

    def scale(x: jax.Array | None) -> jax.Array | None:
        return None if x is None else (g * upcast(x)).astype(x.dtype)

    return scale(grad_h), None, scale(grad_w), None, None, None


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)


def _run(spec: _Spec, student_hidden, teacher_hidden, unembedding, targets, kl_weights, nll_weights):
    """`_fused` with the data (targets, token weights, the teacher) outside differentiation, metrics too."""
    data = jax.lax.stop_gradient((teacher_hidden, targets, kl_weights, nll_weights))
    loss, metrics = _fused(spec, student_hidden, data[0], unembedding, *data[1:])
    return loss, jax.lax.stop_gradient(metrics)


def fused_cross_entropy(
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
    """`chunked_cross_entropy` (same arguments, values and metrics) with its gradients computed in the forward pass.

    `hidden` `[batch, seq, d_model]`, `unembedding` `[d_model, vocab]`, `targets`/`mask`
    `[batch, seq]`, `weights` `[batch]`. Gradients reach `hidden` and `unembedding` only.
    """
    spec = _Spec("cross_entropy", chunk_size, softcap, label_smoothing=label_smoothing, z_loss=z_loss)
    chunk_length(hidden.shape[1], chunk_size)
    return _run(spec, hidden, None, unembedding, targets, None, per_token_weights(mask, weights))


def fused_kl_distillation(
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
    """`chunked_kl_distillation` (same arguments, values and metrics) with its gradients computed in the forward pass.

    `student_hidden`, `teacher_hidden` `[batch, seq, d_model]` (teacher at student
    positions), `unembedding` `[d_model, vocab]`, `mask` `[batch, seq]`, `weights` `[batch]`.
    Gradients reach `student_hidden` and `unembedding` (the student's use of it) only.
    """
    check_divergence_options(direction, jsd_beta, temperature)
    chunk_length(student_hidden.shape[1], chunk_size)
    spec = _Spec("kl", chunk_size, softcap, temperature=temperature, direction=direction, jsd_beta=jsd_beta)
    return _run(spec, student_hidden, teacher_hidden, unembedding, None, per_token_weights(mask, weights), None)


def fused_salad_objective(
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
    """`chunked_salad_objective` (same arguments, values and metrics) with its gradients computed in the forward pass.

    KL and NLL share each chunk's student logits and their gradient. Shapes as
    `fused_kl_distillation` plus `targets`, `nll_mask` `[batch, seq]`.
    """
    check_divergence_options(direction, jsd_beta, temperature)
    chunk_length(student_hidden.shape[1], chunk_size)
    spec = _Spec(
        "salad", chunk_size, softcap, temperature=temperature, direction=direction, jsd_beta=jsd_beta, alpha=alpha
    )
    return _run(
        spec,
        student_hidden,
        teacher_hidden,
        unembedding,
        targets,
        per_token_weights(kl_mask, weights),
        per_token_weights(nll_mask, weights),
    )
