"""Tests of speechlm_jax.losses against float64 NumPy references and by properties.

The references (section 1) are written from the definitions, in probabilities and
position by position, independently of the log-space implementation under test; they
share its mean convention sum_{b,t} w_b m_bt l_bt / sum_{b,t} w_b m_bt. Values must agree
within 1e-6 in float32, gradients within 1e-5 of central finite differences of the
references; `check_grads` verifies the JAX gradients themselves in float64; hypothesis
checks the properties (KL >= 0 with Pinsker's bound, zero iff the distributions agree,
masking and padding invariance, temperature semantics, chunked == unchunked).
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
from jax.test_util import check_grads

from speechlm_jax import losses

# --- 1. float64 NumPy references ---------------------------------------------------------


def ref_softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ref_logsumexp(x: np.ndarray) -> np.ndarray:
    top = x.max(axis=-1)
    return top + np.log(np.exp(x - top[..., None]).sum(axis=-1))


def ref_weighted_mean(values: np.ndarray, mask: np.ndarray, weights: np.ndarray | None) -> float:
    w = mask if weights is None else mask * weights[:, None]
    denom = w.sum()
    return float(np.where(w != 0, values * w, 0.0).sum() / denom) if denom != 0 else 0.0


def ref_cross_entropy(logits, targets, mask, weights=None, label_smoothing=0.0, z_loss=0.0) -> float:
    x = np.asarray(logits, np.float64)
    p = ref_softmax(x)
    vocab = x.shape[-1]
    onehot = np.eye(vocab)[np.clip(targets, 0, vocab - 1)]
    smoothed = (1 - label_smoothing) * onehot + label_smoothing / vocab
    per_token = -(smoothed * np.log(p)).sum(-1) + z_loss * ref_logsumexp(x) ** 2
    return ref_weighted_mean(per_token, np.asarray(mask, np.float64), weights)


def ref_kl(p: np.ndarray, q: np.ndarray) -> float:
    support = p > 0
    return float((p[support] * np.log(p[support] / q[support])).sum())


def ref_divergence(s: np.ndarray, t: np.ndarray, *, temperature=1.0, direction="forward", jsd_beta=0.5) -> float:
    """T^2 D(teacher, student) at one position, `[vocab]` logits."""
    q = ref_softmax(np.asarray(s, np.float64) / temperature)
    p = ref_softmax(np.asarray(t, np.float64) / temperature)
    if direction == "forward":
        value = ref_kl(p, q)
    elif direction == "reverse":
        value = ref_kl(q, p)
    else:
        m = jsd_beta * p + (1 - jsd_beta) * q
        value = jsd_beta * ref_kl(p, m) + (1 - jsd_beta) * ref_kl(q, m)
    return temperature**2 * value


def ref_token_divergences(student, teacher, **options) -> np.ndarray:
    """`[batch, seq]` per-token divergences of `[batch, seq, vocab]` logits."""
    b, t = student.shape[:2]
    return np.array([[ref_divergence(student[i, j], teacher[i, j], **options) for j in range(t)] for i in range(b)])


def ref_kl_distillation(student, teacher, mask, weights=None, **options) -> float:
    return ref_weighted_mean(ref_token_divergences(student, teacher, **options), np.asarray(mask, np.float64), weights)


def ref_salad(student, teacher, targets, kl_mask, nll_mask, alpha, weights=None, **options) -> float:
    kl = ref_kl_distillation(student, teacher, kl_mask, weights, **options)
    return alpha * kl + (1 - alpha) * ref_cross_entropy(student, targets, nll_mask, weights)


def ref_mean_squared_distance(x, target, mask, weights=None) -> float:
    per_position = ((np.asarray(x, np.float64) - target) ** 2).mean(-1)
    return ref_weighted_mean(per_position, np.asarray(mask, np.float64), weights)


def ref_sequence_kl(model_logits, reference_logits, mask) -> np.ndarray:
    """Per-sequence sum_t m_t KL(reference || model): `[batch]`."""
    per_token = ref_token_divergences(model_logits, reference_logits)
    return np.where(mask != 0, per_token * mask, 0.0).sum(axis=1)


def ref_unembed(hidden, unembedding, softcap=None) -> np.ndarray:
    logits = np.einsum("btd,dv->btv", np.asarray(hidden, np.float64), np.asarray(unembedding, np.float64))
    return logits if softcap is None else softcap * np.tanh(logits / softcap)


def numeric_grad(f: Callable[[np.ndarray], float], x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central finite differences of a float64 scalar function."""
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for i in range(x.size):
        up, down = x.copy(), x.copy()
        up.flat[i] += eps
        down.flat[i] -= eps
        grad.flat[i] = (f(up) - f(down)) / (2 * eps)
    return grad


