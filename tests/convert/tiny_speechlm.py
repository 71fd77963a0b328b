"""A tiny 'trained' SpeechLM for the conversion tests: random weights everywhere, adapters non-zero.

The encoder window is 100 positions (200 mel frames = 2 s), so the Voxtral reference,
which always runs a full window, stays fast; the projector stacks 4 frames (encoder_ffn_dim
= 4 * d_model, as Voxtral requires), giving 25 audio tokens per clip.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from speechlm_jax.data.tokenizer import build_word_tokenizer, load_tokenizer
from speechlm_jax.models.llm import LLMConfig
from speechlm_jax.models.lora import LoRAConfig, linear_modules
from speechlm_jax.models.projector import ProjectorConfig
from speechlm_jax.models.speechlm import SpeechLM, build_speechlm
from speechlm_jax.models.whisper import WhisperConfig

SAMPLES = 32000  # 2 s at 16 kHz: one full encoder window
AUDIO_TOKENS = 25
WORDS = "what did the speaker say about the red cat and the blue dog please answer briefly"

ENCODER = WhisperConfig(num_mel_bins=80, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128, max_source_positions=100)


def llm_config(family: str = "llama", *, tied: bool = False) -> LLMConfig:
    fields = dict(
        model_type=family, vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, rms_norm_eps=1e-6, tie_word_embeddings=tied,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, rope_theta=10000.0,
    )
    return LLMConfig.from_hf(fields)


def tokenizer_dir(tmp_path: Path) -> Path:
    return build_word_tokenizer([WORDS], tmp_path / "tokenizer")


def randomise(model: nnx.Module, seed: int) -> None:
    """Every parameter random (norms and biases too, adapters' B non-zero), so a mapping slip shows."""
    rng = np.random.default_rng(seed)
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = str(path[-1])
        value = variable.get_value()
        if name == "scale":
            new = 1.0 + 0.1 * rng.normal(size=value.shape)
        elif name in ("bias", "lora_b"):
            new = 0.1 * rng.normal(size=value.shape)
        elif name == "embedding" or "lm_head" in [str(p) for p in path]:
            # Large token scores so that greedy decoding of a random model varies its tokens.
            new = rng.normal(size=value.shape)
        else:
            continue
        variable.set_value(jnp.asarray(new, value.dtype))


def tiny_speechlm(family: str = "llama", *, tied: bool = False, lora: bool = True, projector: ProjectorConfig | None = None, seed: int = 0) -> SpeechLM:
    model = build_speechlm(
        ENCODER,
        projector or ProjectorConfig(kind="frame_stack", downsample=4),
        llm_config(family, tied=tied),
        LoRAConfig(rank=4, alpha=8.0) if lora else None,
        rngs=nnx.Rngs(seed),
    )
    randomise(model, seed)
    return model


def has_lora(model: nnx.Module) -> bool:
    return any(linear.has_lora for _, linear in linear_modules(model))


def audio(seed: int = 0) -> np.ndarray:
    """[SAMPLES] int16: a chirp plus noise."""
    t = np.arange(SAMPLES) / 16000
    wave = 0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t) + 0.05 * np.random.default_rng(seed).normal(size=SAMPLES)
    return (wave * 32767).astype(np.int16)


def prompt_batch(tokenizer: Path, clip: np.ndarray) -> dict[str, jax.Array]:
    """One example: `<bos> what did the speaker say <audio x 25> please answer` as our model's batch."""
    tok = load_tokenizer(str(tokenizer))
    before = [tok.bos_id] + tok.encode("what did the speaker say")
    after = tok.encode("please answer")
    tokens = before + [tok.audio_token_id] * AUDIO_TOKENS + after
    audio_index = [-1] * len(before) + list(range(AUDIO_TOKENS)) + [-1] * len(after)
    t = len(tokens)
    return dict(
        audio=jnp.asarray(clip[None, None]),
        audio_lens=jnp.asarray([[SAMPLES]], jnp.int32),
        tokens=jnp.asarray([tokens], jnp.int32),
        positions=jnp.arange(t, dtype=jnp.int32)[None],
        input_mask=jnp.ones((1, t), jnp.int32),
        audio_index=jnp.asarray([audio_index], jnp.int32),
    )
