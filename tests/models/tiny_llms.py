"""Tiny random transformers LLMs of every supported family, saved with `save_pretrained`.

Shared by the LLM, generation and HF-import tests: each family exercises its own
switches (llama3 RoPE scaling + GQA, Qwen2 q/k/v biases, Qwen3 q/k norms, Gemma 3
sliding window smaller than the test sequences, soft-capping, local RoPE base).
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

COMMON = dict(
    vocab_size=160,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    # Larger than HF's 0.02 so that greedy decoding of a random model does not just repeat one token.
    initializer_range=0.15,
)

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")


def hf_config(family: str, *, tied: bool) -> transformers.PretrainedConfig:
    """A tiny config of `family` (llama, qwen2, qwen3, gemma3) with tied or untied embeddings."""
    kw = dict(COMMON, tie_word_embeddings=tied)
    if family == "llama":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
        return transformers.LlamaConfig(**kw, rope_parameters=rope)
    if family == "qwen2":
        return transformers.Qwen2Config(**kw, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "qwen3":
        return transformers.Qwen3Config(**kw, head_dim=24, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    if family == "gemma3":
        # The sqrt(d) embedding scale already makes Gemma's activations large: HF's default init.
        kw["initializer_range"] = 0.02
        return transformers.Gemma3TextConfig(
            **kw,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=20.0,
            final_logit_softcapping=8.0,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e6},
            },
        )
    raise ValueError(family)


def hf_model(family: str, *, tied: bool, seed: int = 0) -> transformers.PreTrainedModel:
    """A random float32 model in eval mode with eager attention (the exact reference numerics).

    Norm weights are randomised too (HF initialises them to the identity), so a
    mapping error on any of them shows in the logits.
    """
    torch.manual_seed(seed)
    config = hf_config(family, tied=tied)
    config._attn_implementation = "eager"
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.05 * torch.randn_like(param))
    return model


def save_hf_model(family: str, directory: Path, *, tied: bool, seed: int = 0, **save_kwargs) -> transformers.PreTrainedModel:
    model = hf_model(family, tied=tied, seed=seed)
    model.save_pretrained(directory, **save_kwargs)
    return model