# --- 2. inputs -----------------------------------------------------------------------------

DIRECTIONS = ("forward", "reverse", "jsd")
FAST = hypothesis.settings(max_examples=15, deadline=None, derandomize=True, print_blob=True)


def make_inputs(seed: int, batch: int = 2, seq: int = 5, vocab: int = 7, d_model: int = 4) -> dict[str, np.ndarray]:
    """Random float32 logits/hidden states, targets (-1 where unsupervised), masks, weights."""
    rng = np.random.default_rng(seed)
    mask = (rng.random((batch, seq)) < 0.7).astype(np.float32)
    mask[0, 0] = 1.0
    kl_mask = (rng.random((batch, seq)) < 0.6).astype(np.float32)
    kl_mask[-1, -1] = 1.0
    targets = rng.integers(0, vocab, (batch, seq)).astype(np.int32)
    return {
        "student": (2.0 * rng.standard_normal((batch, seq, vocab))).astype(np.float32),
        "teacher": (2.0 * rng.standard_normal((batch, seq, vocab))).astype(np.float32),
        "targets": np.where(mask > 0, targets, -1).astype(np.int32),
        "mask": mask,
        "kl_mask": kl_mask,
        "weights": rng.uniform(0.5, 2.0, batch).astype(np.float32),
        "student_hidden": rng.standard_normal((batch, seq, d_model)).astype(np.float32),
        "teacher_hidden": rng.standard_normal((batch, seq, d_model)).astype(np.float32),
        "unembedding": (1.5 * rng.standard_normal((d_model, vocab))).astype(np.float32),
    }


def f64(x: np.ndarray) -> np.ndarray:
    return np.asarray(x, np.float64)


# --- 3. values and gradients against the references ---------------------------------------


