"""Tests of speechlm_jax.losses.fused: the naive forms' values, metrics and gradients, made in one forward pass.

The fused forms must give the losses, metrics and gradients (student hidden states and
unembedding) of their from-logits definitions (`speechlm_jax.losses.reference`) within
1e-5 for every option: chunks that divide the sequence, that do not, and that are longer
than it; rows with nothing supervised; every divergence direction; soft-capping; label
smoothing and z-loss; bf16 inputs. Gradients are computed only for what is differentiated.
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

from speechlm_jax.losses.chunked import chunked_cross_entropy, chunked_kl_distillation, chunked_salad_objective
from speechlm_jax.losses.common import BF16_ATOL, BF16_RTOL
from speechlm_jax.losses.fused import fused_cross_entropy, fused_kl_distillation, fused_salad_objective
from speechlm_jax.losses.reference import kl_distillation, masked_cross_entropy, salad_objective

FAST = hypothesis.settings(max_examples=15, deadline=None, derandomize=True, print_blob=True)
seeds = st.integers(0, 2**31 - 1)

# (chunk_size, direction, softcap, temperature, jsd_beta, label_smoothing, z_loss, alpha, weighted);
# sequence length 5: chunk 1 divides it, 2 and 3 leave an uneven last chunk, 8 is longer.
OPTIONS = [
    (1, "forward", None, 1.0, 0.5, 0.0, 0.0, 0.3, True),
    (2, "reverse", 3.0, 1.5, 0.5, 0.1, 1e-2, 0.7, True),
    (3, "jsd", None, 2.0, 0.3, 0.1, 0.0, 0.5, False),
    (8, "forward", 3.0, 0.7, 0.5, 0.0, 1e-2, 1.0, True),
    (2, "jsd", 4.0, 1.0, 0.5, 0.2, 1e-3, 0.0, True),
    (3, "reverse", None, 1.0, 0.5, 0.0, 0.0, 0.5, False),
]


def _logits(hidden: jax.Array, unembedding: jax.Array, softcap: float | None) -> jax.Array:
    out = jnp.einsum("btd,dv->btv", hidden, unembedding)
    return out if softcap is None else softcap * jnp.tanh(out / softcap)


@functools.partial(
    jax.jit,
    static_argnames=(
        "chunk_size",
        "direction",
        "softcap",
        "temperature",
        "jsd_beta",
        "label_smoothing",
        "z_loss",
        "alpha",
        "weighted",
    ),
)
def fused_and_naive(
    h, u, v, *, chunk_size, direction, softcap, temperature, jsd_beta, label_smoothing, z_loss, alpha, weighted
):
    """(fused, naive) value, metrics and gradients w.r.t. (hidden, unembedding) of each fused loss."""
    teacher_hidden, targets, mask, kl_mask = v["teacher_hidden"], v["targets"], v["mask"], v["kl_mask"]
    w = v["weights"] if weighted else None
    fused = dict(chunk_size=chunk_size, softcap=softcap, weights=w)
    kl = dict(direction=direction, temperature=temperature, jsd_beta=jsd_beta)
    ce = dict(label_smoothing=label_smoothing, z_loss=z_loss)
    pairs = [
        (
            lambda h, u: fused_cross_entropy(h, u, targets, mask, **ce, **fused),
            lambda h, u: masked_cross_entropy(_logits(h, u, softcap), targets, mask, weights=w, **ce),
        ),
        (
            lambda h, u: fused_kl_distillation(h, teacher_hidden, u, kl_mask, **kl, **fused),
            lambda h, u: kl_distillation(
                _logits(h, u, softcap), _logits(teacher_hidden, u, softcap), kl_mask, weights=w, **kl
            ),
        ),
        (
            lambda h, u: fused_salad_objective(
                h, teacher_hidden, u, targets, kl_mask, mask, alpha=alpha, **kl, **fused
            ),
            lambda h, u: salad_objective(
                _logits(h, u, softcap),
                _logits(teacher_hidden, u, softcap),
                targets,
                kl_mask,
                mask,
                alpha=alpha,
                weights=w,
                **kl,
            ),
        ),
    ]
    return [tuple(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(h, u) for fn in pair) for pair in pairs]


def assert_same(results) -> None:
    for ((got, got_metrics), got_grads), ((want, want_metrics), want_grads) in results:
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
        assert got_metrics.keys() == want_metrics.keys()
        for key in want_metrics:
            np.testing.assert_allclose(got_metrics[key], want_metrics[key], rtol=1e-6, atol=1e-6, err_msg=key)
        for g, h in zip(got_grads, want_grads, strict=True):
            assert g.dtype == h.dtype and g.shape == h.shape
            np.testing.assert_allclose(g, h, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: "-".join(map(str, o)))
@hypothesis.settings(FAST, max_examples=4)
@hypothesis.given(seed=seeds, masked_row=st.booleans())
def test_fused_equals_naive_values_metrics_and_gradients(options, seed, masked_row, numpy_ref):
    """Every option combination against the from-logits form; optionally row 0 supervises nothing."""
    chunk_size, direction, softcap, temperature, jsd_beta, label_smoothing, z_loss, alpha, weighted = options
    x = numpy_ref.make_inputs(seed, batch=3, d_model=3)
    if masked_row:
        x["mask"][0], x["kl_mask"][0] = 0.0, 0.0
        x["mask"][1, 0] = 1.0
    results = fused_and_naive(
        x["student_hidden"],
        x["unembedding"],
        x,
        chunk_size=chunk_size,
        direction=direction,
        softcap=softcap,
        temperature=temperature,
        jsd_beta=jsd_beta,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        alpha=alpha,
        weighted=weighted,
    )
    assert_same(results)
    if masked_row:
        for (_, (grad_h, _)), _ in results:
            assert not np.asarray(grad_h[0]).any()


@pytest.mark.parametrize("name", ["cross_entropy", "kl", "salad"])
def test_gradients_by_finite_differences_float64(name, numpy_ref):
    """`check_grads` (reverse mode, first order) in float64 through the custom VJP."""

    def loss_and_args(a: dict[str, jax.Array]) -> tuple[Callable, tuple]:
        fused = dict(chunk_size=3, softcap=5.0, weights=a["weights"])
        kl = dict(temperature=1.5, direction="jsd", jsd_beta=0.4)
        # The teacher also reads the unembedding, under stop_gradient, so finite differences
        # (which would move the teacher too) perturb only the student hidden states of KL and
        # SALAD; `test_fused_salad_matches_float64_with_teacher_held_fixed` checks the unembedding.
        teacher, unembedding = a["teacher_hidden"], a["unembedding"]
        functions: dict[str, tuple[Callable, tuple]] = {
            "cross_entropy": (
                lambda h, u: fused_cross_entropy(
                    h, u, a["targets"], a["mask"], z_loss=1e-2, label_smoothing=0.1, **fused
                )[0],
                (a["student_hidden"], a["unembedding"]),
            ),
            "kl": (
                lambda h: fused_kl_distillation(h, teacher, unembedding, a["kl_mask"], **kl, **fused)[0],
                (a["student_hidden"],),
            ),
            "salad": (
                lambda h: fused_salad_objective(
                    h, teacher, unembedding, a["targets"], a["kl_mask"], a["mask"], alpha=0.4, **kl, **fused
                )[0],
                (a["student_hidden"],),
            ),
        }
        return functions[name]

    numpy_ref.check_float64_gradients(loss_and_args)


@pytest.mark.parametrize("direction", ("forward", "reverse", "jsd"))
def test_fused_salad_matches_float64_with_teacher_held_fixed(direction, numpy_ref):
    """Value and both gradients of SALAD against the float64 NumPy reference, the teacher's logits constant."""
    x = numpy_ref.make_inputs(13, seq=5, vocab=6, d_model=3)
    softcap, alpha, options = 4.0, 0.6, dict(temperature=2.0, direction=direction)
    teacher_logits = numpy_ref.unembed(x["teacher_hidden"], x["unembedding"], softcap)

    def ref(h, w):
        student_logits = numpy_ref.unembed(h, w, softcap)
        return numpy_ref.salad(
            student_logits, teacher_logits, x["targets"], x["kl_mask"], x["mask"], alpha, x["weights"], **options
        )

    def loss(h, w):
        return fused_salad_objective(
            h,
            x["teacher_hidden"],
            w,
            x["targets"],
            x["kl_mask"],
            x["mask"],
            alpha=alpha,
            chunk_size=2,
            softcap=softcap,
            weights=x["weights"],
            **options,
        )[0]

    h, w = numpy_ref.f64(x["student_hidden"]), numpy_ref.f64(x["unembedding"])
    value, (grad_h, grad_w) = jax.value_and_grad(loss, argnums=(0, 1))(x["student_hidden"], x["unembedding"])
    np.testing.assert_allclose(value, ref(h, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_h, numpy_ref.numeric_grad(lambda v: ref(v, w), h), atol=1e-5)
    np.testing.assert_allclose(grad_w, numpy_ref.numeric_grad(lambda v: ref(h, v), w), atol=1e-5)


def test_empty_masks_give_zero_loss_and_zero_gradients_and_eager_equals_jit(numpy_ref):
    x = numpy_ref.make_inputs(9)
    h, ht, u, t = x["student_hidden"], x["teacher_hidden"], x["unembedding"], x["targets"]

    def losses(h, u, m):
        return (
            fused_cross_entropy(h, u, t, m, chunk_size=2, z_loss=1e-2)[0]
            + fused_kl_distillation(h, ht, u, m, chunk_size=2, direction="reverse")[0]
            + fused_salad_objective(h, ht, u, t, m, m, alpha=0.5, chunk_size=2, direction="jsd")[0]
        )

    grad_fn = jax.value_and_grad(losses, argnums=(0, 1))
    eager_value, eager_grads = grad_fn(h, u, x["mask"])
    jit_value, jit_grads = jax.jit(grad_fn)(h, u, x["mask"])
    np.testing.assert_allclose(jit_value, eager_value, rtol=1e-6)
    for a, b in zip(jit_grads, eager_grads):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    value, grads = jax.jit(grad_fn)(h, u, np.zeros_like(x["mask"]))
    assert float(value) == 0.0
    assert all(not np.asarray(g).any() for g in grads)


def test_unsupervised_positions_never_reach_loss_or_gradients(numpy_ref):
    """Huge hidden states and out-of-range targets where nothing is supervised change nothing."""
    x = numpy_ref.make_inputs(21, batch=2, seq=6)
    selected = np.maximum(x["mask"], x["kl_mask"]) > 0
    noisy = dict(x)
    for key in ("student_hidden", "teacher_hidden"):
        noise = 50.0 * np.random.default_rng(3).standard_normal(x[key].shape).astype(np.float32)
        noisy[key] = np.where(selected[..., None], x[key], noise)
    noisy["targets"] = np.where(selected, x["targets"], 99).astype(np.int32)

    @jax.jit
    def run(v):
        def loss(h, u):
            return fused_salad_objective(
                h, v["teacher_hidden"], u, v["targets"], v["kl_mask"], v["mask"], alpha=0.4, chunk_size=4, softcap=6.0
            )[0]

        return jax.value_and_grad(loss, argnums=(0, 1))(v["student_hidden"], v["unembedding"])

    (want, (want_h, _)), (got, (got_h, got_u)) = run(x), run(noisy)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(got_h)[selected], np.asarray(want_h)[selected], rtol=1e-5, atol=1e-7)
    assert not np.asarray(got_h)[~selected].any()
    assert bool(jnp.all(jnp.isfinite(got_u)))


