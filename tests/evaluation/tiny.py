"""A tiny random SpeechLM over the toy world's word tokenizer, shared by the evaluation tests."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
from flax import nnx

from speechlm_jax.data.tokenizer import SpeechTokenizer, build_word_tokenizer, load_tokenizer
from speechlm_jax.models.llm import DecoderLLM, LLMConfig
from speechlm_jax.models.lora import LoRAConfig
from speechlm_jax.models.projector import ProjectorConfig
from speechlm_jax.models.speechlm import SpeechLM, build_speechlm
from speechlm_jax.models.whisper import WhisperConfig
from speechlm_jax.toyworld import all_words, register_toy_tasks

DOWNSAMPLE = 2
ENCODER = WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64)


def tokenizer(directory: Path) -> SpeechTokenizer:
    register_toy_tasks()
    return load_tokenizer(build_word_tokenizer(all_words(), directory))


def llm_config(vocab_size: int) -> LLMConfig:
    # Rounded up to a multiple of 8 so the vocab axis shards over a tensor axis of 2.
    return LLMConfig(
        model_type="llama", vocab_size=-(-vocab_size // 8) * 8, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
        tie_word_embeddings=False, eos_token_id=(2,), bos_token_id=1, pad_token_id=0,
    )


def speechlm(tok: SpeechTokenizer, seed: int = 0) -> SpeechLM:
    """Random weights, rank-4 LoRA on every linear (zero B: the adapter starts as the identity)."""
    return build_speechlm(ENCODER, ProjectorConfig(downsample=DOWNSAMPLE), llm_config(len(tok)), LoRAConfig(rank=4),
                          dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))


def base_llm(tok: SpeechTokenizer, seed: int = 0) -> DecoderLLM:
    return DecoderLLM(llm_config(len(tok)), rngs=nnx.Rngs(seed))
