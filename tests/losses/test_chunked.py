"""Tests of speechlm_jax.losses.chunked: float64 references, and chunked == reference for every chunk size.

The chunked forms must give the values, metrics and gradients of their from-logits
definitions (`speechlm_jax.losses.reference`) for chunks that divide the sequence, that
do not, and that are longer than it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechlm_jax.losses.chunked import (
    chunked_cross_entropy,
    chunked_forgetting,
    chunked_kl_distillation,
    chunked_misalignment,
    chunked_salad_objective,
)
from speechlm_jax.losses.reference import (
    forgetting,
    kl_distillation,
    masked_cross_entropy,
    misalignment,
    salad_objective,
)

FAST = hypothesis.settings(max_examples=15, deadline=None, derandomize=True, print_blob=True)
seeds = st.integers(0, 2**31 - 1)


@pytest.mark.parametrize("name", ["chunked_cross_entropy", "chunked_kl", "chunked_salad"])
def test_gradients_by_finite_differences_float64(name, numpy_ref):
    def loss_and_args(a: dict[str, jax.Array]) -> tuple[Callable, tuple]:
        chunked = dict(chunk_size=3, softcap=5.0, weights=a["weights"])
        kl_options = dict(temperature=1.5)
        functions: dict[str, tuple[Callable, tuple]] = {
            "chunked_cross_entropy": (
                lambda h, w: chunked_cross_entropy(h, w, a["targets"], a["mask"], z_loss=1e-2, **chunked)[0],
                (a["student_hidden"], a["unembedding"]),
            ),
            # The teacher also reads the unembedding, under stop_gradient, so finite
            # differences (which would move the teacher too) perturb only the student hidden.
            "chunked_kl": (
                lambda h: chunked_kl_distillation(
                    h, a["teacher_hidden"], a["unembedding"], a["kl_mask"], direction="jsd", **kl_options, **chunked
                )[0],
                (a["student_hidden"],),
            ),
            "chunked_salad": (
                lambda h: chunked_salad_objective(
                    h,
                    a["teacher_hidden"],
                    a["unembedding"],
                    a["targets"],
                    a["kl_mask"],
                    a["mask"],
                    alpha=0.4,
                    **chunked,
                )[0],
                (a["student_hidden"],),
            ),
        }
        return functions[name]

    numpy_ref.check_float64_gradients(loss_and_args)


@pytest.mark.parametrize("direction", ("forward", "reverse", "jsd"))
def test_chunked_kl_matches_float64_with_teacher_held_fixed(direction, numpy_ref):
    """Value and both gradients against the float64 reference, the teacher's logits constant."""
    x = numpy_ref.make_inputs(11, seq=5, vocab=6, d_model=3)
    softcap, options = 4.0, dict(temperature=2.0, direction=direction)
    teacher_logits = numpy_ref.unembed(x["teacher_hidden"], x["unembedding"], softcap)

    def ref(h, w):
        student_logits = numpy_ref.unembed(h, w, softcap)
        return numpy_ref.kl_distillation(student_logits, teacher_logits, x["kl_mask"], x["weights"], **options)

    def loss(h, w):
        return chunked_kl_distillation(
            h, x["teacher_hidden"], w, x["kl_mask"], chunk_size=2, softcap=softcap, weights=x["weights"], **options
        )[0]

    h, w = numpy_ref.f64(x["student_hidden"]), numpy_ref.f64(x["unembedding"])
    value, (grad_h, grad_w) = jax.value_and_grad(loss, argnums=(0, 1))(x["student_hidden"], x["unembedding"])
    np.testing.assert_allclose(value, ref(h, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_h, numpy_ref.numeric_grad(lambda v: ref(v, w), h), atol=1e-5)
    np.testing.assert_allclose(grad_w, numpy_ref.numeric_grad(lambda v: ref(h, v), w), atol=1e-5)


def test_chunked_cross_entropy_matches_float64(numpy_ref):
    x = numpy_ref.make_inputs(12, seq=5, vocab=6, d_model=3)
    options = dict(label_smoothing=0.1, z_loss=1e-2)

    def ref(h, w):
        return numpy_ref.cross_entropy(numpy_ref.unembed(h, w, 3.0), x["targets"], x["mask"], x["weights"], **options)

    def loss(h, w):
        return chunked_cross_entropy(
            h, w, x["targets"], x["mask"], chunk_size=3, softcap=3.0, weights=x["weights"], **options
        )[0]

    h, w = numpy_ref.f64(x["student_hidden"]), numpy_ref.f64(x["unembedding"])
    value, (grad_h, grad_w) = jax.value_and_grad(loss, argnums=(0, 1))(x["student_hidden"], x["unembedding"])
    np.testing.assert_allclose(value, ref(h, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_h, numpy_ref.numeric_grad(lambda v: ref(v, w), h), atol=1e-5)
    np.testing.assert_allclose(grad_w, numpy_ref.numeric_grad(lambda v: ref(h, v), w), atol=1e-5)


@functools.partial(jax.jit, static_argnames=("chunk_size", "softcap", "direction"))
def chunked_and_plain(h, u, v, *, chunk_size, softcap, direction):
    """(chunked, unchunked) value, metrics and gradients for every chunked loss."""
    teacher_hidden, w, targets, mask, kl_mask = v["teacher_hidden"], v["weights"], v["targets"], v["mask"], v["kl_mask"]
    chunked = dict(chunk_size=chunk_size, softcap=softcap, weights=w)
    kl_options = dict(direction=direction, temperature=1.5)
    ce_options = dict(label_smoothing=0.1, z_loss=1e-2)

    def logits(hidden, unembedding):
        out = jnp.einsum("btd,dv->btv", hidden, unembedding)
        return out if softcap is None else softcap * jnp.tanh(out / softcap)

    pairs = [
        (
            lambda h, u: chunked_cross_entropy(h, u, targets, mask, **ce_options, **chunked),
            lambda h, u: masked_cross_entropy(logits(h, u), targets, mask, weights=w, **ce_options),
        ),
        (
            lambda h, u: chunked_kl_distillation(h, teacher_hidden, u, kl_mask, **kl_options, **chunked),
            lambda h, u: kl_distillation(logits(h, u), logits(teacher_hidden, u), kl_mask, weights=w, **kl_options),
        ),
        (
            lambda h, u: chunked_salad_objective(
                h, teacher_hidden, u, targets, kl_mask, mask, alpha=0.3, **kl_options, **chunked
            ),
            lambda h, u: salad_objective(
                logits(h, u), logits(teacher_hidden, u), targets, kl_mask, mask, alpha=0.3, weights=w, **kl_options
            ),
        ),
        (
            lambda h, u: chunked_misalignment(h, teacher_hidden, u, kl_mask, chunk_size=chunk_size, softcap=softcap),
            lambda h, u: misalignment(logits(h, u), logits(teacher_hidden, u), kl_mask),
        ),
        (
            lambda h, u: chunked_forgetting(h, teacher_hidden, u, kl_mask, chunk_size=chunk_size, softcap=softcap),
            lambda h, u: forgetting(logits(h, u), logits(teacher_hidden, u), kl_mask),
        ),
    ]
    return [tuple(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(h, u) for fn in pair) for pair in pairs]


@pytest.mark.parametrize(
    "chunk_size,direction,softcap",
    [(1, "forward", None), (2, "reverse", 3.0), (3, "jsd", None), (8, "forward", 3.0)],
)
@hypothesis.settings(FAST, max_examples=6)
@hypothesis.given(seed=seeds)
def test_chunked_equals_unchunked_for_every_chunk_size(chunk_size, direction, softcap, seed, numpy_ref):
    """Sequence length 5: a chunk that divides it (1), ones that do not (2, 3) and a longer one (8)."""
    x = numpy_ref.make_inputs(seed, d_model=3)
    results = chunked_and_plain(
        x["student_hidden"], x["unembedding"], x, chunk_size=chunk_size, softcap=softcap, direction=direction
    )
    for ((got, got_metrics), got_grads), ((want, want_metrics), want_grads) in results:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert got_metrics.keys() == want_metrics.keys()
        for key in want_metrics:
            np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-6, atol=1e-6)
        for g, h in zip(got_grads, want_grads):
            np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)


def test_jit_matches_eager_and_empty_mask_gives_zero(numpy_ref):
    x = numpy_ref.make_inputs(9)
    fn = jax.jit(
        lambda h, u, m: chunked_salad_objective(
            h, x["teacher_hidden"], u, x["targets"], m, m, alpha=0.5, chunk_size=2, direction="reverse"
        )[0]
    )
    eager = chunked_salad_objective(
        x["student_hidden"],
        x["teacher_hidden"],
        x["unembedding"],
        x["targets"],
        x["mask"],
        x["mask"],
        alpha=0.5,
        chunk_size=2,
        direction="reverse",
    )[0]
    np.testing.assert_allclose(fn(x["student_hidden"], x["unembedding"], x["mask"]), eager, rtol=1e-6)
    empty = np.zeros_like(x["mask"])
    assert fn(x["student_hidden"], x["unembedding"], empty) == 0.0
    grads = jax.grad(fn, argnums=(0, 1))(x["student_hidden"], x["unembedding"], empty)
    assert all(bool(jnp.all(g == 0)) for g in grads)