@pytest.mark.parametrize(
    "label_smoothing,z_loss,use_weights", [(0.0, 0.0, False), (0.1, 0.0, True), (0.0, 1e-2, True), (0.2, 1e-3, False)]
)
def test_masked_cross_entropy_matches_float64(label_smoothing, z_loss, use_weights):
    x = make_inputs(0)
    weights = x["weights"] if use_weights else None
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss)

    def loss(logits):
        return losses.masked_cross_entropy(logits, x["targets"], x["mask"], weights=weights, **options)

    def ref(logits):
        return ref_cross_entropy(logits, x["targets"], x["mask"], weights, **options)

    value, metrics = loss(jnp.asarray(x["student"]))
    np.testing.assert_allclose(value, ref(f64(x["student"])), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(metrics["nll"], ref_cross_entropy(f64(x["student"]), x["targets"], x["mask"], weights), rtol=1e-6)
    assert metrics["tokens"] == x["mask"].sum()
    grad = jax.grad(lambda logits: loss(logits)[0])(jnp.asarray(x["student"]))
    np.testing.assert_allclose(grad, numeric_grad(ref, x["student"]), atol=1e-5)


@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("temperature", [1.0, 2.5, 0.7])
def test_kl_distillation_matches_float64(direction, temperature):
    x = make_inputs(1)
    options = dict(temperature=temperature, direction=direction)

    def loss(student, teacher):
        return losses.kl_distillation(student, teacher, x["kl_mask"], weights=x["weights"], **options)[0]

    def ref(student):
        return ref_kl_distillation(student, f64(x["teacher"]), x["kl_mask"], x["weights"], **options)

    student, teacher = jnp.asarray(x["student"]), jnp.asarray(x["teacher"])
    np.testing.assert_allclose(loss(student, teacher), ref(f64(x["student"])), rtol=1e-6, atol=1e-6)
    grad_student, grad_teacher = jax.grad(loss, argnums=(0, 1))(student, teacher)
    np.testing.assert_allclose(grad_student, numeric_grad(ref, x["student"]), atol=1e-5)
    np.testing.assert_array_equal(grad_teacher, 0.0)


def test_salad_objective_matches_float64():
    x = make_inputs(2)
    options = dict(temperature=2.0, direction="forward")

    def loss(student):
        return losses.salad_objective(
            student, x["teacher"], x["targets"], x["kl_mask"], x["mask"], alpha=0.3, weights=x["weights"], **options
        )

    def ref(student):
        return ref_salad(student, f64(x["teacher"]), x["targets"], x["kl_mask"], x["mask"], 0.3, x["weights"], **options)

    value, metrics = loss(jnp.asarray(x["student"]))
    np.testing.assert_allclose(value, ref(f64(x["student"])), rtol=1e-6, atol=1e-6)
    kl = ref_kl_distillation(f64(x["student"]), f64(x["teacher"]), x["kl_mask"], x["weights"], **options)
    np.testing.assert_allclose(metrics["kl"], kl, rtol=1e-6)
    assert metrics["kl_tokens"] == x["kl_mask"].sum() and metrics["nll_tokens"] == x["mask"].sum()
    grad = jax.grad(lambda s: loss(s)[0])(jnp.asarray(x["student"]))
    np.testing.assert_allclose(grad, numeric_grad(ref, x["student"]), atol=1e-5)


@pytest.mark.parametrize("fn", [losses.hidden_state_distillation, losses.embedding_alignment])
def test_hidden_state_losses_match_float64(fn):
    x = make_inputs(3)
    student, teacher = jnp.asarray(x["student_hidden"]), jnp.asarray(x["teacher_hidden"])

    def ref(s):
        return ref_mean_squared_distance(s, f64(x["teacher_hidden"]), x["mask"], x["weights"])

    value, metrics = fn(student, teacher, x["mask"], weights=x["weights"])
    np.testing.assert_allclose(value, ref(f64(x["student_hidden"])), rtol=1e-6, atol=1e-6)
    assert -1.0 <= metrics["cosine"] <= 1.0
    grad_student, grad_teacher = jax.grad(lambda s, t: fn(s, t, x["mask"], weights=x["weights"])[0], argnums=(0, 1))(
        student, teacher
    )
    np.testing.assert_allclose(grad_student, numeric_grad(ref, x["student_hidden"]), atol=1e-5)
    np.testing.assert_array_equal(grad_teacher, 0.0)


@pytest.mark.parametrize("fn", [losses.misalignment, losses.forgetting])
def test_diagnostics_match_float64(fn):
    x = make_inputs(4, batch=3)
    total, metrics = fn(jnp.asarray(x["student"]), jnp.asarray(x["teacher"]), x["kl_mask"])
    per_sequence = ref_sequence_kl(f64(x["student"]), f64(x["teacher"]), x["kl_mask"])
    np.testing.assert_allclose(metrics["per_sequence"], per_sequence, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(total, per_sequence.sum(), rtol=1e-6)
    np.testing.assert_allclose(metrics["per_token"], per_sequence.sum() / x["kl_mask"].sum(), rtol=1e-6)
    np.testing.assert_array_equal(metrics["tokens_per_sequence"], x["kl_mask"].sum(1))


def test_behavior_imitation_places_greedy_response():
    x = make_inputs(5, batch=2, seq=8, vocab=9)
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
    value, metrics = losses.behavior_imitation_loss(
        jnp.asarray(x["student"]), response, np.ones((2, 5), np.float32), response_start=start, eos_id=eos,
        weights=x["weights"],
    )
    np.testing.assert_allclose(value, ref_cross_entropy(f64(x["student"]), targets, mask, x["weights"]), rtol=1e-6)
    assert metrics["tokens"] == 6  # 3 up to and including EOS, 3 before the sequence ends
    aligned, _ = losses.behavior_imitation_loss(jnp.asarray(x["student"]), targets, mask, weights=x["weights"])
    np.testing.assert_allclose(aligned, value, rtol=1e-7)


def test_gather_teacher_moves_values_to_student_positions():
    x = make_inputs(6, batch=2, seq=5)
    index = np.array([[0, 0, 3, 4, 1], [4, 2, 2, 0, 1]], np.int32)
    expected = np.stack([x["teacher"][b, index[b]] for b in range(2)])
    np.testing.assert_array_equal(losses.gather_teacher(jnp.asarray(x["teacher"]), index), expected)


@pytest.mark.parametrize(
    "name",
    ["cross_entropy", "forward", "reverse", "jsd", "salad", "hidden", "chunked_cross_entropy", "chunked_kl", "chunked_salad"],
)
def test_gradients_by_finite_differences_float64(name):
    x = make_inputs(7, seq=4, vocab=6, d_model=3)
    with jax.enable_x64(True):
        a = {k: jnp.asarray(f64(v)) if v.dtype == np.float32 else jnp.asarray(v) for k, v in x.items()}
        chunked = dict(chunk_size=3, softcap=5.0, weights=a["weights"])
        kl_options = dict(temperature=1.5)
        functions: dict[str, tuple[Callable, tuple]] = {
            "cross_entropy": (
                lambda s: losses.masked_cross_entropy(s, a["targets"], a["mask"], label_smoothing=0.1, z_loss=1e-2)[0],
                (a["student"],),
            ),
            "salad": (
                lambda s: losses.salad_objective(s, a["teacher"], a["targets"], a["kl_mask"], a["mask"], alpha=0.4)[0],
                (a["student"],),
            ),
            "hidden": (
                lambda s: losses.hidden_state_distillation(s, a["teacher_hidden"], a["mask"])[0],
                (a["student_hidden"],),
            ),
            "chunked_cross_entropy": (
                lambda h, w: losses.chunked_cross_entropy(h, w, a["targets"], a["mask"], z_loss=1e-2, **chunked)[0],
                (a["student_hidden"], a["unembedding"]),
            ),
            # The teacher also reads the unembedding, under stop_gradient, so finite
            # differences (which would move the teacher too) perturb only the student hidden.
            "chunked_kl": (
                lambda h: losses.chunked_kl_distillation(
                    h, a["teacher_hidden"], a["unembedding"], a["kl_mask"], direction="jsd", **kl_options, **chunked
                )[0],
                (a["student_hidden"],),
            ),
            "chunked_salad": (
                lambda h: losses.chunked_salad_objective(
                    h, a["teacher_hidden"], a["unembedding"], a["targets"], a["kl_mask"], a["mask"], alpha=0.4, **chunked
                )[0],
                (a["student_hidden"],),
            ),
        }
        for direction in DIRECTIONS:
            functions[direction] = (
                lambda s, d=direction: losses.kl_distillation(s, a["teacher"], a["kl_mask"], direction=d, **kl_options)[0],
                (a["student"],),
            )
        fn, args = functions[name]
        assert all(arg.dtype == jnp.float64 for arg in args)
        check_grads(jax.jit(fn), args, order=1, modes=("rev",))


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_chunked_kl_matches_float64_with_teacher_held_fixed(direction):
    """Value and both gradients against the float64 reference, the teacher's logits constant."""
    x = make_inputs(11, seq=5, vocab=6, d_model=3)
    softcap, options = 4.0, dict(temperature=2.0, direction=direction)
    teacher_logits = ref_unembed(x["teacher_hidden"], x["unembedding"], softcap)

    def ref(h, w):
        return ref_kl_distillation(ref_unembed(h, w, softcap), teacher_logits, x["kl_mask"], x["weights"], **options)

    def loss(h, w):
        return losses.chunked_kl_distillation(
            h, x["teacher_hidden"], w, x["kl_mask"], chunk_size=2, softcap=softcap, weights=x["weights"], **options
        )[0]

    h, w = f64(x["student_hidden"]), f64(x["unembedding"])
    value, (grad_h, grad_w) = jax.value_and_grad(loss, argnums=(0, 1))(x["student_hidden"], x["unembedding"])
    np.testing.assert_allclose(value, ref(h, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_h, numeric_grad(lambda v: ref(v, w), h), atol=1e-5)
    np.testing.assert_allclose(grad_w, numeric_grad(lambda v: ref(h, v), w), atol=1e-5)


def test_chunked_cross_entropy_matches_float64():
    x = make_inputs(12, seq=5, vocab=6, d_model=3)
    options = dict(label_smoothing=0.1, z_loss=1e-2)

    def ref(h, w):
        return ref_cross_entropy(ref_unembed(h, w, 3.0), x["targets"], x["mask"], x["weights"], **options)

    def loss(h, w):
        return losses.chunked_cross_entropy(
            h, w, x["targets"], x["mask"], chunk_size=3, softcap=3.0, weights=x["weights"], **options
        )[0]

    h, w = f64(x["student_hidden"]), f64(x["unembedding"])
    value, (grad_h, grad_w) = jax.value_and_grad(loss, argnums=(0, 1))(x["student_hidden"], x["unembedding"])
    np.testing.assert_allclose(value, ref(h, w), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad_h, numeric_grad(lambda v: ref(v, w), h), atol=1e-5)
    np.testing.assert_allclose(grad_w, numeric_grad(lambda v: ref(h, v), w), atol=1e-5)


# --- 4. properties -------------------------------------------------------------------------
# Shapes stay fixed and the options are static arguments of jitted wrappers, so hypothesis
# varies the data without recompiling for every example.

seeds = st.integers(0, 2**31 - 1)


@functools.partial(jax.jit, static_argnames=("direction", "temperature"))
def jit_kl(student, teacher, mask, weights=None, *, direction="forward", temperature=1.0):
    return losses.kl_distillation(student, teacher, mask, weights=weights, temperature=temperature, direction=direction)[0]


def total_variation(student, teacher, temperature) -> np.ndarray:
    """`[batch, seq]` TV distance between the distributions the divergence compares."""
    q = ref_softmax(f64(student) / temperature)
    p = ref_softmax(f64(teacher) / temperature)
    return 0.5 * np.abs(p - q).sum(-1)


@FAST
@hypothesis.given(seed=seeds, direction=st.sampled_from(DIRECTIONS), temperature=st.sampled_from([1.0, 3.0]))
def test_divergence_is_nonnegative_and_above_pinsker_bound(seed, direction, temperature):
    """D >= c * 2 T^2 TV^2 (Pinsker; c = b(1-b) for the b-JSD), so D > 0 whenever p != q."""
    x = make_inputs(seed)
    value = jit_kl(x["student"], x["teacher"], x["kl_mask"], x["weights"], direction=direction, temperature=temperature)
    tv = total_variation(x["student"], x["teacher"], temperature)
    c = 0.25 if direction == "jsd" else 1.0
    bound = ref_weighted_mean(c * 2 * temperature**2 * tv**2, x["kl_mask"], x["weights"])
    assert value >= 0.0
    assert value >= bound * (1 - 1e-4) - 1e-7


@FAST
@hypothesis.given(seed=seeds, direction=st.sampled_from(DIRECTIONS), temperature=st.sampled_from([1.0, 3.0]))
def test_divergence_is_zero_when_distributions_agree_on_masked_positions(seed, direction, temperature):
    x = make_inputs(seed)
    shift = np.random.default_rng(seed).normal(size=x["student"].shape[:2] + (1,)).astype(np.float32)
    teacher = np.where(x["kl_mask"][..., None] > 0, x["student"] + shift, x["teacher"])
    value = jit_kl(x["student"], teacher, x["kl_mask"], x["weights"], direction=direction, temperature=temperature)
    assert 0.0 <= value <= 1e-6


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
        losses.masked_cross_entropy(v["student"], v["targets"], v["mask"], weights=v["weights"], z_loss=1e-3)[0],
        losses.kl_distillation(v["student"], v["teacher"], v["kl_mask"], weights=v["weights"], direction="jsd")[0],
        losses.salad_objective(
            v["student"], v["teacher"], v["targets"], v["kl_mask"], v["mask"], alpha=0.5, weights=v["weights"]
        )[0],
        losses.chunked_kl_distillation(
            v["student_hidden"], v["teacher_hidden"], v["unembedding"], v["kl_mask"], chunk_size=2, weights=v["weights"]
        )[0],
    ]


@FAST
@hypothesis.given(seed=seeds)
def test_masked_positions_and_padding_never_change_the_result(seed):
    x = make_inputs(seed)
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


@FAST
@hypothesis.given(seed=seeds, direction=st.sampled_from(DIRECTIONS), temperature=st.sampled_from([3.0]))
def test_temperature_divides_logits_and_scales_by_its_square(seed, direction, temperature):
    x = make_inputs(seed)
    s, t, m, w = x["student"], x["teacher"], x["kl_mask"], x["weights"]
    tempered = jit_kl(s, t, m, w, direction=direction, temperature=temperature)
    plain = jit_kl(s / temperature, t / temperature, m, w, direction=direction)
    np.testing.assert_allclose(tempered, temperature**2 * plain, rtol=1e-5, atol=1e-6)


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
            lambda h, u: losses.chunked_cross_entropy(h, u, targets, mask, **ce_options, **chunked),
            lambda h, u: losses.masked_cross_entropy(logits(h, u), targets, mask, weights=w, **ce_options),
        ),
        (
            lambda h, u: losses.chunked_kl_distillation(h, teacher_hidden, u, kl_mask, **kl_options, **chunked),
            lambda h, u: losses.kl_distillation(logits(h, u), logits(teacher_hidden, u), kl_mask, weights=w, **kl_options),
        ),
        (
            lambda h, u: losses.chunked_salad_objective(
                h, teacher_hidden, u, targets, kl_mask, mask, alpha=0.3, **kl_options, **chunked
            ),
            lambda h, u: losses.salad_objective(
                logits(h, u), logits(teacher_hidden, u), targets, kl_mask, mask, alpha=0.3, weights=w, **kl_options
            ),
        ),
        (
            lambda h, u: losses.chunked_misalignment(h, teacher_hidden, u, kl_mask, chunk_size=chunk_size, softcap=softcap),
            lambda h, u: losses.misalignment(logits(h, u), logits(teacher_hidden, u), kl_mask),
        ),
        (
            lambda h, u: losses.chunked_forgetting(h, teacher_hidden, u, kl_mask, chunk_size=chunk_size, softcap=softcap),
            lambda h, u: losses.forgetting(logits(h, u), logits(teacher_hidden, u), kl_mask),
        ),
    ]
    return [
        tuple(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True)(h, u) for fn in pair) for pair in pairs
    ]


