"""Tests of speechlm_jax.losses.ctc against PyTorch's CTC loss and by construction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechlm_jax.losses.ctc import (
    chunked_ctc_greedy,
    chunked_ctc_loss,
    collapse_best_path,
    ctc_greedy_decode,
    ctc_loss,
)


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
        labels[i, : len(r)] = r
    return logits, frame_mask, labels, n_frames, rows


def test_ctc_loss_matches_torch():
    torch = pytest.importorskip("torch")
    logits, frame_mask, labels, n_frames, rows = _ctc_case()
    weights = np.array([1.0, 2.0, 1.0, 1.0, 0.0], np.float32)
    loss, metrics = ctc_loss(
        jnp.asarray(logits), jnp.asarray(frame_mask), jnp.asarray(labels), blank_id=0, weights=jnp.asarray(weights)
    )
    log_probs = torch.log_softmax(torch.from_numpy(logits), dim=-1).transpose(0, 1)
    per = torch.nn.functional.ctc_loss(
        log_probs,
        torch.from_numpy(np.concatenate([np.asarray(r) for r in rows])).long(),
        torch.from_numpy(n_frames).long(),
        torch.tensor([len(r) for r in rows]).long(),
        blank=0,
        reduction="none",
        zero_infinity=False,
    ).numpy()
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
    grad = jax.grad(lambda x: ctc_loss(x, jnp.asarray(frame_mask), jnp.asarray(labels), blank_id=0)[0])(
        jnp.asarray(logits)
    )
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[3], 0.0)


def test_ctc_greedy_decode_merges_repeats_and_drops_blanks():
    best = np.array([[0, 3, 3, 0, 3, 5, 5, 0, 2], [4, 4, 4, 0, 0, 1, 1, 1, 1]])
    logits = jax.nn.one_hot(best, 6) * 10.0
    frame_mask = np.ones(best.shape, np.float32)
    frame_mask[1, 5:] = 0.0  # row 1's frames past the fifth are padding
    decoded = ctc_greedy_decode(logits, jnp.asarray(frame_mask), blank_id=0, max_labels=5)
    assert np.asarray(decoded).tolist() == [[3, 3, 5, 2, -1], [4, -1, -1, -1, -1]]


def test_ctc_exact_match_when_the_frames_spell_the_labels():
    best = np.array([[0, 3, 0, 3, 5, 0]])
    logits = jax.nn.one_hot(best, 6) * 20.0
    labels = np.array([[3, 3, 5, -1]], np.int32)
    loss, metrics = ctc_loss(logits, jnp.ones(best.shape), jnp.asarray(labels), blank_id=0)
    assert float(metrics["exact_match"]) == 1.0
    assert float(loss) < 1e-3


def _hidden_case(seed: int = 0, vocab: int = 50, d_model: int = 8):
    """The CTC case as hidden states and an unembedding (the trainer's inputs), vocabulary larger than a chunk."""
    _, frame_mask, labels, n_frames, rows = _ctc_case(seed)
    rng = np.random.default_rng(seed + 1)
    hidden = rng.normal(size=(labels.shape[0], frame_mask.shape[1], d_model)).astype(np.float32)
    unembedding = rng.normal(size=(d_model, vocab)).astype(np.float32)
    return hidden, unembedding, frame_mask, labels


@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_chunked_ctc_loss_equals_the_whole_form_with_gradients(chunk_size, softcap):
    hidden, unembedding, frame_mask, labels = (jnp.asarray(a) for a in _hidden_case())
    weights = jnp.asarray([1.0, 2.0, 1.0, 1.0, 0.0])

    def whole(h, w):
        logits = jnp.einsum("ufd,dv->ufv", h, w)
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        return ctc_loss(logits, frame_mask, labels, blank_id=0, weights=weights)

    def chunked(h, w):
        return chunked_ctc_loss(
            h, w, frame_mask, labels, blank_id=0, chunk_size=chunk_size, weights=weights, softcap=softcap
        )

    (loss, metrics), grads = jax.value_and_grad(whole, argnums=(0, 1), has_aux=True)(hidden, unembedding)
    (loss_c, metrics_c), grads_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1), has_aux=True))(
        hidden, unembedding
    )
    np.testing.assert_allclose(loss_c, loss, rtol=1e-5)
    for name in metrics:
        np.testing.assert_allclose(metrics_c[name], metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert metrics_c["infeasible"] == 1.0
    for g_c, g in zip(grads_c, grads):
        assert np.all(np.isfinite(g_c))
        np.testing.assert_allclose(g_c, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_a_learned_blank_is_the_unembedding_with_the_blank_column_replaced(softcap):
    """The connector's blank vector stands in for column `blank_id`: loss, gradients (the blank's
    own included) and the greedy readout equal the whole form over that replaced unembedding."""
    hidden, unembedding, frame_mask, labels = (jnp.asarray(a) for a in _hidden_case())
    blank = jnp.asarray(np.random.default_rng(7).normal(size=hidden.shape[-1]).astype(np.float32)) * 3.0

    def whole(h, w, b):
        logits = jnp.einsum("ufd,dv->ufv", h, w.at[:, 0].set(b))
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        return ctc_loss(logits, frame_mask, labels, blank_id=0)

    def chunked(h, w, b):
        return chunked_ctc_loss(h, w, frame_mask, labels, blank_id=0, chunk_size=5, softcap=softcap, blank=b)

    (loss, _), grads = jax.value_and_grad(whole, argnums=(0, 1, 2), has_aux=True)(hidden, unembedding, blank)
    (loss_c, _), grads_c = jax.jit(jax.value_and_grad(chunked, argnums=(0, 1, 2), has_aux=True))(
        hidden, unembedding, blank
    )
    np.testing.assert_allclose(loss_c, loss, rtol=1e-5)
    assert not np.allclose(
        loss_c, chunked_ctc_loss(hidden, unembedding, frame_mask, labels, blank_id=0, chunk_size=5, softcap=softcap)[0]
    )
    for g_c, g in zip(grads_c, grads):
        np.testing.assert_allclose(g_c, g, rtol=1e-4, atol=1e-5)
    assert np.all(np.asarray(grads_c[1])[:, 0] == 0)  # the LLM's own blank row takes no part
    best = chunked_ctc_greedy(hidden, unembedding, chunk_size=5, blank_id=0, blank=blank)
    np.testing.assert_array_equal(
        best, jnp.argmax(jnp.einsum("ufd,dv->ufv", hidden, unembedding.at[:, 0].set(blank)), -1)
    )


def test_chunked_ctc_greedy_is_the_argmax_of_every_frame():
    hidden, unembedding, frame_mask, _ = (jnp.asarray(a) for a in _hidden_case(vocab=37))
    best = chunked_ctc_greedy(hidden, unembedding, chunk_size=5)
    np.testing.assert_array_equal(best, jnp.argmax(jnp.einsum("ufd,dv->ufv", hidden, unembedding), axis=-1))
    decoded = collapse_best_path(best, frame_mask, blank_id=0, max_labels=6)
    np.testing.assert_array_equal(
        decoded, ctc_greedy_decode(jnp.einsum("ufd,dv->ufv", hidden, unembedding), frame_mask, blank_id=0, max_labels=6)
    )


def test_chunked_ctc_memory_does_not_grow_with_the_vocabulary():
    """Compiled temporaries of loss + grad at a 32k vocabulary: the chunked form stays far below the whole logits."""
    u, f, d, v = 4, 64, 16, 32768
    hidden = jax.ShapeDtypeStruct((u, f, d), jnp.float32)
    unembedding = jax.ShapeDtypeStruct((d, v), jnp.float32)
    frame_mask = jnp.ones((u, f))
    labels = jnp.tile(jnp.arange(1, 21, dtype=jnp.int32)[None], (u, 1))

    def temp_bytes(fn):
        grad = jax.jit(jax.grad(lambda h, w: fn(h, w)[0], argnums=(0, 1)))
        return grad.lower(hidden, unembedding).compile().memory_analysis().temp_size_in_bytes

    whole = temp_bytes(lambda h, w: ctc_loss(jnp.einsum("ufd,dv->ufv", h, w), frame_mask, labels, blank_id=0))
    chunked = temp_bytes(lambda h, w: chunked_ctc_loss(h, w, frame_mask, labels, blank_id=0, chunk_size=8))
    logits_bytes = u * f * v * 4
    assert whole >= logits_bytes
    # One chunk of logits (u * 8 * v floats) and the unembedding gradient, a few times over: not [u, f, v].
    assert chunked < logits_bytes / 2 and chunked < whole / 8, (chunked, whole)
