"""Projectors: Voxtral's multi-modal projector numerics, downsampled masks, padding invariance."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import VoxtralConfig
from transformers.models.voxtral.modeling_voxtral import VoxtralMultiModalProjector

from speechlm_jax.models.projector import ConvProjector, FrameStackProjector, downsample_mask


def test_frame_stack_matches_voxtral_projector():
    d_audio, d_llm, k = 16, 24, 4
    config = VoxtralConfig(
        audio_config={
            "hidden_size": d_audio,
            "intermediate_size": k * d_audio,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        text_config={
            "hidden_size": d_llm,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 12,
            "vocab_size": 64,
        },
    )
    torch.manual_seed(0)
    reference = VoxtralMultiModalProjector(config).eval()
    ours = FrameStackProjector(d_audio, d_llm, stack=k, rngs=nnx.Rngs(0))
    ours.linear_1.kernel[...] = jnp.asarray(reference.linear_1.weight.detach().numpy().T)
    ours.linear_2.kernel[...] = jnp.asarray(reference.linear_2.weight.detach().numpy().T)

    batch, frames = 2, 12
    h = np.random.default_rng(0).normal(size=(batch, frames, d_audio)).astype(np.float32)
    # Voxtral's get_audio_features: encoder output reshaped to [-1, intermediate_size].
    with torch.no_grad():
        expected = reference(torch.from_numpy(h).reshape(-1, k * d_audio)).numpy().reshape(batch, frames // k, d_llm)
    got, mask = ours(jnp.asarray(h), jnp.ones((batch, frames), jnp.int32))
    assert got.shape == (batch, frames // k, d_llm)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5)
    assert mask.shape == (batch, frames // k) and bool(mask.all())


def test_downsample_mask_counts_complete_groups():
    lengths = np.array([0, 3, 4, 7, 11])
    mask = (np.arange(11)[None, :] < lengths[:, None]).astype(np.int32)
    out = np.asarray(downsample_mask(jnp.asarray(mask), 2))
    assert out.shape == (5, 5)
    np.testing.assert_array_equal(out.sum(axis=1), lengths // 2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: FrameStackProjector(8, 12, stack=2, activation="silu", use_bias=True, rngs=nnx.Rngs(1)),
        lambda: ConvProjector(8, 12, stride=2, width=5, rngs=nnx.Rngs(1)),
    ],
)
def test_valid_outputs_do_not_depend_on_padding(make):
    projector = make()
    rng = np.random.default_rng(1)
    n, padded = 7, 12
    clip = rng.normal(size=(1, n, 8)).astype(np.float32)
    alone, alone_mask = projector(jnp.asarray(clip), jnp.ones((1, n)))
    batch = np.concatenate([clip, rng.normal(size=(1, padded - n, 8)).astype(np.float32)], axis=1)
    mask = (np.arange(padded) < n)[None].astype(np.int32)
    out, out_mask = projector(jnp.asarray(batch), jnp.asarray(mask))
    assert out.shape == (1, padded // 2, 12)
    valid = n // 2
    assert int(out_mask.sum()) == int(alone_mask.sum()) == valid
    np.testing.assert_allclose(np.asarray(out[:, :valid]), np.asarray(alone[:, :valid]), atol=1e-6)


def test_conv_projector_with_width_equal_stride_is_a_frame_stack():
    conv = ConvProjector(8, 12, stride=3, hidden=10, rngs=nnx.Rngs(2))
    stack = FrameStackProjector(8, 12, stack=3, hidden=10, use_bias=True, rngs=nnx.Rngs(3))
    stack.linear_1.kernel[...] = conv.conv.kernel[...].reshape(3 * 8, 10)
    stack.linear_1.bias[...] = conv.conv.bias[...]
    stack.linear_2.kernel[...] = conv.linear.kernel[...]
    stack.linear_2.bias[...] = conv.linear.bias[...]
    h = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 8)).astype(np.float32))
    mask = jnp.ones((2, 9))
    np.testing.assert_allclose(np.asarray(conv(h, mask)[0]), np.asarray(stack(h, mask)[0]), atol=1e-5)