@pytest.mark.parametrize(
    "chunk_size,direction,softcap",
    [(1, "forward", None), (2, "reverse", 3.0), (3, "jsd", None), (8, "forward", 3.0)],
)
@hypothesis.settings(FAST, max_examples=6)
@hypothesis.given(seed=seeds)
def test_chunked_equals_unchunked_for_every_chunk_size(chunk_size, direction, softcap, seed):
    """Sequence length 5: a chunk that divides it (1), ones that do not (2, 3) and a longer one (8)."""
    x = make_inputs(seed, d_model=3)
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


# --- 5. bf16, jit, errors ------------------------------------------------------------------


@jax.jit
def bf16_suite(logits: dict[str, jax.Array], hidden: dict[str, jax.Array], targets, mask):
    """Every loss and its gradients, for logits and for hidden states of one dtype."""
    s, t = logits["student"], logits["teacher"]
    h, th, u = hidden["student"], hidden["teacher"], hidden["unembedding"]
    fns = {"cross_entropy": lambda s, t: losses.masked_cross_entropy(s, targets, mask, z_loss=1e-3)[0]}
    chunked = {
        "chunked_cross_entropy": lambda h, u: losses.chunked_cross_entropy(
            h, u, targets, mask, chunk_size=5, softcap=30.0
        )[0]
    }
    for d in DIRECTIONS:
        fns[d] = lambda s, t, d=d: losses.kl_distillation(s, t, mask, direction=d, temperature=2.0)[0]
        fns[f"salad_{d}"] = lambda s, t, d=d: losses.salad_objective(s, t, targets, mask, mask, alpha=0.5, direction=d)[0]
        chunked[f"chunked_{d}"] = lambda h, u, d=d: losses.chunked_kl_distillation(h, th, u, mask, chunk_size=5, direction=d)[0]
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
        assert abs(float(got) - float(want)) <= losses.BF16_ATOL + losses.BF16_RTOL * abs(float(want)), name
        leaves = jax.tree.leaves(grads)
        assert all(g.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(g.astype(jnp.float32)))) for g in leaves), name