def test_teacher_and_metrics_get_no_gradient_and_fused_matches_chunked_gradients(numpy_ref):
    x = numpy_ref.make_inputs(5, batch=2, seq=7, d_model=4)
    h, ht, u, t = x["student_hidden"], x["teacher_hidden"], x["unembedding"], x["targets"]
    args = dict(alpha=0.3, chunk_size=3, temperature=1.3, direction="forward", softcap=5.0, weights=x["weights"])

    def fused(h, ht, u):
        return fused_salad_objective(h, ht, u, t, x["kl_mask"], x["mask"], **args)

    def chunked(h, ht, u):
        return chunked_salad_objective(h, ht, u, t, x["kl_mask"], x["mask"], **args)

    got = jax.jit(jax.grad(lambda *a: fused(*a)[0], argnums=(0, 1, 2)))(h, ht, u)
    want = jax.jit(jax.grad(lambda *a: chunked(*a)[0], argnums=(0, 1, 2)))(h, ht, u)
    assert not np.asarray(got[1]).any()
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    metric_grads = jax.grad(lambda h, u: fused(h, ht, u)[1]["nll"], argnums=(0, 1))(h, u)
    assert all(not np.asarray(g).any() for g in metric_grads)


def _has_unembedding_sized_value(jaxpr, shape: tuple[int, ...]) -> bool:
    """Whether any equation of `jaxpr` (or of a jaxpr nested in it) makes a value of `shape`."""
    for eqn in jaxpr.eqns:
        if any(getattr(v.aval, "shape", None) == shape for v in eqn.outvars):
            return True
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns") and _has_unembedding_sized_value(inner, shape):
                return True
    return False


