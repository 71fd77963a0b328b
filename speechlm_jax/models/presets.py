"""Named shapes of real checkpoints, as HF-style config dicts.

`LLM_PRESETS[name]` is the `config.json` of the published decoder LLM (the text model
for Gemma 3 4B), so `LLMConfig.from_hf(LLM_PRESETS[name])` builds a model with exactly
the checkpoint's parameter shapes: configs and tests can name a real model without
downloading it, and `load_llm` later fills it from the checkpoint itself.
"""

from __future__ import annotations

from typing import Any

LLAMA3_BOS, LLAMA3_EOS = 128000, 128001
QWEN_BOS = QWEN_EOS = 151643


def _llama3(
    hidden: int, intermediate: int, layers: int, heads: int, head_dim: int, *, tied: bool, rope_factor: float
) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": rope_factor,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        "tie_word_embeddings": tied,
        "bos_token_id": LLAMA3_BOS,
        "eos_token_id": LLAMA3_EOS,
    }


def _qwen25(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    *,
    tied: bool,
    vocab: int = 151936,
    max_pos: int = 32768,
) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": max_pos,
        "rope_theta": 1000000.0,
        "use_sliding_window": False,
        "sliding_window": max_pos,
        "max_window_layers": layers,
        "tie_word_embeddings": tied,
        "bos_token_id": QWEN_BOS,
        "eos_token_id": QWEN_EOS,
    }


def _qwen3(hidden: int, intermediate: int, layers: int, heads: int, *, tied: bool) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "hidden_act": "silu",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 40960,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": layers,
        "tie_word_embeddings": tied,
        "bos_token_id": QWEN_BOS,
        "eos_token_id": QWEN_EOS,
    }


def _gemma3(
    hidden: int,
    intermediate: int,
    layers: int,
    heads: int,
    kv_heads: int,
    *,
    vocab: int,
    sliding_window: int,
    max_pos: int,
    rope_scaling: dict[str, Any] | None = None,
) -> dict[str, Any]:
    # Every 6th layer is global (full attention), the others local (sliding window).
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": 256,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": max_pos,
        "query_pre_attn_scalar": 256,
        "rope_theta": 1000000.0,
        "rope_local_base_freq": 10000.0,
        "rope_scaling": rope_scaling,
        "sliding_window": sliding_window,
        "layer_types": layer_types,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "tie_word_embeddings": True,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    }


# Keys are the model names of the HF hub ids (meta-llama/..., Qwen/..., google/...).
LLM_PRESETS: dict[str, dict[str, Any]] = {
    "Llama-3.2-1B": _llama3(2048, 8192, 16, 32, 64, tied=True, rope_factor=32.0),
    "Llama-3.2-3B": _llama3(3072, 8192, 28, 24, 128, tied=True, rope_factor=32.0),
    "Llama-3.1-8B": _llama3(4096, 14336, 32, 32, 128, tied=False, rope_factor=8.0),
    "Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, tied=True),
    "Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, tied=True, max_pos=131072),
    "Qwen2.5-3B": _qwen25(2048, 11008, 36, 16, 2, tied=True),
    "Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, tied=False, vocab=152064, max_pos=131072),
    "Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, tied=True),
    "Qwen3-1.7B": _qwen3(2048, 6144, 28, 16, tied=True),
    "Qwen3-4B": _qwen3(2560, 9728, 36, 32, tied=True),
    "Qwen3-8B": _qwen3(4096, 12288, 36, 32, tied=False),
    "gemma-3-270m": _gemma3(640, 2048, 18, 4, 1, vocab=262144, sliding_window=512, max_pos=32768),
    "gemma-3-1b": _gemma3(1152, 6912, 26, 4, 1, vocab=262144, sliding_window=512, max_pos=32768),
    "gemma-3-4b": _gemma3(
        2560,
        10240,
        34,
        8,
        4,
        vocab=262208,
        sliding_window=1024,
        max_pos=131072,
        rope_scaling={"rope_type": "linear", "factor": 8.0},
    ),
}


# ---------------------------------------------------------------------------------------
# Whisper encoders (speech side). HF-style `WhisperConfig` dicts with the exact shapes of
# the released openai/whisper-* checkpoints; `WhisperConfig.from_hf(d)` reads the encoder
# half. The decoder fields mirror the encoder (as in the releases), so
# `transformers.WhisperConfig(**d)` also builds the full model.
# ---------------------------------------------------------------------------------------


def _whisper(
    d_model: int, layers: int, heads: int, *, num_mel_bins: int = 80, vocab_size: int = 51865
) -> dict[str, Any]:
    return dict(
        architectures=["WhisperForConditionalGeneration"],
        model_type="whisper",
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=layers,
        encoder_attention_heads=heads,
        encoder_ffn_dim=4 * d_model,
        decoder_layers=layers,
        decoder_attention_heads=heads,
        decoder_ffn_dim=4 * d_model,
        max_source_positions=1500,
        max_target_positions=448,
        activation_function="gelu",
        vocab_size=vocab_size,
    )


WHISPER_PRESETS: dict[str, dict[str, Any]] = {
    "whisper-tiny": _whisper(384, 4, 6),
    "whisper-base": _whisper(512, 6, 8),
    "whisper-small": _whisper(768, 12, 12),
    "whisper-medium": _whisper(1024, 24, 16),
    "whisper-large-v3": _whisper(1280, 32, 20, num_mel_bins=128, vocab_size=51866),
}