def test_jit_matches_eager_and_empty_mask_gives_zero():
    x = make_inputs(9)
    fn = jax.jit(
        lambda h, u, m: losses.chunked_salad_objective(
            h, x["teacher_hidden"], u, x["targets"], m, m, alpha=0.5, chunk_size=2, direction="reverse"
        )[0]
    )
    eager = losses.chunked_salad_objective(
        x["student_hidden"], x["teacher_hidden"], x["unembedding"], x["targets"], x["mask"], x["mask"], alpha=0.5,
        chunk_size=2, direction="reverse",
    )[0]
    np.testing.assert_allclose(fn(x["student_hidden"], x["unembedding"], x["mask"]), eager, rtol=1e-6)
    empty = np.zeros_like(x["mask"])
    assert fn(x["student_hidden"], x["unembedding"], empty) == 0.0
    grads = jax.grad(fn, argnums=(0, 1))(x["student_hidden"], x["unembedding"], empty)
    assert all(bool(jnp.all(g == 0)) for g in grads)


def test_invalid_options_raise():
    x = make_inputs(10)
    with pytest.raises(ValueError, match="direction"):
        losses.kl_distillation(x["student"], x["teacher"], x["mask"], direction="backward")
    with pytest.raises(ValueError, match="jsd_beta"):
        losses.kl_distillation(x["student"], x["teacher"], x["mask"], direction="jsd", jsd_beta=1.0)
    with pytest.raises(ValueError, match="temperature"):
        losses.salad_objective(x["student"], x["teacher"], x["targets"], x["mask"], x["mask"], alpha=0.5, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        losses.chunked_cross_entropy(x["student_hidden"], x["unembedding"], x["targets"], x["mask"], chunk_size=0)
    with pytest.raises(ValueError, match="aligned response"):
        losses.place_response(x["targets"][:, :3], x["mask"][:, :3], 5)


# --- CTC against PyTorch's


def _ctc_case(seed: int = 0):
    rng = np.random.default_rng(seed)
    n, frames, vocab, max_labels = 5, 12, 7, 6
    logits = rng.normal(size=(n, frames, vocab)).astype(np.float32)
    n_frames = np.array([12, 9, 12, 4, 7])
    frame_mask = (np.arange(frames)[None] < n_frames[:, None]).astype(np.float32)
    # Row 2 repeats a label (needs a blank between); row 3 has more labels than frames.
    rows = [[1, 2, 3], [4, 4, 5, 1], [2, 2, 2, 3, 3, 1], [1, 2, 3, 4, 5], [6]]
    labels = np.full((n, max_labels), -1, np.int32)
    for i, r in enumerate(rows):
        labels[i, :len(r)] = r
    return logits, frame_mask, labels, n_frames, rows


def test_ctc_loss_matches_torch():
    torch = pytest.importorskip("torch")
    logits, frame_mask, labels, n_frames, rows = _ctc_case()
    weights = np.array([1.0, 2.0, 1.0, 1.0, 0.0], np.float32)
    loss, metrics = losses.ctc_loss(jnp.asarray(logits), jnp.asarray(frame_mask), jnp.asarray(labels), blank_id=0,
                                    weights=jnp.asarray(weights))
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=-1).transpose(0, 1)
    per = torch.nn.functional.ctc_loss(
        log_probs, torch.from_numpy(np.concatenate([np.asarray(r) for r in rows])).long(),
        torch.from_numpy(n_frames).long(), torch.tensor([len(r) for r in rows]).long(),
        blank=0, reduction="none", zero_infinity=False).numpy()
    # Row 3 (five labels, four frames) has no alignment; row 4 has weight 0.
    assert np.isinf(per[3])
    used = [0, 1, 2]
    expected = sum(weights[i] * per[i] for i in used) / sum(weights[i] * len(rows[i]) for i in used)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
    assert float(metrics["infeasible"]) == 1.0
    assert float(metrics["utterances"]) == 4.0
    assert float(metrics["tokens"]) == 3 + 4 + 6


