"""LLM presets: our parameter count equals transformers' for the same config (meta device, no download)."""

from __future__ import annotations

import math

import jax
import pytest
import torch
import transformers
from flax import nnx

from speechlm_jax.models.llm import DecoderLLM, LLMConfig
from speechlm_jax.models.presets import LLM_PRESETS

# Published totals (billions), a coarse guard on the shapes themselves.
PUBLISHED_BILLIONS = {
    "Llama-3.2-1B": 1.24,
    "Llama-3.2-3B": 3.21,
    "Llama-3.1-8B": 8.03,
    "Qwen2.5-0.5B": 0.49,
    "Qwen2.5-1.5B": 1.54,
    "Qwen2.5-3B": 3.09,
    "Qwen2.5-7B": 7.62,
    "Qwen3-0.6B": 0.6,
    "Qwen3-1.7B": 1.7,
    "Qwen3-4B": 4.0,
    "Qwen3-8B": 8.2,
    "gemma-3-270m": 0.268,
    "gemma-3-1b": 1.0,
    "gemma-3-4b": 3.88,
}


def our_parameter_count(config: LLMConfig) -> int:
    model = nnx.eval_shape(lambda: DecoderLLM(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def hf_config(preset: dict) -> transformers.PretrainedConfig:
    preset = dict(preset)
    return transformers.AutoConfig.for_model(preset.pop("model_type"), **preset)


@pytest.mark.parametrize("name", sorted(LLM_PRESETS))
def test_parameter_count_matches_transformers(name):
    preset = LLM_PRESETS[name]
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_config(preset))
    expected = sum(p.numel() for p in hf.parameters())
    ours = our_parameter_count(LLMConfig.from_hf(preset))
    assert ours == expected
    assert abs(ours / 1e9 - PUBLISHED_BILLIONS[name]) / PUBLISHED_BILLIONS[name] < 0.08


@pytest.mark.parametrize("name", sorted(LLM_PRESETS))
def test_config_round_trips_through_transformers(name):
    config = LLMConfig.from_hf(LLM_PRESETS[name])
    assert LLMConfig.from_hf(config.to_hf()) == config
    assert LLMConfig.from_hf(hf_config(LLM_PRESETS[name])) == config
    assert LLMConfig.from_hf(hf_config(config.to_hf())) == config
