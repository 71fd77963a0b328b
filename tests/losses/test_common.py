"""Tests of speechlm_jax.losses.common: teacher gathering, the mean convention, the bf16 tolerance.

What `common` promises holds for every loss built on it, so these run the reference and
chunked forms together: masked and padded positions never change a result, and bf16
inputs stay finite and within `BF16_ATOL + BF16_RTOL * |loss|` of float32.
"""

from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np

from speechlm_jax.losses.chunked import chunked_cross_entropy, chunked_kl_distillation
from speechlm_jax.losses.common import BF16_ATOL, BF16_RTOL, gather_teacher
from speechlm_jax.losses.reference import kl_distillation, masked_cross_entropy, salad_objective

FAST = hypothesis.settings(max_examples=15, deadline=None, derandomize=True, print_blob=True)
seeds = st.integers(0, 2**31 - 1)


def test_gather_teacher_moves_values_to_student_positions(numpy_ref):
    x = numpy_ref.make_inputs(6, batch=2, seq=5)
    index = np.array([[0, 0, 3, 4, 1], [4, 2, 2, 0, 1]], np.int32)
    expected = np.stack([x["teacher"][b, index[b]] for b in range(2)])
    np.testing.assert_array_equal(gather_teacher(jnp.asarray(x["teacher"]), index), expected)


def perturb_unselected(x: np.ndarray, selected: np.ndarray, seed: int) -> np.ndarray:
    noise = 10.0 * np.random.default_rng(seed).standard_normal(x.shape).astype(x.dtype)
    keep = selected.reshape(selected.shape + (1,) * (x.ndim - 2)) > 0
    return np.where(keep, x, noise)


def pad(x: np.ndarray, rows: int, cols: int, seed: int) -> np.ndarray:
    """Appends padding rows and positions: zero weights and masks, random logits/targets."""
    if x.ndim == 1:
        return np.concatenate([x, np.zeros(rows, x.dtype)])
    shape = (x.shape[0] + rows, x.shape[1] + cols) + x.shape[2:]
    is_mask = x.ndim == 2 and x.dtype == np.float32
    out = np.zeros(shape, x.dtype) if is_mask else np.random.default_rng(seed).integers(-3, 3, shape).astype(x.dtype)
    out[: x.shape[0], : x.shape[1]] = x
    return out


@jax.jit
def all_losses(v: dict[str, jax.Array]) -> list[jax.Array]:
    return [
        masked_cross_entropy(v["student"], v["targets"], v["mask"], weights=v["weights"], z_loss=1e-3)[0],
        kl_distillation(v["student"], v["teacher"], v["kl_mask"], weights=v["weights"], direction="jsd")[0],
        salad_objective(
            v["student"], v["teacher"], v["targets"], v["kl_mask"], v["mask"], alpha=0.5, weights=v["weights"]
        )[0],
        chunked_kl_distillation(
            v["student_hidden"], v["teacher_hidden"], v["unembedding"], v["kl_mask"], chunk_size=2, weights=v["weights"]
        )[0],
    ]


@FAST
@hypothesis.given(seed=seeds)
def test_masked_positions_and_padding_never_change_the_result(seed, numpy_ref):
    x = numpy_ref.make_inputs(seed)
    selected = np.maximum(x["mask"], x["kl_mask"])
    expected = all_losses(x)
    perturbed = dict(x)
    for key in ("student", "teacher", "student_hidden", "teacher_hidden"):
        perturbed[key] = perturb_unselected(x[key], selected, seed + 1)
    perturbed["targets"] = np.where(selected > 0, x["targets"], -7).astype(np.int32)
    for got, want in zip(all_losses(perturbed), expected):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)

    rows = 1
    padded = {k: v if k == "unembedding" else pad(v, rows, 2, seed + 2) for k, v in x.items()}
    batch = x["mask"].shape[0]
    zero_weight_rows = dict(padded, mask=np.where(np.arange(batch + rows)[:, None] < batch, padded["mask"], 1.0))
    for variant in (padded, zero_weight_rows):
        for got, want in zip(all_losses(variant), expected):
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


@jax.jit
def bf16_suite(logits: dict[str, jax.Array], hidden: dict[str, jax.Array], targets, mask):
    """Every loss and its gradients, for logits and for hidden states of one dtype."""
    s, t = logits["student"], logits["teacher"]
    h, th, u = hidden["student"], hidden["teacher"], hidden["unembedding"]
    fns = {"cross_entropy": lambda s, t: masked_cross_entropy(s, targets, mask, z_loss=1e-3)[0]}
    chunked = {
        "chunked_cross_entropy": lambda h, u: chunked_cross_entropy(h, u, targets, mask, chunk_size=5, softcap=30.0)[0]
    }
    for d in ("forward", "reverse", "jsd"):
        fns[d] = lambda s, t, d=d: kl_distillation(s, t, mask, direction=d, temperature=2.0)[0]
        fns[f"salad_{d}"] = lambda s, t, d=d: salad_objective(s, t, targets, mask, mask, alpha=0.5, direction=d)[0]
        chunked[f"chunked_{d}"] = lambda h, u, d=d: chunked_kl_distillation(h, th, u, mask, chunk_size=5, direction=d)[
            0
        ]
    out = {name: jax.value_and_grad(fn)(s, t) for name, fn in fns.items()}
    out.update({name: jax.value_and_grad(fn, argnums=(0, 1))(h, u) for name, fn in chunked.items()})
    return out


def test_bf16_inputs_stay_finite_and_within_documented_tolerance():
    rng = np.random.default_rng(8)
    batch, seq, vocab, d_model = 2, 16, 512, 64
    student = 4.0 * rng.standard_normal((batch, seq, vocab))
    logits = {"student": student, "teacher": student + 2.0 * rng.standard_normal((batch, seq, vocab))}
    hidden_student = rng.standard_normal((batch, seq, d_model))
    hidden = {
        "student": hidden_student,
        "teacher": hidden_student + 0.5 * rng.standard_normal((batch, seq, d_model)),
        "unembedding": 0.5 * rng.standard_normal((d_model, vocab)),
    }
    targets = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    mask = (rng.random((batch, seq)) < 0.7).astype(np.float32)

    def cast(tree, dtype):
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32).astype(dtype), tree)

    reference = bf16_suite(cast(logits, jnp.float32), cast(hidden, jnp.float32), targets, mask)
    low = bf16_suite(cast(logits, jnp.bfloat16), cast(hidden, jnp.bfloat16), targets, mask)
    for name, ((want, _), (got, grads)) in zip(reference, zip(reference.values(), low.values())):
        assert bool(jnp.isfinite(got)), name
        assert abs(float(got) - float(want)) <= BF16_ATOL + BF16_RTOL * abs(float(want)), name
        leaves = jax.tree.leaves(grads)
        assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in leaves), name
