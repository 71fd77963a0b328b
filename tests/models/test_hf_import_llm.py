"""HF safetensors import of the decoder LLM: sharded and bf16 checkpoints, errors, mesh placement."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers
from flax import nnx

from speechlm_jax.models.hf_import import LLM_TABLES, SafetensorsCheckpoint, load_llm, plan_import
from speechlm_jax.sharding import make_mesh, state_shardings


def tokens() -> np.ndarray:
    return np.random.RandomState(3).randint(3, 150, (2, 11))


def hf_logits(hf: transformers.PreTrainedModel) -> np.ndarray:
    with torch.no_grad():
        return hf(input_ids=torch.tensor(tokens())).logits.float().numpy()


def our_logits(model) -> np.ndarray:
    return np.asarray(model(jnp.asarray(tokens())))


def test_sharded_checkpoint_with_index(save_hf_model, tmp_path):
    hf = save_hf_model("qwen3", tmp_path, tied=False, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    assert np.abs(our_logits(load_llm(tmp_path)) - hf_logits(hf)).max() <= 1e-4


def test_bf16_checkpoint_is_read_bit_exactly(save_hf_model, tmp_path):
    hf = save_hf_model("llama", tmp_path / "f32", tied=False)
    hf.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    model = load_llm(tmp_path / "bf16", dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    checkpoint = SafetensorsCheckpoint(tmp_path / "bf16")
    assert checkpoint.dtype("model.embed_tokens.weight") == "BF16"
    torch_params = dict(hf.named_parameters())
    state = nnx.state(model)
    plan = plan_import(state, LLM_TABLES["llama"], checkpoint)
    assert len(plan) == len(torch_params)
    for path, variable in nnx.to_flat_state(state):
        key, hook = plan["/".join(map(str, path))]
        value = np.asarray(variable.get_value())
        assert value.dtype == ml_dtypes.bfloat16
        expected = hook(torch_params[key].detach().float().numpy())
        np.testing.assert_array_equal(value.astype(np.float32), expected)

    # The same bf16 weights upcast to float32 compute the bf16 model's logits in float32.
    upcast = load_llm(tmp_path / "bf16")
    reference = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.float32).eval()
    assert np.abs(our_logits(upcast) - hf_logits(reference)).max() <= 1e-4


def test_mismatched_config_names_tensor_and_shapes(save_hf_model, tmp_path):
    save_hf_model("llama", tmp_path, tied=True)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 80
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as error:
        load_llm(tmp_path)
    message = str(error.value)
    assert "model.layers.0.mlp.down_proj.weight -> layers/0/mlp/down_proj/kernel" in message
    assert "checkpoint shape (64, 96)" in message and "(96, 64)" in message and "expects (80, 64)" in message


def test_missing_and_unexpected_keys_are_listed(save_hf_model, tmp_path):
    save_hf_model("qwen2", tmp_path, tied=True)
    path = tmp_path / "model.safetensors"
    tensors = safetensors.numpy.load_file(str(path))
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    tensors["model.layers.0.extra.weight"] = np.zeros((3,), np.float32)
    safetensors.numpy.save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError) as error:
        load_llm(tmp_path)
    message = str(error.value)
    assert "missing keys (1): ['model.layers.1.self_attn.k_proj.bias (for layers/1/attn/k_proj/bias)']" in message
    assert "unexpected keys (1): ['model.layers.0.extra.weight']" in message


def test_mesh_places_each_tensor_in_its_sharding(save_hf_model, tmp_path):
    hf = save_hf_model("gemma3", tmp_path, tied=True)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sharded = load_llm(tmp_path, mesh=mesh)
    state = nnx.state(sharded)
    expected = jax.tree.leaves(state_shardings(state, mesh))
    arrays = jax.tree.leaves(state)
    assert len(arrays) == len(expected)
    for array, sharding in zip(arrays, expected, strict=True):
        assert array.sharding.is_equivalent_to(sharding, array.ndim)
    kernel = sharded.layers[0].attn.q_proj.kernel[...]
    assert kernel.addressable_shards[0].data.shape == (64 // 4, 64 // 2)
    plain = nnx.state(load_llm(tmp_path))
    for a, b in zip(arrays, jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(our_logits(sharded) - hf_logits(hf)).max() <= 1e-4


def test_gemma3_multimodal_checkpoint_loads_its_text_model(hf_config, tmp_path):
    text = hf_config("gemma3", tied=True)
    vision = transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14
    )
    config = transformers.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4
    )
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(config).eval()
    hf.save_pretrained(tmp_path)
    model = load_llm(tmp_path)
    assert model.config.model_type == "gemma3_text" and model.config.num_hidden_layers == 2
    assert np.abs(our_logits(model) - hf_logits(hf)).max() <= 1e-4
