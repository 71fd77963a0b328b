"""Loss fixtures: float64 NumPy references of the losses, and the inputs the tests of
`speechlm_jax.losses` share, as the session fixture `numpy_ref`.

The references are written from the definitions, in probabilities and position by
position, independently of the log-space implementation under test; they share its mean
convention sum_{b,t} w_b m_bt l_bt / sum_{b,t} w_b m_bt. Values must agree within 1e-6 in
float32, gradients within 1e-5 of central finite differences of the references;
`check_float64_gradients` verifies the JAX gradients themselves in float64.

What the tests' decorators read (the KL directions, the hypothesis settings `FAST` and the
`seeds` strategy) cannot be a fixture, so each test module writes those itself. Shapes stay
fixed and the options are static arguments of jitted wrappers, so hypothesis varies only the
data, through the seed of `make_inputs`, without recompiling for every example.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

# --- float64 NumPy references --------------------------------------------------------------


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


# --- inputs --------------------------------------------------------------------------------


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


def check_float64_gradients(loss_and_args: Callable[[dict[str, jax.Array]], tuple[Callable, tuple]]) -> None:
    """`check_grads` of the loss `loss_and_args(inputs)` returns, on float64 inputs, in float64."""
    x = make_inputs(7, seq=4, vocab=6, d_model=3)
    with jax.enable_x64(True):
        a = {k: jnp.asarray(f64(v)) if v.dtype == np.float32 else jnp.asarray(v) for k, v in x.items()}
        fn, args = loss_and_args(a)
        assert all(arg.dtype == jnp.float64 for arg in args)
        check_grads(jax.jit(fn), args, order=1, modes=("rev",))


@pytest.fixture(scope="session")
def numpy_ref() -> types.SimpleNamespace:
    """The float64 references, without their `ref_` prefix (`numpy_ref.cross_entropy` is
    `ref_cross_entropy`), and `make_inputs`, `numeric_grad`, `f64`, `check_float64_gradients`."""
    return types.SimpleNamespace(
        softmax=ref_softmax,
        logsumexp=ref_logsumexp,
        weighted_mean=ref_weighted_mean,
        cross_entropy=ref_cross_entropy,
        kl=ref_kl,
        divergence=ref_divergence,
        token_divergences=ref_token_divergences,
        kl_distillation=ref_kl_distillation,
        salad=ref_salad,
        mean_squared_distance=ref_mean_squared_distance,
        sequence_kl=ref_sequence_kl,
        unembed=ref_unembed,
        make_inputs=make_inputs,
        numeric_grad=numeric_grad,
        f64=f64,
        check_float64_gradients=check_float64_gradients,
    )
