"""Whisper encoder import: checkpoint layouts, bf16 files, mesh placement, config mismatches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from jax.sharding import PartitionSpec

from speechlm_jax.models.hf_import import load_whisper_encoder, whisper_config_from_checkpoint
from speechlm_jax.models.whisper import WhisperConfig
from speechlm_jax.sharding import make_mesh

# max_source_positions=50 gives HF a 100-frame window, so the reference runs fast.
TINY = dict(
    num_mel_bins=80,
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=4,
    encoder_ffn_dim=64,
    max_source_positions=50,
    decoder_layers=1,
    decoder_attention_heads=4,
    decoder_ffn_dim=64,
    vocab_size=100,
    max_target_positions=16,
    pad_token_id=0,
    bos_token_id=0,
    eos_token_id=0,
    decoder_start_token_id=1,
    begin_suppress_tokens=None,
)


def randomised(model: torch.nn.Module) -> torch.nn.Module:
    """HF initialises LayerNorms to identity and biases to zero; randomise them so a mapping slip shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn_like(param))
    return model.eval()


def mels(frames: int = 100) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(2, 80, frames)).astype(np.float32)


def hf_encoder_output(encoder: torch.nn.Module, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return encoder(torch.from_numpy(x)).last_hidden_state.float().numpy()


def test_table_covers_every_encoder_tensor(tmp_path):
    torch.manual_seed(0)
    model = transformers.WhisperModel(transformers.WhisperConfig(**TINY))
    model.save_pretrained(tmp_path)
    assert whisper_config_from_checkpoint(tmp_path) == WhisperConfig.from_hf(model.config)
    encoder = load_whisper_encoder(tmp_path)
    hf_names = {k for k in model.state_dict() if k.startswith("encoder.")}
    ours = sum(v[...].size for _, v in nnx.to_flat_state(nnx.state(encoder)))
    assert ours == sum(model.state_dict()[k].numel() for k in hf_names)


def test_for_conditional_generation_layout(tmp_path):
    torch.manual_seed(0)
    model = randomised(transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(**TINY)))
    model.save_pretrained(tmp_path)
    assert any(k.startswith("model.encoder.") for k in model.state_dict())
    encoder = load_whisper_encoder(tmp_path)
    x = mels()
    hidden, _ = encoder(jnp.asarray(x))
    assert np.max(np.abs(np.asarray(hidden) - hf_encoder_output(model.model.encoder, x))) <= 1e-4


def test_bfloat16_checkpoint_into_float32_params(tmp_path):
    torch.manual_seed(0)
    model = randomised(transformers.WhisperModel(transformers.WhisperConfig(**TINY))).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    encoder = load_whisper_encoder(tmp_path, param_dtype=jnp.float32)
    kernel = encoder.layers[1].mlp.fc2.kernel[...]
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(kernel), model.encoder.layers[1].fc2.weight.detach().float().numpy().T)
    conv = encoder.conv1.kernel[...]
    np.testing.assert_array_equal(
        np.asarray(conv), model.encoder.conv1.weight.detach().float().numpy().transpose(2, 1, 0)
    )


def test_mesh_placement_matches_unsharded(tmp_path):
    torch.manual_seed(0)
    model = randomised(transformers.WhisperModel(transformers.WhisperConfig(**TINY)))
    model.save_pretrained(tmp_path)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = load_whisper_encoder(tmp_path, mesh=mesh)
    assert sharded.layers[0].attn.q_proj.kernel[...].sharding.spec == PartitionSpec("fsdp", "tensor")
    assert sharded.layers[0].mlp.fc2.kernel[...].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert sharded.conv1.kernel[...].sharding.spec == PartitionSpec(None, None, "fsdp")
    x = mels()
    hidden, _ = jax.jit(lambda m: sharded(m))(jnp.asarray(x))
    assert np.max(np.abs(np.asarray(hidden) - hf_encoder_output(model.encoder, x))) <= 1e-4


def test_config_that_does_not_fit_names_the_tensor(tmp_path):
    torch.manual_seed(0)
    transformers.WhisperModel(transformers.WhisperConfig(**TINY)).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["encoder_ffn_dim"] = 48
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"first mismatched tensor: encoder\.layers\.0\.fc1\."):
        load_whisper_encoder(tmp_path)
