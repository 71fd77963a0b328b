"""Tests of speechlm_jax.losses.ctc against PyTorch's CTC loss and by construction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechlm_jax.losses.ctc import ctc_greedy_decode, ctc_loss


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
    loss, metrics = ctc_loss(jnp.asarray(logits), jnp.asarray(frame_mask), jnp.asarray(labels), blank_id=0,
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
    grad = jax.grad(lambda x: ctc_loss(x, jnp.asarray(frame_mask), jnp.asarray(labels), blank_id=0)[0])(jnp.asarray(logits))
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
