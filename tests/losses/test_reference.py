"""Tests of speechlm_jax.losses.reference against float64 NumPy references and by properties.

Values and gradients against the float64 references of the `numpy_ref` fixture; hypothesis
checks the properties of the divergences (KL >= 0 with Pinsker's bound, zero iff the
distributions agree, temperature semantics).
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

from speechlm_jax.losses.chunked import chunked_cross_entropy
from speechlm_jax.losses.reference import (
    behavior_imitation_loss,
    forgetting,
    kl_distillation,
    masked_cross_entropy,
    misalignment,
    place_response,
    salad_objective,
)

FAST = hypothesis.settings(max_examples=15, deadline=None, derandomize=True, print_blob=True)
seeds = st.integers(0, 2**31 - 1)

# --- values and gradients against the references --------------------------------------------


@pytest.mark.parametrize(
    "label_smoothing,z_loss,use_weights", [(0.0, 0.0, False), (0.1, 0.0, True), (0.0, 1e-2, True), (0.2, 1e-3, False)]
)
def test_masked_cross_entropy_matches_float64(label_smoothing, z_loss, use_weights, numpy_ref):
    x = numpy_ref.make_inputs(0)
    weights = x["weights"] if use_weights else None
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss)

    def loss(logits):
        return masked_cross_entropy(logits, x["targets"], x["mask"], weights=weights, **options)

    def ref(logits):
        return numpy_ref.cross_entropy(logits, x["targets"], x["mask"], weights, **options)

    value, metrics = loss(jnp.asarray(x["student"]))
    np.testing.assert_allclose(value, ref(numpy_ref.f64(x["student"])), rtol=1e-6, atol=1e-6)
    nll = numpy_ref.cross_entropy(numpy_ref.f64(x["student"]), x["targets"], x["mask"], weights)
    np.testing.assert_allclose(metrics["nll"], nll, rtol=1e-6)
    assert metrics["tokens"] == x["mask"].sum()
    grad = jax.grad(lambda logits: loss(logits)[0])(jnp.asarray(x["student"]))
    np.testing.assert_allclose(grad, numpy_ref.numeric_grad(ref, x["student"]), atol=1e-5)


@pytest.mark.parametrize("direction", ("forward", "reverse", "jsd"))
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
def test_kl_distillation_matches_float64(direction, temperature, numpy_ref):
    x = numpy_ref.make_inputs(1)
    options = dict(temperature=temperature, direction=direction)

    def loss(student, teacher):
        return kl_distillation(student, teacher, x["kl_mask"], weights=x["weights"], **options)[0]

    def ref(student):
        return numpy_ref.kl_distillation(student, numpy_ref.f64(x["teacher"]), x["kl_mask"], x["weights"], **options)

    student, teacher = jnp.asarray(x["student"]), jnp.asarray(x["teacher"])
    np.testing.assert_allclose(loss(student, teacher), ref(numpy_ref.f64(x["student"])), rtol=1e-6, atol=1e-6)
    grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher)
    np.testing.assert_allclose(grad_student, numpy_ref.numeric_grad(ref, x["student"]), atol=1e-5)
    np.testing.assert_array_equal(grad_teacher, 0.0)


def test_salad_objective_matches_float64(numpy_ref):
    x = numpy_ref.make_inputs(2)
    options = dict(temperature=2.0, direction="forward")

    def loss(student):
        return salad_objective(
            student, x["teacher"], x["targets"], x["kl_mask"], x["mask"], alpha=0.3, weights=x["weights"], **options
        )

    def ref(student):
        return numpy_ref.salad(
            student, numpy_ref.f64(x["teacher"]), x["targets"], x["kl_mask"], x["mask"], 0.3, x["weights"], **options
        )

    value, metrics = loss(jnp.asarray(x["student"]))
    np.testing.assert_allclose(value, ref(numpy_ref.f64(x["student"])), rtol=1e-6, atol=1e-6)
    kl = numpy_ref.kl_distillation(
        numpy_ref.f64(x["student"]), numpy_ref.f64(x["teacher"]), x["kl_mask"], x["weights"], **options
    )
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-6)
    assert metrics["kl_tokens"] == x["kl_mask"].sum() and metrics["nll_tokens"] == x["mask"].sum()
    grad = jax.grad(lambda s: loss(s)[0])(jnp.asarray(x["student"]))
    np.testing.assert_allclose(grad, numpy_ref.numeric_grad(ref, x["student"]), atol=1e-5)


@pytest.mark.parametrize("fn", [misalignment, forgetting])
def test_diagnostics_match_float64(fn, numpy_ref):
    x = numpy_ref.make_inputs(4, batch=3)
    total, metrics = fn(jnp.asarray(x["student"]), jnp.asarray(x["teacher"]), x["kl_mask"])
    per_sequence = numpy_ref.sequence_kl(numpy_ref.f64(x["student"]), numpy_ref.f64(x["teacher"]), x["kl_mask"])
    np.testing.assert_allclose(metrics["per_sequence"], per_sequence, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(total, per_sequence.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["per_token"], per_sequence.sum() / x["kl_mask"].sum(), rtol=1e-6)
    np.testing.assert_array_equal(metrics["tokens_per_sequence"], x["kl_mask"].sum(1))


def test_behavior_imitation_places_greedy_response(numpy_ref):
    x = numpy_ref.make_inputs(5, batch=2, seq=8, vocab=9)
    eos = 4
    response = np.array([[1, 2, eos, 7, 7], [3, 5, 6, 8, 2]], np.int32)
    start = np.array([2, 5], np.int32)
    targets = np.zeros((2, 8), np.int32)
    mask = np.zeros((2, 8), np.float32)
    for b in range(2):
        for r in range(5):
            if start[b] + r < 8 and eos not in response[b, :r]:
                targets[b, start[b] + r] = response[b, r]
                mask[b, start[b] + r] = 1.0
    value, metrics = behavior_imitation_loss(
        jnp.asarray(x["student"]),
        response,
        np.ones((2, 5), np.float32),
        response_start=start,
        eos_id=eos,
        weights=x["weights"],
    )
    want = numpy_ref.cross_entropy(numpy_ref.f64(x["student"]), targets, mask, x["weights"])
    np.testing.assert_allclose(value, want, rtol=1e-6)
    assert metrics["tokens"] == 6  # 3 up to and including EOS, 3 before the sequence ends
    aligned, _ = behavior_imitation_loss(jnp.asarray(x["student"]), targets, mask, weights=x["weights"])
    np.testing.assert_allclose(aligned, value, rtol=1e-7)


@pytest.mark.parametrize("name", ["cross_entropy", "forward", "reverse", "jsd", "salad"])
def test_gradients_by_finite_differences_float64(name, numpy_ref):
    def loss_and_args(a: dict[str, jax.Array]) -> tuple[Callable, tuple]:
        kl_options = dict(temperature=1.5)
        functions: dict[str, tuple[Callable, tuple]] = {
            "cross_entropy": (
                lambda s: masked_cross_entropy(s, a["targets"], a["mask"], label_smoothing=0.1, z_loss=1e-2)[0],
                (a["student"],),
            ),
            "salad": (
                lambda s: salad_objective(s, a["teacher"], a["targets"], a["kl_mask"], a["mask"], alpha=0.4)[0],
                (a["student"],),
            ),
        }
        for direction in ("forward", "reverse", "jsd"):
            functions[direction] = (
                lambda s, d=direction: kl_distillation(s, a["teacher"], a["kl_mask"], direction=d, **kl_options)[0],
                (a["student"],),
            )
        return functions[name]

    numpy_ref.check_float64_gradients(loss_and_args)


# --- properties -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("direction", "temperature"))
def jit_kl(student, teacher, mask, weights=None, *, direction="forward", temperature=1.0):
    return kl_distillation(student, teacher, mask, weights=weights, temperature=temperature, direction=direction)[0]


def total_variation(numpy_ref, student, teacher, temperature) -> np.ndarray:
    """`[batch, seq]` TV distance between the distributions the divergence compares."""
    q = numpy_ref.softmax(numpy_ref.f64(student) / temperature)
    p = numpy_ref.softmax(numpy_ref.f64(teacher) / temperature)
    return 0.5 * np.abs(p - q).sum(-1)


@FAST
@hypothesis.given(
    seed=seeds, direction=st.sampled_from(("forward", "reverse", "jsd")), temperature=st.sampled_from([1.0, 3.0])
)
def test_divergence_is_nonnegative_and_above_pinsker_bound(seed, direction, temperature, numpy_ref):
    """D >= c * 2 T^2 TV^2 (Pinsker; c = b(1-b) for the b-JSD), so D > 0 whenever p != q."""
    x = numpy_ref.make_inputs(seed)
    value = jit_kl(x["student"], x["teacher"], x["kl_mask"], x["weights"], direction=direction, temperature=temperature)
    tv = total_variation(numpy_ref, x["student"], x["teacher"], temperature)
    c = 0.25 if direction == "jsd" else 1.0
    bound = numpy_ref.weighted_mean(c * 2 * temperature**2 * tv**2, x["kl_mask"], x["weights"])
    assert value >= 0.0
    assert value >= bound * (1 - 1e-4) - 1e-7


@FAST
@hypothesis.given(
    seed=seeds, direction=st.sampled_from(("forward", "reverse", "jsd")), temperature=st.sampled_from([1.0, 3.0])
)
def test_divergence_is_zero_when_distributions_agree_on_masked_positions(seed, direction, temperature, numpy_ref):
    x = numpy_ref.make_inputs(seed)
    shift = np.random.default_rng(seed).normal(size=x["student"].shape[:2] + (1,)).astype(np.float32)
    teacher = np.where(x["kl_mask"][..., None] > 0, x["student"] + shift, x["teacher"])
    value = jit_kl(x["student"], teacher, x["kl_mask"], x["weights"], direction=direction, temperature=temperature)
    assert 0.0 <= value <= 1e-6


@FAST
@hypothesis.given(
    seed=seeds, direction=st.sampled_from(("forward", "reverse", "jsd")), temperature=st.sampled_from([3.0])
)
def test_temperature_divides_logits_and_scales_by_its_square(seed, direction, temperature, numpy_ref):
    x = numpy_ref.make_inputs(seed)
    s, t, m, w = x["student"], x["teacher"], x["kl_mask"], x["weights"]
    tempered = jit_kl(s, t, m, w, direction=direction, temperature=temperature)
    plain = jit_kl(s / temperature, t / temperature, m, w, direction=direction)
    np.testing.assert_allclose(tempered, temperature**2 * plain, rtol=1e-5, atol=1e-6)


# --- errors ---------------------------------------------------------------------------------


def test_invalid_options_raise(numpy_ref):
    x = numpy_ref.make_inputs(10)
    with pytest.raises(ValueError, match="direction"):
        kl_distillation(x["student"], x["teacher"], x["mask"], direction="backward")
    with pytest.raises(ValueError, match="jsd_beta"):
        kl_distillation(x["student"], x["teacher"], x["mask"], direction="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="temperature"):
        salad_objective(x["student"], x["teacher"], x["targets"], x["mask"], x["mask"], alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_cross_entropy(x["student_hidden"], x["unembedding"], x["targets"], x["mask"], chunk_size=0)
    with pytest.raises(ValueError, match="aligned response"):
        place_response(x["targets"][:, :3], x["mask"][:, :3], 5)