def test_a_frozen_unembedding_gets_no_accumulator_and_the_same_hidden_gradient(numpy_ref):
    """Differentiating only the hidden states makes no `[d_model, vocab]` value and the same gradient."""
    x = numpy_ref.make_inputs(4, batch=2, seq=6, vocab=9, d_model=5)
    h, ht, u, t = x["student_hidden"], x["teacher_hidden"], x["unembedding"], x["targets"]

    def loss(h, u):
        return fused_salad_objective(h, ht, u, t, x["kl_mask"], x["mask"], alpha=0.5, chunk_size=4)[0]

    hidden_only = jax.grad(loss, argnums=0)
    both = jax.grad(loss, argnums=(0, 1))
    assert not _has_unembedding_sized_value(jax.make_jaxpr(hidden_only)(h, u).jaxpr, u.shape)
    assert _has_unembedding_sized_value(jax.make_jaxpr(both)(h, u).jaxpr, u.shape)
    np.testing.assert_allclose(jax.jit(hidden_only)(h, u), jax.jit(both)(h, u)[0], rtol=1e-6, atol=1e-7)


@jax.jit
def bf16_suite(hidden: dict[str, jax.Array], targets, mask):
    """Loss and gradients of the fused and chunked forms at one dtype."""
    h, th, u = hidden["student"], hidden["teacher"], hidden["unembedding"]
    fns = {
        "fused_cross_entropy": lambda h, u: fused_cross_entropy(h, u, targets, mask, chunk_size=5, softcap=30.0)[0],
        "chunked_cross_entropy": lambda h, u: chunked_cross_entropy(h, u, targets, mask, chunk_size=5, softcap=30.0)[0],
    }
    for d in ("forward", "reverse", "jsd"):
        fns[f"fused_{d}"] = lambda h, u, d=d: fused_kl_distillation(h, th, u, mask, chunk_size=5, direction=d)[0]
        fns[f"chunked_{d}"] = lambda h, u, d=d: chunked_kl_distillation(h, th, u, mask, chunk_size=5, direction=d)[0]
        fns[f"fused_salad_{d}"] = lambda h, u, d=d: fused_salad_objective(
            h, th, u, targets, mask, mask, alpha=0.5, chunk_size=5, direction=d
        )[0]
    return {name: jax.value_and_grad(fn, argnums=(0, 1))(h, u) for name, fn in fns.items()}


