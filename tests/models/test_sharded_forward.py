"""The SpeechLM forward sharded over 8 simulated devices (fsdp=4, tensor=2) equals one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from speechlm_jax.models.frontend import audio_token_count
from speechlm_jax.models.llm import LLMConfig
from speechlm_jax.models.lora import LoRAConfig
from speechlm_jax.models.projector import ProjectorConfig
from speechlm_jax.models.speechlm import build_speechlm
from speechlm_jax.models.whisper import WhisperConfig
from speechlm_jax.sharding import batch_sharding, make_mesh, shard_state

# Every sharded dimension divides its mesh axes (embed by fsdp=4; heads, mlp, vocab by tensor=2).
ENCODER_KW = dict(d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64)
LLM = LLMConfig(
    model_type="qwen2",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    qkv_bias=True,
)
SAMPLES = 160 * 32


@pytest.mark.parametrize("positions", [1500, 6], ids=["one_window", "three_windows"])
def test_sharded_speechlm_forward_matches_single_device(positions):
    """`positions`: the encoder window; at 6 (12 mel frames) each 32-frame slot is three windows."""
    model = build_speechlm(
        WhisperConfig(**ENCODER_KW, max_source_positions=positions),
        ProjectorConfig(downsample=2),
        LLM,
        LoRAConfig(rank=4),
        encoder_lora_cfg=LoRAConfig(rank=2, targets=r"attn/q_proj$"),
        rngs=nnx.Rngs(0),
    )
    for _, node in nnx.iter_graph(model):
        if isinstance(node, nnx.LoRAParam):  # non-zero adapters, so the LoRA path is exercised
            node[...] = 0.1 * jnp.ones_like(node[...])

    rng = np.random.default_rng(0)
    batch_size, slots, length = 4, 2, 24
    frames = audio_token_count(SAMPLES, 2)
    audio_lens = np.array([[SAMPLES, SAMPLES // 2], [SAMPLES, 0], [160 * 7, SAMPLES], [0, 0]], np.int32)
    audio_index = np.full((batch_size, length), -1, np.int32)
    for b in range(batch_size):
        for s in range(slots):
            n = audio_token_count(int(audio_lens[b, s]), 2)
            audio_index[b, 1 + s * (frames + 1) : 1 + s * (frames + 1) + n] = s * frames + np.arange(n)
    batch = dict(
        audio=rng.integers(-9000, 9000, size=(batch_size, slots, SAMPLES)).astype(np.int16),
        audio_lens=audio_lens,
        tokens=rng.integers(0, LLM.vocab_size, size=(batch_size, length)).astype(np.int32),
        positions=np.broadcast_to(np.arange(length, dtype=np.int32), (batch_size, length)).copy(),
        input_mask=np.ones((batch_size, length), np.int32),
        audio_index=audio_index,
    )

    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(batch))
    expected = forward(state, {k: jnp.asarray(v) for k, v in batch.items()})

    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded_state = shard_state(state, mesh)
    q_kernel = sharded_state["llm"]["layers"][0]["attn"]["q_proj"]["kernel"][...]
    assert q_kernel.sharding.spec == PartitionSpec("fsdp", "tensor")
    sharded_batch = {k: jax.device_put(v, batch_sharding(mesh, v.ndim)) for k, v in batch.items()}
    got = forward(sharded_state, sharded_batch)
    assert isinstance(got.sharding, NamedSharding) and len(got.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)