def test_ctc_loss_gradient_is_finite_with_infeasible_rows():
    logits, frame_mask, labels, _, _ = _ctc_case(1)
    grad = jax.grad(lambda x: losses.ctc_loss(x, jnp.asarray(frame_mask), jnp.asarray(labels), blank_id=0)[0])(jnp.asarray(logits))
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[3], 0.0)


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    best = np.array([[0, 3, 3, 0, 3, 5, 5, 0, 2], [4, 4, 4, 0, 0, 1, 1, 1, 1]])
    logits = jax.nn.one_hot(best, 6) * 10.0
    frame_mask = np.ones(best.shape, np.float32)
    frame_mask[1, 5:] = 0.0  # row 1's frames past the fifth are padding
    decoded = losses.ctc_greedy_decode(logits, jnp.asarray(frame_mask), blank_id=0, max_labels=5)
    assert np.asarray(decoded).tolist() == [[3, 3, 5, 2, -1], [4, -1, -1, -1, -1]]


def test_ctc_exact_match_when_the_frames_spell_the_labels():
    best = np.array([[0, 3, 0, 3, 5, 0]])
    logits = jax.nn.one_hot(best, 6) * 20.0
    labels = np.array([[3, 3, 5, -1]], np.int32)
    loss, metrics = losses.ctc_loss(logits, jnp.ones(best.shape), jnp.asarray(labels), blank_id=0)
    assert float(metrics["exact_match"]) == 1.0
    assert float(loss) < 1e-3
