"""KV-cache decoding against transformers `generate` (greedy, left padding, EOS), and sampling."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from speechlm_jax.generate import generate, sample_logits
from speechlm_jax.models.hf_import import load_llm

NEW_TOKENS = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory, llm_families, save_hf_model):
    """family -> (our model, transformers model); Llama and Qwen3 untied, the others tied."""
    out = {}
    for family in llm_families:
        directory = tmp_path_factory.mktemp(family)
        hf = save_hf_model(family, directory, tied=family in ("qwen2", "gemma3"), seed=1)
        out[family] = load_llm(directory), hf
    return out


def left_padded_prompts() -> tuple[np.ndarray, np.ndarray]:
    rs = np.random.RandomState(7)
    tokens = rs.randint(3, 160, (3, 10))
    mask = np.ones_like(tokens)
    mask[1, :3] = 0
    mask[2, :6] = 0
    return tokens * mask, mask


def hf_greedy(hf, tokens: np.ndarray, mask: np.ndarray, eos_id: int | None) -> np.ndarray:
    with torch.no_grad():
        out = hf.generate(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos_id,
            pad_token_id=0,
        )
    return out[:, tokens.shape[1] :].numpy()


def test_greedy_matches_transformers_with_left_padding(models, llm_family):
    model, hf = models[llm_family]
    tokens, mask = left_padded_prompts()
    ref = hf_greedy(hf, tokens, mask, eos_id=None)
    out = generate(model, tokens, mask, max_new_tokens=NEW_TOKENS, eos_id=())
    assert ref.shape == (3, NEW_TOKENS)
    assert len(np.unique(ref)) > 8  # a real sequence, not one repeated token
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    np.testing.assert_array_equal(np.asarray(out.lengths), [NEW_TOKENS] * 3)


def test_eos_stops_each_row_like_transformers(models):
    model, hf = models["llama"]
    tokens, mask = left_padded_prompts()
    free = hf_greedy(hf, tokens, mask, eos_id=None)
    # An EOS id that row 0 produces first at step 5.
    eos = int(free[0, 5])
    assert eos not in free[0, :5]
    ref = hf_greedy(hf, tokens, mask, eos_id=eos)
    out = generate(model, tokens, mask, max_new_tokens=NEW_TOKENS, eos_id=[eos, 10_000])
    ours = np.asarray(out.tokens)
    np.testing.assert_array_equal(ours[:, : ref.shape[1]], ref)
    assert (ours[:, ref.shape[1] :] == 0).all()
    expected = [int(np.argmax(row == eos)) + 1 if (row == eos).any() else NEW_TOKENS for row in free]
    np.testing.assert_array_equal(np.asarray(out.lengths), expected)
    assert ours[0, 6:].tolist() == [0] * (NEW_TOKENS - 6)


def test_inputs_embeds_prefix_equals_tokens(models):
    model, _ = models["gemma3"]
    tokens, mask = left_padded_prompts()
    from_tokens = generate(model, tokens, mask, max_new_tokens=12, eos_id=2)
    from_embeds = generate(
        model, None, mask, max_new_tokens=12, eos_id=2, inputs_embeds=model.embed(jnp.asarray(tokens))
    )
    np.testing.assert_array_equal(np.asarray(from_embeds.tokens), np.asarray(from_tokens.tokens))


def test_sampling_is_reproducible_and_top_p_limits_support(models):
    model, _ = models["qwen3"]
    tokens, mask = left_padded_prompts()
    kw = dict(max_new_tokens=16, eos_id=(), temperature=1.0)
    a = generate(model, tokens, mask, rng=jax.random.key(1), **kw).tokens
    b = generate(model, tokens, mask, rng=jax.random.key(1), **kw).tokens
    c = generate(model, tokens, mask, rng=jax.random.key(2), **kw).tokens
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert (np.asarray(a) != np.asarray(c)).any()
    # A vanishing nucleus keeps only the most likely token: sampling becomes greedy.
    nucleus = generate(model, tokens, mask, rng=jax.random.key(1), top_p=1e-6, **kw).tokens
    greedy = generate(model, tokens, mask, max_new_tokens=16, eos_id=()).tokens
    np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))
    with pytest.raises(ValueError, match="rng"):
        generate(model, tokens, mask, max_new_tokens=4, eos_id=2, temperature=0.7)


def test_top_p_keeps_the_smallest_nucleus():
    probs = np.array([0.5, 0.3, 0.15, 0.05], np.float32)
    logits = jnp.log(jnp.asarray(np.tile(probs, (20000, 1))))
    draws = np.asarray(sample_logits(logits, jax.random.key(0), temperature=1.0, top_p=0.7))
    counts = np.bincount(draws, minlength=4) / len(draws)
    assert counts[2] == counts[3] == 0
    np.testing.assert_allclose(counts[:2], [0.5 / 0.8, 0.3 / 0.8], atol=0.02)
    full = np.asarray(sample_logits(logits, jax.random.key(0), temperature=1.0, top_p=1.0))
    np.testing.assert_allclose(np.bincount(full, minlength=4) / len(full), probs, atol=0.02)