def test_bf16_inputs_stay_finite_within_tolerance_and_near_the_float32_gradients():
    rng = np.random.default_rng(8)
    batch, seq, vocab, d_model = 2, 16, 512, 64
    student = rng.standard_normal((batch, seq, d_model))
    hidden = {
        "student": student,
        "teacher": student + 0.5 * rng.standard_normal((batch, seq, d_model)),
        "unembedding": 0.5 * rng.standard_normal((d_model, vocab)),
    }
    targets = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = (rng.random((batch, seq)) < 0.7).astype(np.float32)

    def cast(tree, dtype):
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32).astype(dtype), tree)

    reference = bf16_suite(cast(hidden, jnp.float32), targets, mask)
    low = bf16_suite(cast(hidden, jnp.bfloat16), targets, mask)
    for name, (want, want_grads) in reference.items():
        got, grads = low[name]
        assert bool(jnp.isfinite(got)), name
        assert abs(float(got) - float(want)) <= BF16_ATOL + BF16_RTOL * abs(float(want)), name
        for g, w in zip(grads, want_grads):
            assert g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))), name
            # bf16 rounding of the inputs and the gradient: a few per cent of its scale.
            scale = float(jnp.max(jnp.abs(w)))
            assert float(jnp.max(jnp.abs(g.astype(jnp.float32) - w))) <= 0.05 * scale, name
    for d in ("forward", "reverse", "jsd"):
        fused, chunked = low[f"fused_{d}"], low[f"chunked_{d}"]
        for g, c, w in zip(fused[1], chunked[1], reference[f"fused_{d}"][1]):
            fused_error = float(jnp.max(jnp.abs(g.astype(jnp.float32) - w)))
            chunked_error = float(jnp.max(jnp.abs(c.astype(jnp.float32) - w)))
            assert fused_error <= 2.0 * chunked_error + 1e-3 * float(jnp.max(jnp.abs(w))), d
